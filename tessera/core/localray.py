"""What a local Ray needs so that it stays on this machine: no cloud-metadata probe, loopback listeners.

Ray's dashboard (always started, even without the dashboard UI) asks three cloud metadata services
which cloud it runs on unless `~/ray_bootstrap_config.yaml` exists, usage stats on or off. A
`ray start` head also sends one "usage stats disabled" report to usage-stats.ray.io. And
`--node-ip-address=127.0.0.1` alone is replaced by the machine's routable address, so GCS and
raylet listen on every interface; only Ray's single-machine mode keeps the node on 127.0.0.1.

`LOCAL_RAY_ENV` and the bootstrap file are for a Ray that starts here and stays single-node.
Never set them for a node that joins or heads a multi-node cluster: its nodes must reach each other.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tessera.core.secretfile import secret_file

log = logging.getLogger(__name__)

LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # The one "disabled" report of a `ray start` head goes to the discard port of this machine.
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    # Single-machine mode (Ray's default on macOS and Windows): the node address stays 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray Train's watcher waits for an autoscaler to drain nodes, which never happens to one machine;
    # starting it prints a core-worker error about its restart arguments on every training run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"


def ensure_bootstrap_config(home: str | os.PathLike | None = None) -> Path:
    """Create `~/ray_bootstrap_config.yaml` as `{}` when it does not exist; never touch an existing one.

    With the file present Ray reads the cluster description from it instead of probing metadata
    services. On a cluster-launcher head the launcher's own file is there already and is kept."""
    path = Path(home if home is not None else os.path.expanduser("~")) / BOOTSTRAP_CONFIG
    try:
        with open(path, "x") as f:
            f.write("{}\n")
        log.info("Created %s ({}) so that Ray does not probe cloud metadata services.", path)
    except FileExistsError:
        pass
    return path


def ensure_ray_token(home: str | os.PathLike | None = None) -> Path:
    """`~/.ray/auth_token`, created 0600 when missing (Ray itself would create it readable by every
    user of the machine), an existing one narrowed to 0600. Returns its path."""
    path = Path(home if home is not None else os.path.expanduser("~")) / ".ray" / "auth_token"
    secret_file(path)
    return path


def local_ray_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process that starts a local Ray (`ray start --head`, a test's head)."""
    env = dict(os.environ if base is None else base)
    ensure_bootstrap_config(env.get("HOME") or None)
    if env.get("RAY_AUTH_MODE", "token") == "token" and not (env.get("RAY_AUTH_TOKEN_PATH") or env.get("RAY_AUTH_TOKEN")):
        ensure_ray_token(env.get("HOME") or None)
    env.update(LOCAL_RAY_ENV)
    return env


def prepare_local_ray() -> None:
    """Set up this process to start a local Ray with `ray.init`: the bootstrap file, the variables
    (inherited by every Ray process it starts), and single-machine mode in this process too, which
    Ray reads once at import."""
    ensure_bootstrap_config()
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN")):
        ensure_ray_token()
    os.environ.update(LOCAL_RAY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
