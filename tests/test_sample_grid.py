"""The training-time sample grid: every worker draws its share of the prompts, worker 0 writes it."""
import io

import pytest
import torch

from tessera.models.gpt import build_gpt
from tessera.models.refs import resolve
from tessera.models.text_encoder import TextEncoder
from tessera.models.vq import load_vq
from tessera.training.grid import sample_grid, share_of

PROMPTS = ["a red circle on a blue background", "a green square in the center", "a yellow triangle"]


def test_shares_cover_the_prompts_once_in_order():
    for world in (1, 2, 3, 4, 5):
        shares = [share_of(PROMPTS, r, world) for r in range(world)]
        assert [p for _, part in shares for p in part] == PROMPTS
        assert all(PROMPTS[first:first + len(part)] == part for first, part in shares)


def _models(models_root: str):
    torch.manual_seed(0)
    model = build_gpt("GPT-demo", grid=4)
    vq = load_vq(resolve("tiny:vq", models_root))
    text = TextEncoder.from_pretrained(resolve("tiny:t5", models_root), max_length=model.cfg.cls_token_num)
    return model, vq, text


def _grid_worker(rank: int, models_root: str, port: int, fail_rank: int, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, vq, text = _models(models_root)
        written: list[bytes] = []
        drawn = sample_grid(model, vq, None if rank == fail_rank else text, PROMPTS, 0, rank, 2, written.append)
        queue.put((rank, drawn, written))
    finally:
        dist.destroy_process_group()


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [-1, 1])
def test_two_workers_draw_their_shares_and_worker_0_writes_the_grid(tmp_path, fail_rank):
    """Worker 0 draws two prompts, worker 1 the third, at the same time; worker 0 alone writes a
    grid of all three. A worker that cannot draw hands in nothing: the grid has the others'
    images and neither worker waits for ever."""
    import torch.multiprocessing as mp

    model, vq, text = _models(str(tmp_path))  # built once here, before the workers read them
    alone: list[bytes] = []
    assert sample_grid(model, vq, text, PROMPTS, 0, 0, 1, alone.append) == 3
    two_only: list[bytes] = []
    sample_grid(model, vq, text, PROMPTS[:2], 0, 0, 1, two_only.append)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_grid_worker, args=(r, str(tmp_path), 29561 + (fail_rank > 0), fail_rank, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        rank, drawn, written = queue.get(timeout=300)
        results[rank] = (drawn, written)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert results[1][1] == []  # only worker 0 writes
    if fail_rank < 0:
        assert (results[0][0], results[1][0]) == (2, 1)
        assert _size(results[0][1][0]) == _size(alone[0])  # the same 2 x 2 layout of three images
    else:
        assert (results[0][0], results[1][0]) == (2, 0)
        assert _size(results[0][1][0]) == _size(two_only[0])
