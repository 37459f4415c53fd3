"""A local Ray stays on this machine: no cloud-metadata probe, and exactly the loopback listeners
docs/configs.md lists.

Each start runs in a child process inside a network namespace of its own (nested in the one of
tests/test_netns.py), where 169.254.169.254 is a local address with a listener on port 80 that
counts connections, and where no other Ray holds Ray's fixed ports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
INNER = 'ip link set lo up && ip addr add 169.254.169.254/32 dev lo && exec "$@"'

# argv[1]: "tessera" starts Ray through init_ray, as every stage does, and runs tasks; "plain"
# starts Ray as it comes (usage stats off). Then it waits for the dashboard's usage-stats module
# to have run (it is the one that probes), and prints the listening sockets of every process of
# that Ray (this process and its descendants) and the connections the metadata listener saw.
CHILD = r"""
import json, os, socket, sys, threading, time

seen = []
server = socket.create_server(("169.254.169.254", 80))

def serve():
    while True:
        conn, peer = server.accept()
        seen.append(peer[0])
        with conn:
            conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")

threading.Thread(target=serve, daemon=True).start()
import ray

if sys.argv[1] == "tessera":
    from tessera.config.ray import RayConfig
    from tessera.core.raytools import init_ray

    init_ray(RayConfig(num_cpus=2))
    pid = ray.remote(lambda: os.getpid())
    ray.get([pid.remote() for _ in range(4)])
else:
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
log = os.path.join(os.environ["RAY_TMPDIR"], "ray", "session_latest", "logs", "dashboard.log")
deadline = time.time() + 120
while not (os.path.exists(log) and "Usage reporting is" in open(log).read()):
    if time.time() > deadline:
        sys.exit("the dashboard's usage-stats module never ran")
    time.sleep(0.2)
import psutil  # Ray's own dependency

listeners = []
me = psutil.Process()
for proc in [me, *me.children(recursive=True)]:
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())
        conns = proc.net_connections(kind="inet")
    except psutil.Error:
        continue
    listeners += [{"pid": proc.pid, "name": name, "cmd": cmd, "ip": c.laddr.ip, "port": c.laddr.port,
                   "driver": proc.pid == me.pid} for c in conns
                  if c.status == psutil.CONN_LISTEN and c.laddr.ip != "169.254.169.254"]
print("RESULT " + json.dumps({"listeners": listeners, "metadata_connections": seen}))
ray.shutdown()
"""


def start_ray(tmp_path: Path, mode: str) -> dict:
    """Start a local Ray in a fresh namespace, with a fresh home; its listeners and the metadata
    listener's connections."""
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as raytmp:  # short: socket paths have a limit
        env["RAY_TMPDIR"] = raytmp
        proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", INNER, "ray-netns",
                               sys.executable, "-c", CHILD, mode],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "home": home}


def kind_of(listener: dict) -> str:
    """Which Ray process a listener belongs to (agents and workers rename themselves)."""
    name, cmd = listener["name"], listener["cmd"]
    if listener["driver"]:
        return "driver"
    if name in ("gcs_server", "raylet"):
        return name
    if cmd.startswith("ray::DashboardAgent"):
        return "dashboard agent"
    if cmd.startswith("ray::RuntimeEnvAgent"):
        return "runtime env agent"
    if cmd.startswith("ray::"):
        return "worker"
    if "monitor.py" in cmd:
        return "autoscaler monitor"
    if "dashboard.py" in cmd:
        return "dashboard"
    return f"unknown: {cmd[:80]}"


def documented_listeners() -> dict[str, int]:
    """The table under "Ray's listeners" in docs/configs.md: process -> listeners per process."""
    text = (REPO / "docs" / "configs.md").read_text()
    section = text.split("## Ray's listeners", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| 127\.0\.0\.1 \|", section, re.M)
    assert rows, "no listener table in the section"
    return {kind: int(n) for kind, n in rows}


@pytest.fixture(scope="module")
def our_ray(tmp_path_factory):
    """One start of a local Ray through `init_ray`."""
    return start_ray(tmp_path_factory.mktemp("ours"), "tessera")


@pytest.mark.netns
def test_local_ray_listens_on_loopback_exactly_as_the_docs_say(our_ray):
    listeners = our_ray["listeners"]
    assert not [l for l in listeners if l["ip"] not in LOOPBACK], listeners
    counts: dict[int, int] = {}
    for l in listeners:
        counts[l["pid"]] = counts.get(l["pid"], 0) + 1
    per_process: dict[str, set[int]] = {}
    for l in listeners:
        per_process.setdefault(kind_of(l), set()).add(counts[l["pid"]])
    assert per_process == {kind: {n} for kind, n in documented_listeners().items()}, listeners


@pytest.mark.netns
def test_starting_a_local_ray_sends_nothing_to_the_metadata_address(our_ray, tmp_path):
    assert our_ray["metadata_connections"] == []
    assert (our_ray["home"] / "ray_bootstrap_config.yaml").read_text().strip() == "{}"
    # The control: Ray as it comes does probe, and the listener sees it.
    plain = start_ray(tmp_path, "plain")
    assert plain["metadata_connections"], "plain Ray did not probe 169.254.169.254: this test cannot see a probe"


def test_an_existing_bootstrap_config_is_left_alone(tmp_path):
    from tessera.core.localray import ensure_bootstrap_config

    (tmp_path / "ray_bootstrap_config.yaml").write_text("cluster_name: mine\n")
    ensure_bootstrap_config(tmp_path)
    assert (tmp_path / "ray_bootstrap_config.yaml").read_text() == "cluster_name: mine\n"
