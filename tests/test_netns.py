"""Runs every `netns` test inside a fresh network namespace with only loopback up.

Those tests name private, link-local, metadata or public addresses. In a namespace of its own
nothing they do can leave the machine, even if the guard under test has a bug. A private mount
namespace lets them give test host names (in HOSTS below) addresses of their choosing.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Names the guard must judge by the address they resolve to, not by their spelling.
HOSTS = """127.0.0.1 localhost
::1 localhost
10.1.2.3 evil.test
169.254.169.254 metadata-alias.test
169.254.169.254 metadata.google.internal
"""  # metadata.google.internal: so that GCP's probe, too, reaches tests/test_ray_local.py's listener
INNER = 'ip link set lo up && mount --bind "$1" /etc/hosts && shift && exec "$@"'


def test_netns_suite(tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        if os.environ.get("CI"):
            pytest.fail("CI must run the netns tests: it needs root, unshare and ip (iproute2)")
        pytest.skip("creating a network namespace needs root, unshare and ip (iproute2)")
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    env = {**os.environ, "TESSERA_IN_NETNS": "1"}
    cmd = ["unshare", "--net", "--mount", "--", "sh", "-c", INNER, "netns", str(hosts),
           sys.executable, "-m", "pytest", "-m", "netns", "-q", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail and "error" not in tail.lower().split("passed")[-1], tail


@pytest.mark.netns
def test_we_really_are_in_a_fresh_namespace():
    import socket

    interfaces = [name for _, name in socket.if_nameindex()]
    assert interfaces == ["lo"], interfaces
