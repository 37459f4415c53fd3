"""Ray plumbing shared by the stages: join a cluster or start a local Ray, the same way everywhere."""
from __future__ import annotations

import logging
import os

from tessera.config.ray import RayConfig
from tessera.config.storage import forwarded_env
from tessera.core.localray import prepare_local_ray
from tessera.core.runtime import set_stage_limits

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


def worker_env() -> dict[str, str]:
    """Every Ray worker's environment: WORKER_ENV, and the driver's storage settings and
    credentials (fsspec defaults, AWS_* and GOOGLE_* variables), so that workers open the same
    filesystems the driver does."""
    return {**forwarded_env(), **WORKER_ENV}


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by the config (or RAY_ADDRESS), else start a local Ray."""
    import ray

    set_stage_limits(cfg.stages)
    if ray.is_initialized():
        return
    os.environ.update(WORKER_ENV)
    runtime_env = {"env_vars": worker_env()}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("Connecting to the Ray cluster at %s.", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("Starting a local Ray with %s CPUs.", cfg.num_cpus or "all")
        # No cloud-metadata probe, and every listener on 127.0.0.1 (docs/configs.md, "Ray's listeners").
        prepare_local_ray()
        # The dashboard serves the state API, which Ray Train uses to clean up after a crashed
        # run; it and the node address stay on loopback. address="local": a Ray of our own, never a
        # cluster that a `ray start` on this machine left its address for.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=False,
                 _node_ip_address="127.0.0.1")
