"""The stage runtime with toy works: markers last, skip by fingerprint, retries, failure
isolation, model actors replaced when they die, and nothing but summaries reaching the driver."""
from __future__ import annotations

import os
import pickle

import pytest

from tessera.core import runtime
from tessera.core.store import ShardStore

SHARDS = ["00000", "00001", "00002", "00003"]


def copy_shard(store: ShardStore, shard: str, fail: tuple[str, ...] = (), flaky_dir: str = "") -> dict:
    """A CPU work: input/{shard}.txt -> output/{shard}.txt, upper-cased."""
    if shard in fail:
        raise ValueError(f"shard {shard} is broken")
    if flaky_dir and not os.path.exists(os.path.join(flaky_dir, shard)):
        open(os.path.join(flaky_dir, shard), "w").close()  # fails on the first attempt only
        raise OSError("a transient error")
    text = store.fs.cat(store.path("input", f"{shard}.txt")).decode()
    store.write_bytes(text.upper().encode(), "output", f"{shard}.txt")
    return {"rows_in": len(text.split()), "bytes": len(text)}


class Upper:
    """A model-actor work: loads once, counts its loads, dies on request."""

    def __init__(self, die_on: str = "", flag_dir: str = ""):
        self.die_on, self.flag_dir = die_on, flag_dir
        self.calls = 0

    def __call__(self, store: ShardStore, shard: str) -> dict:
        self.calls += 1
        flag = os.path.join(self.flag_dir, "died")
        if shard == self.die_on and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)  # the actor's process dies mid-shard
        summary = copy_shard(store, shard)
        return {**summary, "calls_in_this_actor": self.calls, "pid": os.getpid()}


@pytest.fixture
def store(tmp_path):
    store = ShardStore(str(tmp_path / "data"))
    for i, shard in enumerate(SHARDS):
        store.write_bytes(" ".join(["word"] * (i + 1)).encode(), "input", f"{shard}.txt")
    return store


def test_markers_summaries_and_skip_by_fingerprint(ray_local, store, monkeypatch):
    monkeypatch.setattr(runtime, "RESTAMP_BATCH", 3)  # restamped in two tasks
    fps = {s: "a" for s in SHARDS}
    run = runtime.run_stage("toy", store, SHARDS, copy_shard, fingerprints=fps, stamp={"selection": "s1"})
    assert sorted(run.done) == SHARDS and not run.failed and run.skipped == 0
    for i, shard in enumerate(SHARDS):
        info = store.done_info("toy", shard)
        assert (info["rows_in"], info["fingerprint"], info["selection"]) == (i + 1, "a", "s1")
        assert store.fs.cat(store.path("output", f"{shard}.txt")) == " ".join(["WORD"] * (i + 1)).encode()
    # Same fingerprints: nothing runs, but the new stamp reaches every marker.
    again = runtime.run_stage("toy", store, SHARDS, copy_shard, fingerprints=fps, stamp={"selection": "s2"})
    assert (again.done, again.skipped) == ({}, 4)
    assert {store.done_info("toy", s)["selection"] for s in SHARDS} == {"s2"}
    # One shard's inputs changed: exactly that shard is redone.
    changed = runtime.run_stage("toy", store, SHARDS, copy_shard, fingerprints={**fps, "00002": "b"})
    assert list(changed.done) == ["00002"] and changed.skipped == 3


def test_a_failing_shard_is_recorded_and_the_others_finish(ray_local, store, tmp_path):
    run = runtime.run_stage("toy", store, SHARDS, copy_shard, kwargs={"fail": ("00001",)}, retries=1)
    assert sorted(run.done) == ["00000", "00002", "00003"]
    assert run.failed == {"00001": "ValueError: shard 00001 is broken"}
    # Bad input (a ValueError) cannot succeed on a retry: one attempt, though one retry was allowed.
    assert runtime.failures(store, "toy") == {"00001": {"stage": "toy", "shard": "00001", "attempts": 1,
                                                         "error": "ValueError: shard 00001 is broken"}}
    assert not store.is_done("toy", "00001") and not store.exists("output", "00001.txt")
    # The rerun redoes exactly the failed shard, and its failure record goes.
    rerun = runtime.run_stage("toy", store, SHARDS, copy_shard)
    assert list(rerun.done) == ["00001"] and rerun.skipped == 3 and runtime.failures(store, "toy") == {}


def test_transient_errors_are_retried(ray_local, store, tmp_path):
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    run = runtime.run_stage("toy", store, SHARDS, copy_shard, kwargs={"flaky_dir": str(flaky)}, retries=1)
    assert sorted(run.done) == SHARDS and not run.failed
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    no_retry = runtime.run_stage("toy2", store, SHARDS, copy_shard, kwargs={"flaky_dir": str(fresh)}, retries=0)
    assert sorted(no_retry.failed) == SHARDS and not no_retry.done


def test_actors_stay_loaded_across_shards_and_a_dead_one_is_replaced(ray_local, store, tmp_path):
    run = runtime.run_stage("toy", store, SHARDS, Upper, kwargs={"die_on": "00001", "flag_dir": str(tmp_path)},
                            actors=1, retries=1)
    assert sorted(run.done) == SHARDS and not run.failed
    # One actor at a time: the first one died on 00001, its replacement did the rest in one process.
    after = [run.done[s] for s in ("00001", "00002", "00003")]
    assert len({s["pid"] for s in after}) == 1 and [s["calls_in_this_actor"] for s in after] == [1, 2, 3]
    assert run.done["00000"]["pid"] != after[0]["pid"]


def test_the_driver_receives_per_shard_summaries_only(ray_local, store, monkeypatch):
    import ray

    received = []
    real_get = ray.get

    def recording_get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        received.append(value)
        return value

    monkeypatch.setattr(ray, "get", recording_get)
    big = " ".join(["word"] * 100_000)
    store.write_bytes(big.encode(), "input", "00003.txt")
    runtime.run_stage("toy", store, SHARDS, copy_shard)
    assert len(received) == len(SHARDS)  # one task per shard, each answering [(ok, summary)]
    summaries = [summary for answer in received for ok, summary in answer if ok]
    assert len(summaries) == len(SHARDS)
    assert all(isinstance(v, dict) and len(pickle.dumps(v)) < 1024 for v in summaries)
    assert any(v["rows_in"] == 100_000 for v in summaries)


def task_of(store: ShardStore, name: str, fail: tuple[str, ...] = (), flaky_dir: str = "") -> dict:
    """A pass's work that answers which Ray task ran it (and fails as copy_shard does)."""
    import ray

    if name in fail:
        raise ValueError(f"{name} is broken")
    if flaky_dir and not os.path.exists(os.path.join(flaky_dir, name)):
        open(os.path.join(flaky_dir, name), "w").close()
        raise OSError("a transient error")
    return {"task": ray.get_runtime_context().get_task_id()}


def test_a_pass_runs_its_names_in_few_tasks_and_a_failing_name_alone(ray_local, store, tmp_path, monkeypatch):
    names = [f"{i:05d}" for i in range(10)]
    monkeypatch.setattr(runtime, "TASKS_PER_PASS", 3)  # 10 names: 4 per task, in 3 tasks
    tasks = {}
    runtime.map_shards("toy:batched", store, names, task_of, fold=lambda n, a: tasks.__setitem__(n, a["task"]))
    assert sorted(tasks) == names
    assert [len([n for n in names if tasks[n] == t]) for t in dict.fromkeys(tasks[n] for n in names)] == [4, 4, 2]
    # A name failing for good fails alone: the others of its task are answered.
    tasks.clear()
    with pytest.raises(runtime.ShardFailures) as failure:
        runtime.map_shards("toy:broken", store, names, task_of, kwargs={"fail": ("00005",)},
                           fold=lambda n, a: tasks.__setitem__(n, a["task"]))
    assert failure.value.failures == {"toy:broken": {"00005": "ValueError: 00005 is broken"}}
    assert sorted(tasks) == [n for n in names if n != "00005"]
    # A transient failure is retried on its own, in a task of its own; the config sets the batch.
    runtime.set_stage_limits({"toy": runtime.StageLimits(shards_per_task=5)})
    try:
        tasks.clear()
        runtime.map_shards("toy:flaky", store, names, task_of, kwargs={"flaky_dir": str(tmp_path)},
                           fold=lambda n, a: tasks.__setitem__(n, a["task"]), retries=1)
    finally:
        runtime.set_stage_limits({})
    assert sorted(tasks) == names and len(set(tasks.values())) == 10  # every name failed once, retried alone


def input_size(store: ShardStore, shard: str) -> int:
    return len(store.fs.cat(store.path("input", f"{shard}.txt")))


def last_bar(err: str) -> str:
    return err.replace("\r", "\n").strip().splitlines()[-1]


def test_bars_count_rows_only_where_the_answers_carry_them(ray_local, store, capfd):
    runtime.run_stage("toy", store, SHARDS, copy_shard, unit="words")
    assert "words=10" in last_bar(capfd.readouterr().err)  # 1 + 2 + 3 + 4 words
    runtime.map_shards("toy:pass", store, SHARDS, copy_shard)  # answers with rows_in: counted
    assert "rows=10" in last_bar(capfd.readouterr().err)
    runtime.map_shards("toy:sizes", store, SHARDS, input_size)  # answers without rows: no row count
    bar = last_bar(capfd.readouterr().err)
    assert bar.startswith("toy:sizes: 100%") and "rows" not in bar and "failed=0" in bar, bar


@pytest.mark.timeout(300)
def test_shards_go_only_to_actors_the_cluster_could_place(ray_local, store, tmp_path):
    """Three one-CPU actors on a two-CPU Ray: the third cannot start, and no shard waits on it."""
    run = runtime.run_stage("toy", store, SHARDS, Upper, kwargs={"flag_dir": str(tmp_path)}, actors=3)
    assert sorted(run.done) == SHARDS and not run.failed
    assert len({s["pid"] for s in run.done.values()}) <= 2
