"""The caption task in a flow: it runs before tokenize, and the code shards carry its captions."""
import json
import tarfile

import pytest

from tessera.config import RunConfig
from tessera.core.store import ShardStore

from .fixtures import write_download_shard, write_selection


def run_config(tmp_path, **caption) -> RunConfig:
    return RunConfig.model_validate({
        "name": "t", "data_root": str(tmp_path / "data"), "models_root": str(tmp_path / "models"),
        "ray": {"num_cpus": 2}, "source": {"path": str(tmp_path / "unused.parquet")},
        "caption": {"model": "tiny:llava", "max_new_tokens": 6, "num_actors": 1, **caption},
        "tokenize": {"vq": "tiny:vq", "resolutions": [256], "batch_size": 8}})


@pytest.mark.slow
def test_caption_then_tokenize_puts_long_and_short_captions_in_the_code_shards(ray_local, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from tessera.flows.caption_tasks import caption_task
    from tessera.flows.tokenize_tasks import tokenize_task

    cfg = run_config(tmp_path)
    store = ShardStore(cfg.data_root)
    rows = write_download_shard(store, "00000", n=6)
    write_selection(store, "00000", rows, [True] * 6)

    @flow
    def curate_tail() -> list[dict]:
        return caption_task(cfg, store).funnel() + tokenize_task(cfg, store).funnel()

    with prefect_test_harness(server_startup_timeout=180):
        funnel = curate_tail()
        with get_client(sync_client=True) as client:
            artifacts = {a.key: a for a in client.read_artifacts()}
    assert sum(r["count"] for r in funnel if r["stage"] == "caption") == 6
    assert artifacts["captions"].type == "table"
    captions = {r["key"]: r for r in store.read_table("captions", "00000.parquet").to_pylist()}
    with tarfile.open(store.path("tokens/256", "00000.tar")) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert metas
    for meta in metas:
        assert meta["caption_long"] == captions[meta["key"]]["caption_long"]
        assert meta["caption_short"] == captions[meta["key"]]["caption_short"]


def test_caption_task_is_skipped_when_captioning_is_off(tmp_path):
    from tessera.flows.caption_tasks import caption_task

    cfg = run_config(tmp_path, enabled=False)
    assert caption_task.fn(cfg, ShardStore(cfg.data_root)) is None
