"""Reruns after a failure redo only the unfinished shards, and end where an uninterrupted run ends."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tessera.config import load_config
from tessera.flows import curate as curate_module
from tessera.demo.synthetic import SyntheticSource
from tessera.pipelines import download
from tessera.core.runtime import ShardFailures
from tessera.core.store import ShardStore

SMALL = ["source.synthetic.num_images=30", "source.synthetic.bad_records=false",
         "download.shard_size=10", "download.timeout=10"]


def overrides(root: Path, source: Path) -> list[str]:
    return [f"data_root={root}/data", f"runs_root={root}/runs", f"models_root={root.parent}/models",
            f"source.path={source}", *SMALL]


def contents(data: Path) -> dict[str, object]:
    """What a run produced: every table's rows (in any order), every tar's members, every JSON
    file (markers, manifests, thresholds, without what was measured) but img2dataset's timing stats."""
    out: dict[str, object] = {}
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        rel = str(path.relative_to(data))
        if path.suffix == ".parquet":
            out[rel] = sorted(json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(path).to_pylist())
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                out[rel] = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                            for m in tar.getmembers() if m.isfile()}
        elif path.suffix in (".json", ".done") and not path.name.endswith("_stats.json"):
            out[rel] = unmeasured(json.loads(path.read_text()))
    return out


MEASURED = {"seconds", "task_peak_mb"}  # how long and how much memory a run took: not what it produced


def unmeasured(value):
    if isinstance(value, dict):
        return {k: unmeasured(v) for k, v in value.items() if k not in MEASURED}
    return value


def serve_and_curate(overrides: list[str]) -> None:
    """The curate flow on the synthetic source, served while it runs (as the demo does)."""
    cfg = load_config("configs/demo.yaml", overrides)
    with SyntheticSource(cfg.source.synthetic, cfg.source.path, cfg.download.timeout):
        curate_module.curate(config="configs/demo.yaml", overrides=overrides)


@pytest.fixture
def no_task_retries(monkeypatch):
    """Fail fast: Prefect's own task retries (with their backoff) would only repeat the failure."""
    monkeypatch.setattr(curate_module, "download_task", curate_module.download_task.with_options(retries=0))


@pytest.mark.slow
def test_rerun_after_a_failed_shard_redoes_only_that_shard(ray_local, tmp_path, no_task_retries):
    source = tmp_path / "source.parquet"  # shared, so that both runs fetch the same URLs
    reference = tmp_path / "reference"
    serve_and_curate(overrides(reference, source))

    run = tmp_path / "interrupted"
    cfg = load_config("configs/demo.yaml", overrides(run, source))
    store = ShardStore(cfg.data_root)
    with SyntheticSource(cfg.source.synthetic, cfg.source.path, cfg.download.timeout):
        shards = download.prepare(cfg.source, cfg.download, store, cfg.ray)
    assert shards == ["00000", "00001", "00002"]
    # One input shard becomes unreadable: its task fails on every try, the others finish.
    broken = Path(store.path(download.INPUT, "00001.parquet"))
    good = broken.read_bytes()
    broken.write_bytes(b"not a parquet file")
    # The flow finishes every other shard and stage, counts the lost rows, then ends Failed.
    with pytest.raises(ShardFailures, match="download shard 00001"):
        serve_and_curate(overrides(run, source))
    assert sorted(store.done_shards("download")) == ["00000", "00002"]
    assert store.exists("download", "00001.failed") and store.done_shards("tokens/256")
    funnel = pq.read_table(run / "data" / "reports" / "funnel.parquet").to_pylist()
    assert {"stage": "download", "outcome": "failed", "reason": "shard_failed", "count": 10} in funnel
    finished = {s: Path(store.path("download", f"{s}.tar")).stat().st_mtime_ns for s in ("00000", "00002")}

    broken.write_bytes(good)
    serve_and_curate(overrides(run, source))
    # The finished shards were not redone, and the result is the uninterrupted run's.
    assert {s: Path(store.path("download", f"{s}.tar")).stat().st_mtime_ns for s in finished} == finished
    assert contents(run / "data") == contents(reference / "data")
    funnel = pq.read_table(run / "data" / "reports" / "funnel.parquet").to_pylist()
    assert {"stage": "download", "outcome": "downloaded", "reason": "", "count": 30} in funnel
