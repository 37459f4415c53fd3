"""Crashes that land mid-write: a process killed (SIGKILL, as kill -9 or a power cut leaves it)
at a fixed point of a shard's writes, then a rerun, ends exactly where an uninterrupted run does."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tessera.core import runtime
from tessera.core.crashpoints import ENV
from tessera.core.store import ShardStore
from tessera.demo.codes import write_synthetic_codes
from tessera.pipelines import select, select_reference, train
from tessera.training.checkpoint import (
    DONE,
    TRAIN_STATE,
    Checkpointer,
    checkpoint_steps,
    latest_checkpoint,
    read_checkpoint_any,
)
from tests.test_select import cfg
from tests.test_select_scale import skewed_shards
from tests.test_train import _config

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


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths fsynced from here on, in order."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_markers_and_outputs_are_fsynced_before_they_count(tmp_path, synced):
    store = ShardStore(str(tmp_path / "data"))
    store.write_bytes(b"output", "toy", "00000.txt")
    store.mark_done("toy", "00000", {"rows_in": 1})
    folder = str(tmp_path / "data" / "toy")
    # Each file's data before its rename, then the folder that holds the rename; the marker last.
    assert [os.path.basename(p).split(".tmp-")[0] if ".tmp-" in p else p for p in synced] == [
        "00000.txt", folder, "00000.done", folder]
    assert store.read_json("toy", "00000.done") == {"rows_in": 1}


TRAIN_WORKER = """
import sys
from pathlib import Path
import torch
from tessera.pipelines import train
from tests.test_crash_points import TRAIN_STEPS
from tests.test_train import _config
torch.set_num_threads(1)
train.run(_config(Path(sys.argv[1]), TRAIN_STEPS), "stage1", run_name="cut")
"""
TRAIN_STEPS = {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2}


@pytest.mark.usefixtures("one_thread")
def test_a_training_killed_inside_a_checkpoint_save_resumes_from_the_last_whole_one(tmp_path):
    """Killed while DCP writes step 4's checkpoint (its parts on disk, its .metadata not): the
    half-written folder is never loaded, the rerun resumes from step 2 and ends where an
    uninterrupted run ends."""

    write_synthetic_codes(ShardStore(str(tmp_path / "data")), 256, shards=2, per_shard=6, vocab=64, caption_dim=32)
    whole = train.run(_config(tmp_path, TRAIN_STEPS), "stage1", run_name="whole")
    expected = [m["loss"] for m in train.read_metrics(whole.run_dir)]

    env = {**os.environ, ENV: "checkpoint_parts:checkpoint:step-00000004", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", TRAIN_WORKER, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cut = ShardStore(str(tmp_path / "runs" / "cut" / "stage1"))
    half = set(os.listdir(cut.path("checkpoints", "step-00000004")))
    assert TRAIN_STATE in half and any(n.endswith(".distcp") for n in half) and DONE not in half
    assert checkpoint_steps(cut) == [2] and latest_checkpoint(cut).endswith("step-00000002")

    resumed = train.run(_config(tmp_path, TRAIN_STEPS), "stage1", run_name="cut")
    assert [m["step"] for m in train.read_metrics(resumed.run_dir)] == list(range(1, 7))
    assert [m["loss"] for m in train.read_metrics(resumed.run_dir)] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert checkpoint_steps(ShardStore(resumed.run_dir)) == [4, 6]
    a, b = read_checkpoint_any(whole.checkpoint), read_checkpoint_any(resumed.checkpoint)
    assert a["data"] == b["data"] and a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_a_checkpoint_is_fsynced_part_by_part_with_its_metadata_last(tmp_path, synced):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    run = ShardStore(str(tmp_path / "run"))
    Checkpointer(run, keep=2).save(1, model, optimizer, {"data": {}})
    folder = run.path("checkpoints", "step-00000001")
    names = [p if os.path.isdir(p) else os.path.basename(p).split(".tmp-")[0] for p in synced]
    assert names[0] == "train.json" and any(n.endswith(".distcp") for n in names)
    # Every part before the metadata; the metadata's rename and the new folder made durable last.
    assert names[-3:] == [".metadata.tmp", folder, run.path("checkpoints")]
    assert max(i for i, n in enumerate(names) if n.endswith(".distcp")) < names.index(".metadata.tmp")
    assert checkpoint_steps(run) == [1]


SELECT_SHARDS = [f"{i:05d}" for i in range(4)]
SELECT_DRIVER = """
import sys
from tessera.config.ray import RayConfig
from tessera.core.raytools import init_ray
from tessera.core.store import ShardStore
from tessera.pipelines import select
from tests.test_crash_points import select_config
init_ray(RayConfig(num_cpus=1))
select.run(select_config(), ShardStore(sys.argv[1]))
"""


def select_config():
    # One shard per exchange task and two partitions: every pass has more than one task to cut between.
    return cfg(clip_score={"min": 0.3}, target={"count": 120, "rank_by": "clip_score"},
               dedup={"enabled": True, "exact": True, "min_similarity": 0.99, "n_clusters": 3, "partitions": 2,
                      "spill_margin": 0.3, "block": 32, "shards_per_task": 1})


def selection(store: ShardStore) -> tuple:
    """Every sample's decision and the run's thresholds, counts and target (not its timings)."""
    frame = select_reference.load_scores(store, SELECT_SHARDS, decisions=True)
    summary = store.read_json("reports", "thresholds.json")
    return (frame[["shard", "key", "keep", "reason", "duplicate_of"]].to_dict("list"),
            {k: summary[k] for k in ("fingerprint", "samples", "kept", "dropped", "filters", "target")})


@pytest.fixture(scope="module")
def select_inputs(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("select")
    skewed_shards(ShardStore(str(root / "pristine")), np.random.default_rng(5), shards=len(SELECT_SHARDS),
                  per_shard=60)
    shutil.copytree(root / "pristine", root / "uninterrupted")
    whole = ShardStore(str(root / "uninterrupted"))
    result = select.run(select_config(), whole)
    assert result.dropped["exact_duplicate"] and result.dropped["near_duplicate"]  # both passes decide something
    return root, selection(whole)


@pytest.mark.slow
@pytest.mark.parametrize("at", [
    "after_result:dedup-exact:00000",   # exact dedup: one partition searched, the other not
    "after_result:dedup-search:00000",  # semantic dedup: one partition searched, the other not
    "after_result:select:00001",        # apply: some shards decided and marked, the rest not
])
def test_select_killed_in_a_pass_reruns_to_the_uninterrupted_decisions(at, tmp_path, select_inputs):

    root, uninterrupted = select_inputs
    shutil.copytree(root / "pristine", tmp_path / "data")
    env = {**os.environ, ENV: at, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "driver.log", "wb") as log:  # not a pipe: the local Ray's processes hold it too
        proc = subprocess.Popen([sys.executable, "-c", SELECT_DRIVER, str(tmp_path / "data")], cwd=REPO, env=env,
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the local Ray the driver started
            except ProcessLookupError:
                pass
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-2000:]
    store = ShardStore(str(tmp_path / "data"))
    assert not store.exists("reports", "thresholds.json")
    decided = len(store.done_shards("select"))
    # Killed after two shards were decided (a shard already running may have finished as it died).
    assert decided >= 2 if at.startswith("after_result:select") else decided == 0
    select.run(select_config(), store)
    assert selection(store) == uninterrupted
    assert not [p for p in (tmp_path / "data").rglob("*") if ".tmp-" in p.name]
