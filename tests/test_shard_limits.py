"""Per-stage limits: a hung shard is ended after shard_timeout_s and retried like any failure, and
the tasks in flight follow the shards and the config, not the CPUs present."""
from __future__ import annotations

import time
from pathlib import Path

from tessera.config import load_config
from tessera.config.ray import RayConfig, StageLimits
from tessera.core import runtime
from tessera.core.raytools import init_ray
from tessera.core.store import ShardStore


def hang_on_first_attempts(store: ShardStore, shard: str, hangs: dict[str, int], log_dir: str) -> dict:
    """Hangs (sleeps far past any timeout) on the first `hangs[shard]` attempts at a shard."""
    attempts = Path(log_dir) / shard
    attempts.mkdir(parents=True, exist_ok=True)
    n = len(list(attempts.iterdir()))
    (attempts / str(n)).touch()
    if n < hangs.get(shard, 0):
        time.sleep(3600)
    store.write_bytes(shard.encode(), "out", shard)
    return {"rows_in": 1}


def test_a_hung_shard_is_ended_retried_then_recorded_as_failed(ray_local, tmp_path):
    init_ray(RayConfig(stages={"hang": StageLimits(shard_timeout_s=3)}))  # Ray is up: only the limits apply
    try:
        store = ShardStore(str(tmp_path / "data"))
        shards = ["00000", "00001", "00002"]
        hangs = {"00001": 1, "00002": 99}  # 00001 hangs once, 00002 every time
        start = time.monotonic()
        ran = runtime.run_stage("hang", store, shards, hang_on_first_attempts, retries=1,
                                kwargs={"hangs": hangs, "log_dir": str(tmp_path / "attempts")})
        assert time.monotonic() - start < 120
        assert sorted(ran.done) == ["00000", "00001"] and list(ran.failed) == ["00002"]
        assert "shard_timeout_s=3" in ran.failed["00002"]
        failure = runtime.failures(store, "hang")["00002"]
        assert failure["attempts"] == 2 and "shard_timeout_s" in failure["error"]
        attempts = {s: len(list((tmp_path / "attempts" / s).iterdir())) for s in shards}
        assert attempts == {"00000": 1, "00001": 2, "00002": 2}
        assert store.is_done("hang", "00001") and not store.is_done("hang", "00002")
    finally:
        runtime.set_stage_limits({})


def test_tasks_in_flight_follow_the_shards_and_the_config():
    none = StageLimits()
    assert runtime.in_flight_limit(10, None, none) == 10  # every shard, whatever the CPUs
    assert runtime.in_flight_limit(50_000, None, none) == runtime.DEFAULT_MAX_IN_FLIGHT
    assert runtime.in_flight_limit(500, 64, none) == 64  # the stage's own default
    assert runtime.in_flight_limit(500, 64, StageLimits(max_in_flight=256)) == 256  # the config wins
    cfg = load_config("configs/demo.yaml", ["ray.stages.select.max_in_flight=8",
                                            "ray.stages.select:dedup-search.shard_timeout_s=30"])
    runtime.set_stage_limits(cfg.ray.stages)
    try:
        assert runtime.stage_limits("select").max_in_flight == 8
        assert runtime.stage_limits("select:stats").max_in_flight == 8  # a pass takes its stage's
        assert runtime.stage_limits("select:dedup-search").shard_timeout_s == 30
        assert runtime.stage_limits("score") == StageLimits()
    finally:
        runtime.set_stage_limits({})
