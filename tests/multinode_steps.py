"""The demo's curation on a real multi-node Ray on this machine, in one fresh process:

    python -m tests.multinode_steps OUT.json CONFIG ROOT OVERRIDE_JSON

A head with no CPUs and two worker nodes, each with its own raylet, object store and one CPU, all on
127.0.0.1 (Ray's single-machine mode, no cloud-metadata probe). The curation runs twice: once
uninterrupted into ROOT/whole, once into ROOT/lost while nodes are lost. One worker node is killed
(its raylet and worker processes, SIGKILL, by PID) as soon as it runs a task shard; a fresh node
then joins, and is killed the same way as soon as it runs a shard of a later stage (one of the
model actors' stages: score, caption or tokenize); a last node then joins, as an autoscaler would
bring one. OUT.json receives what each run produced and what was killed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time

import ray
from ray import ray_constants
from ray.cluster_utils import Cluster

from tessera.core.localray import prepare_local_ray
from tests.flow_steps import contents, serve_and_curate

# A node is marked dead after 10 missed checks a second apart: a killed one is found in 10 s, and a
# live one that a loaded machine stalls for a few seconds is not taken for dead.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 10}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


# Ray titles a worker process after what it runs: a task, or an actor's method while it runs.
A_TASK_SHARD, AN_ACTOR_SHARD = b"ray::process_batch", b"ray::ShardActor.process"


def running(raylet_pid: int, title: bytes) -> bool:
    """Whether a worker of this raylet is running what `title` names."""
    for child in _children(raylet_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if title in f.read():
                    return True
        except OSError:
            continue
    return False


def kill_when_busy(raylet_pid: int, title: bytes, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running(raylet_pid, title):
            # The whole node goes at once: its worker processes (which could otherwise still hand
            # a finished shard to the driver) and its raylet.
            for pid in [*_children(raylet_pid), raylet_pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            logging.getLogger("multinode").warning("Killed raylet %d and its workers while it ran %s.", raylet_pid,
                                                   title.decode())
            return {"pid": raylet_pid, "running": title.decode(), "at": time.time()}
        time.sleep(0.2)
    return {}


def _raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def add_node(cluster: Cluster):
    """A worker node added from this (non-main) thread. Ray's Node installs a SIGTERM handler,
    which only the main thread may do; the main thread's handler (the head's) stays in place."""
    hook = ray._private.utils.set_sigterm_handler
    ray._private.utils.set_sigterm_handler = lambda handler: None
    try:
        return cluster.add_node(num_cpus=1)
    finally:
        ray._private.utils.set_sigterm_handler = hook


def lose_nodes(cluster: Cluster, victim, killed: list, run_over: threading.Event) -> None:
    """Kill `victim` in the first stage, then a node that joins after it in a model actors' stage.
    Returns when the run is over: Ray starts a node's processes to die with the thread that
    started them (PR_SET_PDEATHSIG), so the nodes this thread adds live only as long as it does."""
    first = kill_when_busy(_raylet_pid(victim), A_TASK_SHARD)
    if first:
        killed.append(first)
        second = kill_when_busy(_raylet_pid(add_node(cluster)), AN_ACTOR_SHARD)
        killed.append(second)
        if second:  # a node comes back, as an autoscaler brings one: the dead actor's replacement needs a CPU
            add_node(cluster)
    run_over.wait()


def main(out_path: str, config: str, root: str, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_local_ray()  # before any node starts: every node on 127.0.0.1, no metadata probe
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": SYSTEM_CONFIG})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        on_cluster = [*overrides, f"ray.address={cluster.address}"]
        serve_and_curate(config, [*on_cluster, f"data_root={root}/whole/data", f"runs_root={root}/whole/runs"])
        killed: list = []
        run_over = threading.Event()
        watcher = threading.Thread(target=lose_nodes, args=(cluster, workers[1], killed, run_over), daemon=True)
        watcher.start()
        try:
            serve_and_curate(config, [*on_cluster, f"data_root={root}/lost/data", f"runs_root={root}/lost/runs"])
        finally:
            run_over.set()
        with open(out_path, "w") as f:
            json.dump({"killed": killed, "whole": contents(f"{root}/whole/data"),
                       "lost": contents(f"{root}/lost/data")}, f)
    finally:
        ray.shutdown()  # the driver leaves before its head node goes
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
