"""Crashes that land mid-write: a process killed (SIGKILL, as kill -9 or a power cut leaves it)
at a fixed point of a shard's writes, then a rerun, ends exactly where an uninterrupted run does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from tessera.core import runtime
from tessera.core.crashpoints import ENV
from tessera.core.store import ShardStore

REPO = Path(__file__).resolve().parent.parent
SHARDS = ["00000", "00001", "00002", "00003"]
FINGERPRINTS = {s: f"fp-{s}" for s in SHARDS}


def two_outputs(store: ShardStore, shard: str) -> dict:
    """A work with two outputs per shard, both derived from the shard's name."""
    n = int(shard) + 3
    store.write_table(pa.table({"i": list(range(n)), "text": [f"{shard}-{i}" for i in range(n)]}), "toy", f"{shard}.parquet")
    store.write_bytes(f"shard {shard}: {n} rows\n".encode(), "toy", f"{shard}.txt")
    return {"rows_in": n}


WORKER = """
import sys
from tessera.core import runtime
from tessera.core.store import ShardStore
from tests.test_crash_points import FINGERPRINTS, SHARDS, two_outputs
store = ShardStore(sys.argv[1])
for shard in SHARDS:
    runtime.process_shard(two_outputs, store, "toy", shard, FINGERPRINTS[shard], {}, {}, {})
"""


def crash(root: Path, at: str) -> subprocess.CompletedProcess:
    """Run the shards in order in a process of their own, killed at the crash point `at`."""
    env = {**os.environ, ENV: at, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", WORKER, str(root)], cwd=REPO, env=env, capture_output=True,
                          timeout=300)


def state(store: ShardStore) -> dict[str, object]:
    """Every file of the stage: outputs by their bytes, markers without their timing."""
    files = {}
    for name in sorted(store.list("toy")):
        if name.endswith(".done"):
            files[name] = {k: v for k, v in store.read_json("toy", name).items() if k != "seconds"}
        else:
            files[name] = store.fs.cat(store.path("toy", name))
    return files


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_local):
    store = ShardStore(str(tmp_path_factory.mktemp("uninterrupted")))
    runtime.run_stage("toy", store, SHARDS, two_outputs, fingerprints=FINGERPRINTS)
    return state(store)


@pytest.mark.parametrize("at, done, left", [
    # Both outputs of 00001 in place, its marker not yet written: the shard is not done.
    ("before_marker:toy:00001", ["00000"], {"00001.parquet", "00001.txt"}),
    # 00002's first output written under its temporary name: nothing of it is in place.
    ("mid_output:toy:00002", ["00000", "00001"], set()),
])
def test_a_rerun_after_a_kill_equals_an_uninterrupted_run(at, done, left, tmp_path, uninterrupted, ray_local):
    root = tmp_path / "data"
    proc = crash(root, at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = ShardStore(str(root))
    assert store.done_shards("toy") == done
    names = set(os.listdir(root / "toy"))
    shard = at.rsplit(":", 1)[1]
    assert {n for n in names if n.startswith(shard) and ".tmp-" not in n} == left
    if at.startswith("mid_output"):
        assert any(n.startswith(f"{shard}.parquet.tmp-") for n in names)  # what the kill left behind
    rerun = runtime.run_stage("toy", store, SHARDS, two_outputs, fingerprints=FINGERPRINTS)
    assert rerun.skipped == len(done)
    assert not [n for n in os.listdir(root / "toy") if ".tmp-" in n]
    assert state(store) == uninterrupted


def test_markers_and_outputs_are_fsynced_before_they_count(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = ShardStore(str(tmp_path / "data"))
    store.write_bytes(b"output", "toy", "00000.txt")
    store.mark_done("toy", "00000", {"rows_in": 1})
    folder = str(tmp_path / "data" / "toy")
    # Each file's data before its rename, then the folder that holds the rename; the marker last.
    assert [os.path.basename(p).split(".tmp-")[0] if ".tmp-" in p else p for p in synced] == [
        "00000.txt", folder, "00000.done", folder]
    assert store.read_json("toy", "00000.done") == {"rows_in": 1}
