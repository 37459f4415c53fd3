"""`tessera submit` / `make submit`: run a tessera command as a Ray job on a cluster.

    tessera submit --address http://HEAD:8265 -- all --config configs/laion_coco_stage1.yaml

The repository (without virtual environments, outputs and weights) is uploaded as the job's
working directory; the command after `--` runs on the head node as the job's driver, with
RAY_ADDRESS pointing at the cluster, so the flow's stages run on the cluster's nodes. The flow
runs in Prefect's ephemeral mode there unless `--env PREFECT_API_URL=...` names a server the
head can reach; Ray workers never talk to Prefect.

Ray's token authentication stays on: the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token (`ray get-auth-token` on the head prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from tessera.core.raytools import WORKER_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Not uploaded with the working directory (beyond what .gitignore already leaves out). The demo's
# world-trained models (a few MB) travel with the code.
EXCLUDES = [".git", ".venv", ".prefect", "demo-output", "bench-output", "*.pth", "*.pt", "*.ckpt",
            "*.safetensors", "*.bin", "!tessera/models/world_weights/**"]


class SubmitError(RuntimeError):
    """The job cannot be submitted as asked."""


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where Ray's clients will read the cluster token from, or None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).is_file() or not Path(path).read_text().strip():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH is set to {path}, which is missing or empty")
        return path
    default = (home or Path.home()) / ".ray" / "auth_token"
    return str(default) if default.is_file() and default.read_text().strip() else None


def auth_environment(environ: dict[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """The environment for `ray job ...` calls: token authentication on, with a token at hand."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"] == "token" and not find_token(env, home):
        raise SubmitError(
            "Ray token authentication is on, but no token was found. Copy the cluster's token "
            "(`ray get-auth-token` on the head node prints it) into ~/.ray/auth_token, or set "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH.")
    return env


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r} must look like NAME=VALUE")
        env[key] = value
    return env


def runtime_env(working_dir: str, env: dict[str, str]) -> dict:
    """The job's runtime env. The driver adds WORKER_ENV itself when it joins the cluster, and
    Ray refuses a job whose driver sets a variable the job already sets: so those are left out."""
    taken = sorted(set(env) & set(WORKER_ENV))
    if taken:
        raise SubmitError(f"{', '.join(taken)}: set for every job already ({WORKER_ENV}); leave them out")
    out = {"working_dir": working_dir, "excludes": EXCLUDES}
    return {**out, "env_vars": dict(env)} if env else out


def submission_id(command: list[str]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"tessera-{command[0] if command else 'job'}-{stamp}-{uuid.uuid4().hex[:6]}"


def job_submit_argv(command: list[str], *, address: str, working_dir: str = ".",
                    env: dict[str, str] | None = None, python: str = "python", job_id: str | None = None,
                    no_wait: bool = False, entrypoint_num_cpus: float | None = None) -> list[str]:
    """The `ray job submit` argument list. The entrypoint goes after `--` as separate arguments,
    which Ray quotes (shlex.join) into the command line the head runs: nothing is re-parsed."""
    if not command:
        raise SubmitError("nothing to submit: give a tessera command after --, e.g. -- all --config FILE")
    ray = Path(sys.executable).with_name("ray")
    argv = [str(ray) if ray.exists() else "ray", "job", "submit", "--address", address,
            "--runtime-env-json", json.dumps(runtime_env(working_dir, env or {}), sort_keys=True)]
    if job_id:
        argv += ["--submission-id", job_id]
    if entrypoint_num_cpus is not None:
        argv += ["--entrypoint-num-cpus", str(entrypoint_num_cpus)]
    if no_wait:
        argv.append("--no-wait")
    return [*argv, "--", python, "-m", "tessera.cli", *command]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                   help=f"the cluster's dashboard (job API) address (default: $RAY_API_SERVER_ADDRESS "
                        f"or {DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable), e.g. TESSERA_DATA_ROOT=s3://bucket/data")
    p.add_argument("--python", default="python", help="the Python on the head node that runs the command")
    p.add_argument("--submission-id", help="the job's id (default: tessera-COMMAND-TIME-RANDOM)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tessera command to run, e.g. -- all --config FILE")


def submit(args) -> int:
    import subprocess

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    job_id = args.submission_id or submission_id(command)
    argv = job_submit_argv(command, address=args.address, working_dir=args.working_dir,
                           env=parse_env(args.env), python=args.python, job_id=job_id,
                           no_wait=args.no_wait, entrypoint_num_cpus=args.entrypoint_num_cpus)
    env = auth_environment()
    print(f"Submitting job {job_id} to {args.address}: {' '.join(command)}", flush=True)
    rc = subprocess.run(argv, env=env).returncode
    if rc == 0 and not args.no_wait:
        print(f"Job {job_id} finished. Its logs: ray job logs --address {args.address} {job_id}")
    elif rc:
        print(f"Job {job_id} did not succeed (exit {rc}). Its logs: ray job logs --address {args.address} {job_id}",
              file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        return submit(p.parse_args(argv))
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
