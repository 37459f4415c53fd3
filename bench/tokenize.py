"""Tokenize throughput: VQ encoding (images/s), and reading code shards (samples/s) against what
training consumes, all measured in the same run.

    python -m bench.tokenize [--device cpu|cuda] [--gpt GPT-B] [--batch 8] [--samples 2000]

1. Encoding: the VQ-16 architecture (random weights: speed does not depend on them) and the
   demo's VQ-tiny, at 256 and 512 px. VQ-16's rate is also what LlamaGen's own t2i training can
   at most consume, since it re-encodes every image at every step.
2. Reading: code shards written by the tokenize stage (codes, flipped codes, 24-token float16
   caption features of dim 2048), read with a plain webdataset pipeline and, when the training
   loader is present, through it.
3. Training: samples/s of a GPT forward+backward+AdamW step on stored-feature batches.
Ratios: read speed / training consumption (> 1: the shards never hold training up).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch


def rate(fn, items: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return items * repeats / (time.perf_counter() - start)


def bench_encode(name: str, res: int, batch: int, repeats: int, device: str) -> float:
    from tessera.models.vq import VQ_CONFIGS, VQModel

    model = VQModel(VQ_CONFIGS[name]).eval().to(device)
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1

    def step():
        model.encode(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return rate(step, batch, repeats)


def write_shards(root: str, samples: int, res: int, per_shard: int = 500) -> "ShardStore":
    from tessera.core.store import ShardStore
    from tessera.core.token_shards import encode_npy
    from tessera.pipelines.tokenize import write_shard

    store = ShardStore(root)
    rng = np.random.default_rng(0)
    grid = res // 16
    for s in range(0, samples, per_shard):
        rows = []
        for i in range(s, min(samples, s + per_shard)):
            key = f"{s // per_shard:05d}{i:04d}"
            codes = rng.integers(0, 16384, (grid, grid)).astype(np.uint16)
            meta = {"key": key, "caption": "a red circle in the center on a blue background",
                    "caption_long": "A red circle sits in the center of a plain blue background. " * 3,
                    "caption_short": "A red circle on blue.", "url": f"http://example.com/{key}.jpg",
                    "hash": i, "sha256": f"{i:064x}", "scores": {"clip_score": 0.31, "aesthetic": 5.6}}
            rows.append({"key": key, f"reason_{res}": "", f"codes_{res}": encode_npy(codes),
                         f"codes_flip_{res}": encode_npy(codes[:, ::-1].copy()), "meta": json.dumps(meta),
                         "t5": encode_npy(rng.standard_normal((24, 2048)).astype(np.float16)), "captioned": True})
        write_shard(store, f"{s // per_shard:05d}", res, rows, 16384)
    return store


def bench_webdataset(store, res: int) -> float:
    import webdataset as wds

    urls = [store.path(f"tokens/{res}", f"{s}.tar") for s in store.done_shards(f"tokens/{res}")]

    def read():
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            np.load(io.BytesIO(sample["codes.npy"]))
            np.load(io.BytesIO(sample["t5.npy"]))
            json.loads(sample["json"])
            n += 1
        return n
    n = read()
    return rate(read, n, 2)


def bench_loader(store, res: int, batch: int, batches: int) -> float | None:
    try:
        from tessera.config.train import CodesDataConfig
        from tessera.training.data import CodesLoader
    except ImportError:
        return None
    loader = CodesLoader(store, CodesDataConfig(resolution=res, text="stored"), global_batch=batch,
                         caption_dim=2048)
    try:
        return rate(lambda: [loader.next_batch() for _ in range(batches)], batch * batches, 1)
    finally:
        loader.close()


def bench_train(name: str, res: int, batch: int, steps: int, device: str) -> float | None:
    try:
        from tessera.models.gpt import build_gpt
    except ImportError:
        return None
    grid = res // 16
    model = build_gpt(name, grid=grid, device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.randint(0, model.cfg.vocab_size, (batch, grid * grid), device=device)
    cond = torch.randn(batch, model.cfg.cls_token_num, model.cfg.caption_dim, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(codes[:, :-1], cond)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return rate(step, batch, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpt", default="GPT-B", help="the model whose training step sets the consumption rate")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=2000, help="samples in the benchmark's code shards")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    dev = args.device
    print(f"device {dev}, torch threads {torch.get_num_threads()}")

    print("\nVQ encoding (images/s):")
    enc = {}
    for name in ("VQ-16", "VQ-tiny"):
        for res in (256, 512):
            b = args.batch if res == 256 or dev == "cuda" else max(1, args.batch // 4)
            enc[name, res] = bench_encode(name, res, b, args.repeats, dev)
            print(f"  {name:8s} {res} px: {enc[name, res]:9.3g}")

    with tempfile.TemporaryDirectory() as root:
        store = write_shards(root, args.samples, 256)
        size = store.read_json("tokens/256", "00000.done")["bytes"] / 500
        print(f"\nCode shards: {args.samples} samples at 256 px, {size / 1024:.1f} KiB per sample "
              "(codes, flipped codes, 24x2048 float16 caption features, json)")
        wds_rate = bench_webdataset(store, 256)
        print(f"  plain webdataset read: {wds_rate:9.0f} samples/s")
        loader_rate = bench_loader(store, 256, args.batch, max(4, args.samples // args.batch // 4))
        if loader_rate is not None:
            print(f"  training loader:       {loader_rate:9.0f} samples/s")

    train = bench_train(args.gpt, 256, args.batch, args.repeats, dev)
    print("\nAgainst what training consumes at 256 px:")
    if train is not None:
        print(f"  {args.gpt} training step (batch {args.batch}): {train:9.3g} samples/s")
        print(f"  plain read / training:   {wds_rate / train:9.0f}x")
        if loader_rate is not None:
            print(f"  loader read / training:  {loader_rate / train:9.0f}x")
    vq = enc["VQ-16", 256]
    print(f"  LlamaGen's way re-encodes each image with VQ-16 ({vq:.3g} images/s here): shards read "
          f"{wds_rate / vq:.0f}x faster than that encoder alone can supply images.")
    if train is not None:
        print(f"  VQ-16 encode cost per image / {args.gpt} step cost per sample: {train / vq:.2f}")


if __name__ == "__main__":
    main()
