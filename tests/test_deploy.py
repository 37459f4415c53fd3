"""Deployments against a real Prefect server on 127.0.0.1: register, run through a worker, COMPLETED."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tessera.config import load_config
from tessera.demo.synthetic import SyntheticSource
from tessera.flows import deploy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALL = ["source.synthetic.num_images=20", "source.synthetic.bad_records=false",
         "download.shard_size=10", "download.timeout=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this test started, and the children in its session."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Until the Prefect server at `url` answers its health probe (which needs no auth)."""
    deadline = time.time() + 240  # a busy machine can take minutes to migrate a fresh database
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            pytest.fail(f"the Prefect server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server (SQLite) on a free 127.0.0.1 port, with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}/api"
    wait_until_healthy(proc, url, log)
    yield {"url": url, "env": {**env, "PREFECT_API_URL": url}, "home": home}
    stop(proc)


def api(server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server["url"]})


def small_overrides(tmp_path) -> list[str]:
    return [f"data_root={tmp_path}/data", f"runs_root={tmp_path}/runs", f"models_root={tmp_path}/models",
            f"source.path={tmp_path}/source.parquet", *SMALL]


def register(server, tmp_path, *extra: str) -> list[str]:
    overrides = small_overrides(tmp_path)
    sets = [a for o in overrides for a in ("--set", o)]
    with api(server):
        assert deploy.main(["--pool", "tessera-test", "--config", "configs/demo.yaml", *sets,
                            "--working-dir", str(REPO), *extra]) == 0
    return overrides


def test_make_deploy_registers_every_flow_with_the_work_pool(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    overrides = register(prefect_server, tmp_path)
    with api(prefect_server), get_client(sync_client=True) as client:
        pool = client.read_work_pool("tessera-test")
        assert pool.type == "process"
        assert pool.base_job_template["variables"]["properties"]["env"]["default"]["HF_HUB_OFFLINE"] == "1"
        for name in deploy.FLOWS:
            d = client.read_deployment_by_name(f"{name}/{name}")
            assert d.work_pool_name == "tessera-test"
            assert d.parameters == {"config": "configs/demo.yaml", "overrides": overrides}
            assert d.entrypoint == deploy.FLOWS[name].replace(":", ".")
            assert d.job_variables["working_dir"] == str(REPO)
        # A run cannot bring its own command for the worker to run: the pool refuses the variable.
        d = client.read_deployment_by_name("curate/curate")
        with pytest.raises(Exception, match="command"):
            client.create_flow_run_from_deployment(d.id, job_variables={"command": "sh -c 'id > /tmp/owned'"})
    # Registering again updates in place: the same deployments, no second pool.
    register(prefect_server, tmp_path, "--only", "curate")


@pytest.mark.slow
def test_deployment_runs_to_completed_through_a_worker(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    overrides = register(prefect_server, tmp_path, "--only", "curate")
    with api(prefect_server), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("curate/curate")
        run = client.create_flow_run_from_deployment(deployment.id)

    # The synthetic source is generated and served here, as the demo serves it; the flow run only downloads.
    cfg = load_config("configs/demo.yaml", overrides)
    with SyntheticSource(cfg.source.synthetic, cfg.source.path, cfg.download.timeout):
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "tessera-test", "--type", "process"],
                       {**prefect_server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1"}, tmp_path / "worker.log")
        try:
            deadline = time.time() + 600
            with api(prefect_server), get_client(sync_client=True) as client:
                while True:
                    state = client.read_flow_run(run.id).state
                    if state.is_final() or time.time() > deadline:
                        break
                    time.sleep(1)
                artifacts = {a.key for a in client.read_artifacts() if a.flow_run_id == run.id}
        finally:
            stop(worker)
    assert state.is_completed(), f"flow run ended {state.type}: {(tmp_path / 'worker.log').read_text()[-4000:]}"
    assert (tmp_path / "data" / "download" / "00001.done").exists()
    assert {"download-progress", "funnel"} <= artifacts


def test_build_deployments_names_every_flow_with_its_parameters():
    deployments = deploy.build_deployments("configs/demo.yaml", ["download.shard_size=50"])
    assert [d.name for d in deployments] == list(deploy.FLOWS)
    assert {d.flow_name for d in deployments} == {"curate", "stage1", "stage2", "sample", "eval", "all"}
    for d in deployments:
        assert d.parameters == {"config": "configs/demo.yaml", "overrides": ["download.shard_size=50"]}
        assert d.entrypoint.startswith("tessera.flows.")


def test_build_deployments_refuses_a_broken_config():
    from tessera.config import ConfigError

    with pytest.raises(ConfigError, match="download.shard_sise: unknown key"):
        deploy.build_deployments("configs/demo.yaml", ["download.shard_sise=50"], ["curate"])
