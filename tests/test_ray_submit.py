"""`tessera submit`: the `ray job submit` command line, token auth, and a real job on a local Ray head."""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tessera import submit
from tessera.core.localray import local_ray_env

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_entrypoint_arguments_pass_through_unparsed():
    hostile = "x; touch /tmp/owned $(id) `id` 'q\""
    argv = submit.job_submit_argv(["curate", "--config", "configs/demo.yaml", "--set", f"name={hostile}"],
                                  address="http://127.0.0.1:8265", env={"A": "1 2"}, job_id="j1")
    command = argv[argv.index("--") + 1:]
    assert command == ["python", "-m", "tessera.cli", "curate", "--config", "configs/demo.yaml",
                       "--set", f"name={hostile}"]
    # Ray joins the entrypoint with shlex.join; the head's shell splits it back into the same words.
    assert shlex.split(shlex.join(command)) == command
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env["working_dir"] == "." and ".venv" in env["excludes"] and ".git" in env["excludes"]
    # The driver adds the offline variables when it joins; Ray refuses a job that sets them twice.
    assert env["env_vars"] == {"A": "1 2"}
    assert argv[argv.index("--submission-id") + 1] == "j1"


def test_variables_the_driver_sets_are_refused():
    with pytest.raises(submit.SubmitError, match="HF_HUB_OFFLINE"):
        submit.job_submit_argv(["curate"], address="http://127.0.0.1:8265", env={"HF_HUB_OFFLINE": "0"})


def test_nothing_to_submit_is_an_error():
    with pytest.raises(submit.SubmitError, match="nothing to submit"):
        submit.job_submit_argv([], address="http://127.0.0.1:8265")


def test_token_auth_stays_on_and_needs_a_token(tmp_path):
    with pytest.raises(submit.SubmitError, match="no token was found"):
        submit.auth_environment({}, home=tmp_path)
    env = submit.auth_environment({"RAY_AUTH_TOKEN": "abc"}, home=tmp_path)
    assert env["RAY_AUTH_MODE"] == "token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    assert submit.auth_environment({}, home=tmp_path)["RAY_AUTH_MODE"] == "token"
    with pytest.raises(submit.SubmitError, match="missing or empty"):
        submit.auth_environment({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, home=tmp_path)


def test_cli_reports_a_bad_env_item(capsys):
    from tessera.cli import main

    assert main(["submit", "--env", "NOVALUE", "--", "curate", "--config", "configs/demo.yaml"]) == 2
    assert "--env 'NOVALUE' must look like NAME=VALUE" in capsys.readouterr().err  # before the cluster is asked


# A real cluster -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(proc: subprocess.Popen) -> None:
    """Stop the head this test started (`ray start --block` stops its node on SIGTERM), then any
    process of that node still alive: they all sit in the session the head was started in (the
    agents rename themselves, so nothing else names them). Other Rays are untouched."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with token authentication on, its token in a file of its own."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    # No metadata probe, no usage report, every listener on 127.0.0.1 (docs/configs.md, "Ray's listeners").
    env = local_ray_env({**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                         "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                         "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--num-cpus", "2", "--temp-dir", temp_dir,
            "--include-dashboard", "true", "--disable-usage-stats"]
    log = tmp_path / "head.log"
    proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 240
    try:
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # up, and asking for the token
                break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "env": env, "token": token}
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_status(head, job_id: str) -> str:
    """The job's status as the job API reports it, asked with the head's token."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    out = subprocess.run([sys.executable, "-c", code, head["address"], job_id], env=head["env"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() if out.returncode == 0 else f"error: {out.stderr.strip()[-300:]}"


@pytest.mark.slow
def test_submit_runs_the_demo_flow_on_a_local_head_with_token_auth(ray_head, tmp_path):
    data = tmp_path / "data"
    # The demo serves its synthetic source while its curation runs on the cluster.
    command = ["demo", "--dir", str(tmp_path / "demo"), "--step", "curate", "--set", f"data_root={data}",
               "--set", f"source.path={tmp_path}/source.parquet", "--set", "source.synthetic.num_images=20",
               "--set", "source.synthetic.bad_records=false", "--set", "download.shard_size=10"]
    argv = [sys.executable, "-m", "tessera.cli", "submit", "--address", ray_head["address"],
            "--python", sys.executable, "--submission-id", "tessera-test-curate",
            "--env", f"PREFECT_HOME={tmp_path}/job-prefect", "--", *command]
    done = subprocess.run(argv, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", ray_head["address"],
                               "tessera-test-curate"], env=ray_head["env"], capture_output=True, text=True)
        pytest.fail(f"the job failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\njob log:\n"
                    f"{logs.stdout[-6000:]}{logs.stderr[-2000:]}")
    assert job_status(ray_head, "tessera-test-curate") == "SUCCEEDED"
    assert sorted(p.name for p in (data / "download").glob("*.done")) == ["00000.done", "00001.done"]
    assert (data / "reports" / "funnel.parquet").exists()

    # Without the token, or with a wrong one, nothing is submitted.
    again = argv[:argv.index("--submission-id")] + ["--submission-id", "tessera-test-refused", "--", *command]
    no_token = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there either
    refused = subprocess.run(again, cwd=REPO, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no token was found" in refused.stderr
    refused = subprocess.run(again, cwd=REPO, env={**no_token, "RAY_AUTH_TOKEN": "not-the-token"},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert job_status(ray_head, "tessera-test-refused").startswith("error:")
