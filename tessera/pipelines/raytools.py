"""Ray plumbing shared by the stages: connect, and run one task per shard with retries."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from tessera.config.ray import RayConfig
from tessera.pipelines.localray import prepare_local_ray

log = logging.getLogger(__name__)

# Set in every worker: nothing phones home, nothing asks a hub, and Ray Train workers stay in
# the job's working directory, so relative paths in a config mean the same there as in the driver.
WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}


class ShardFailures(RuntimeError):
    """Some shards failed after every retry; the others finished and are marked done."""

    def __init__(self, stage: str, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  shard {s}: {e}" for s, e in sorted(failures.items())[:20])
        super().__init__(
            f"{stage}: {len(failures)} shard(s) failed after all retries; rerun to redo only those.\n{lines}"
        )


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by the config (or RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update(WORKER_ENV)
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("Connecting to the Ray cluster at %s.", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("Starting a local Ray with %s CPUs.", cfg.num_cpus or "all")
        # No cloud-metadata probe, and every listener on 127.0.0.1 (README, "Ray's listeners").
        prepare_local_ray()
        # The dashboard serves the state API, which Ray Train uses to clean up after a crashed
        # run; it and the node address stay on loopback.
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=False,
                 _node_ip_address="127.0.0.1")


def run_shards(
    stage: str,
    fn: Callable[..., Any],
    shards: Iterable[tuple[str, tuple]],
    *,
    max_in_flight: int,
    retries: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    on_result: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Run `fn(*args)` as one Ray task per shard, at most `max_in_flight` at once.

    A task that raises is retried up to `retries` times. Shards that still fail are collected
    and raised together as ShardFailures after every other shard has finished.
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries,
                        retry_exceptions=True)(fn)
    todo = list(shards)
    pending: dict[Any, str] = {}
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    with tqdm(total=len(todo), desc=stage, unit="shard") as bar:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                name, args = todo.pop(0)
                pending[remote.remote(*args)] = name
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                results[name] = ray.get(ready[0])
                if on_result:
                    on_result(name, results[name])
            except Exception as e:  # noqa: BLE001 - one shard never stops the others
                failures[name] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                log.error("%s: shard %s failed after %d retries: %s", stage, name, retries, failures[name])
            bar.update(1)
    if failures:
        raise ShardFailures(stage, failures)
    return results
