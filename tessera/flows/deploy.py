"""Register the flows as Prefect deployments: `make deploy` (work pool) or `make serve` (this process).

    python -m tessera.flows.deploy --config configs/laion_coco_stage1.yaml --pool tessera
    python -m tessera.flows.deploy --config configs/demo.yaml --serve

With `--pool`, the work pool is created from infra/prefect/process-work-pool.json when it does not
exist, and a worker started with `prefect worker start --pool tessera` runs the flow runs. With
`--serve`, this process registers the deployments and runs their flow runs itself until stopped.
Either way each deployment takes the parameters `config` (a path the flow-run process can read)
and `overrides` (KEY=VALUE strings); the values given here are the defaults, and every run
started from the UI or `prefect deployment run` may change them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from prefect.types.entrypoint import EntrypointType

from tessera.config import load_config

REPO = Path(__file__).resolve().parents[2]
POOL_TEMPLATE = REPO / "infra" / "prefect" / "process-work-pool.json"

# Deployment name -> the flow object, as "module:attribute" (imported by the worker by module path).
FLOWS = {
    "curate": "tessera.flows.curate:curate",
    "stage1": "tessera.flows.train:stage1",
    "stage2": "tessera.flows.train:stage2",
    "sample": "tessera.flows.train:sample",
    "eval": "tessera.flows.eval:eval_flow",
    "all": "tessera.flows.all:all_stages",
}


def load_flow(ref: str):
    module, attribute = ref.split(":")
    return getattr(importlib.import_module(module), attribute)


def build_deployments(config: str, overrides: list[str], names: list[str] | None = None,
                      tags: list[str] | None = None) -> list:
    """One RunnerDeployment per flow, named after it, with the config and overrides as defaults."""

    load_config(config, overrides)  # refuse to register a config that cannot run
    names = names or list(FLOWS)
    unknown = [n for n in names if n not in FLOWS]
    if unknown:
        raise SystemExit(f"error: unknown flow(s) {', '.join(unknown)}; choose from {', '.join(FLOWS)}")
    return [
        load_flow(FLOWS[name]).to_deployment(
            name=name,
            parameters={"config": config, "overrides": list(overrides)},
            tags=["tessera", *(tags or [])],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for name in names
    ]


def ensure_work_pool(name: str, template_path: Path = POOL_TEMPLATE) -> bool:
    """Create the process work pool from the template when it is missing; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            template = json.loads(template_path.read_text())
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tessera.flows.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="run config (YAML) the runs use by default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="default override for every run (repeatable)")
    p.add_argument("--only", action="append", choices=list(FLOWS), help="register only this flow (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="extra tag on each deployment (repeatable)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pool", help="register with this process work pool (created when missing)")
    where.add_argument("--serve", action="store_true", help="register and run the flow runs in this process")
    p.add_argument("--working-dir", default=os.getcwd(),
                   help="directory the worker starts flow runs in, where the config path resolves "
                        "(default: the current one)")
    args = p.parse_args(argv)

    deployments = build_deployments(args.config, args.overrides, args.only, args.tag)
    if args.serve:
        from prefect import serve

        serve(*deployments)
        return 0

    from prefect import deploy

    if ensure_work_pool(args.pool):
        print(f"Created the process work pool {args.pool!r}.")
    for d in deployments:
        d.job_variables = {**(d.job_variables or {}), "working_dir": args.working_dir}
    deploy(*deployments, work_pool_name=args.pool, build=False, push=False,
           print_next_steps_message=False, ignore_warnings=True)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    print(f"Registered {names} with the work pool {args.pool!r}.")
    print(f"Start a worker to run them: prefect worker start --pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
