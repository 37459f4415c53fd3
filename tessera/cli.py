"""`tessera` / `python -m tessera.cli`: run a flow from a config, or the whole demo.

Every command takes the run config as its first argument or as --config, and --set KEY=VALUE
overrides. Before Prefect or Ray starts, each command checks what it needs (tessera.preflight);
a mistake is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import posixpath
import shlex
import subprocess
import sys
import warnings
from importlib.resources import files

from tessera.config import ConfigError, RunConfig, load_config
from tessera.core.lease import LeaseHeld, active_holder
from tessera.core.store import ShardStore
from tessera.models.cache import is_remote

# The same environment whether a run starts from make or from `tessera`: runs are offline (models
# come from models_root), and Prefect keeps its state in its own default home (~/.prefect) unless
# PREFECT_HOME says otherwise, so `make ui` shows every run.
ENVIRONMENT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# The demo's config ships inside the package, so `tessera demo` runs from any folder.
DEMO_CONFIG = str(files("tessera") / "configs" / "demo.yaml")


class UsageError(Exception):
    """A command line that cannot run; one line."""


def config_of(args) -> str:
    path = getattr(args, "config_file", None) or args.config
    if not path:
        raise UsageError(f"give the run config: tessera {args.command} CONFIG (or --config CONFIG)")
    return path


def load(args) -> RunConfig:
    return load_config(config_of(args), args.overrides)


def preflight_run(args, cfg: RunConfig, steps: list[str], run: str | None = None) -> bool:
    """The checks of a run of `steps`; then whether to run it (not with --check) and, if so, the
    resolved config saved beside the run's outputs (a curation saves its own under data_root once
    it holds the lease)."""
    from tessera import preflight
    from tessera.core import resolved

    preflight.check_run(cfg, steps, config_of(args))
    if args.check:
        print(f"preflight passed: {args.command} {config_of(args)} ({', '.join(steps)})")
        return False
    if {"stage1", "stage2", "sample", "eval"} & set(steps):
        url = resolved.save(cfg, args.command, posixpath.join(cfg.runs_root.rstrip("/"), run or cfg.name))
        logging.getLogger("tessera").info("Resolved config saved to %s.", url)
    return True


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="when another run is writing the data_root, wait for it to finish instead of refusing")


def _refused(cfg, wait: bool) -> bool:
    """Refuse at once, in one line, when another run holds the data_root's lease (before Prefect starts)."""
    holder = None if wait else active_holder(ShardStore(cfg.data_root), cfg.storage.lease_stale_after_s)
    if holder:
        print(f"error: {cfg.data_root} is being written by {holder}; wait for it to finish (or add --wait)",
              file=sys.stderr)
    return bool(holder)


def demo(args) -> int:
    from tessera.config.steps import runnable_steps
    from tessera.demo.flow import demo_overrides, run_demo

    cfg = load_config(config_of(args), demo_overrides(os.path.abspath(args.dir), args.overrides))
    if not preflight_run(args, cfg, runnable_steps(cfg)[0]):
        return 0
    return run_demo(config_of(args), args.dir, args.overrides, args.steps)


def curate_cmd(args) -> int:
    cfg = load(args)
    if _refused(cfg, args.wait):
        return 3
    if not preflight_run(args, cfg, ["curate"]):
        return 0
    from tessera.flows.curate import curate

    curate(config=config_of(args), overrides=args.overrides, wait=args.wait)
    return 0


def all_cmd(args) -> int:
    from tessera.preflight import plan_steps

    cfg = load(args)
    if _refused(cfg, args.wait):
        return 3
    plan = plan_steps(cfg, args.steps, config_of(args))
    if plan.skipped:
        print(f"note: skipping {', '.join(plan.skipped)}: {config_of(args)} has no section for "
              f"{'it' if len(plan.skipped) == 1 else 'them'}", file=sys.stderr)
    if not preflight_run(args, cfg, plan.steps, args.run):
        return 0
    from tessera.flows.all import all_stages

    all_stages(config=config_of(args), overrides=args.overrides, run=args.run, steps=plan.steps, wait=args.wait)
    return 0


def train_cmd(args) -> int:
    from tessera.preflight import plan_steps

    cfg = load(args)
    if not preflight_run(args, cfg, plan_steps(cfg, [args.command], config_of(args)).steps, args.run):
        return 0
    if args.launcher == "torchrun":
        return torchrun_stage(args, getattr(cfg, args.command))
    from tessera.flows import train as flows

    getattr(flows, args.command)(config=config_of(args), overrides=args.overrides, run=args.run)
    return 0


def torchrun_stage(args, tcfg) -> int:
    """The stage's workers as torchrun processes on this machine (one per GPU: num_workers)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tcfg.num_workers),
               "-m", "tessera.pipelines.train", config_of(args), "--stage", args.command,
               *(["--run-name", args.run] if args.run else []), *(x for o in args.overrides for x in ("--set", o))]
    return subprocess.run(command).returncode


def sample_cmd(args) -> int:
    from tessera.preflight import check_checkpoint

    cfg = load(args)
    if args.checkpoint:
        check_checkpoint(args.checkpoint)
    if not preflight_run(args, cfg, ["sample"], args.run):
        return 0
    from tessera.flows.train import sample

    sample(config=config_of(args), overrides=args.overrides, run=args.run, checkpoint=args.checkpoint)
    return 0


def eval_cmd(args) -> int:
    from tessera.preflight import check_checkpoint, plan_steps

    cfg = load(args)
    steps = plan_steps(cfg, ["eval"], config_of(args)).steps
    for checkpoint in args.checkpoints or []:
        if checkpoint not in ("untrained", "stage1", "stage2"):
            check_checkpoint(checkpoint)
    if not preflight_run(args, cfg, steps, args.run):
        return 0
    from tessera.flows.eval import eval_flow

    eval_flow(config=config_of(args), overrides=args.overrides, run=args.run, checkpoints=args.checkpoints or None,
              tokenizer=not args.no_tokenizer)
    return 0


def submit_cmd(args) -> int:
    from tessera.preflight import PreflightError, check_cluster, check_model_names, plan_steps
    from tessera.submit import SubmitError, parse_env, submit

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("nothing to submit: give a tessera command after --, e.g. -- all configs/FILE.yaml")
    try:
        parse_env(args.env)
    except SubmitError as e:
        raise UsageError(str(e)) from None
    inner = parse(command)
    if inner.command == "submit":
        raise UsageError("a submitted command cannot itself be `submit`")
    # The job's data, runs and models live where the cluster reaches them: checked there, by the
    # job's own preflight. Here: the config, the steps' sections, and that the cluster answers.
    skipped: list[str] = []
    if getattr(inner, "config", None) is not None or getattr(inner, "config_file", None):
        cfg = load(inner)
        check_model_names(cfg)
        if inner.command in ("stage1", "stage2", "eval"):
            plan_steps(cfg, [inner.command], config_of(inner))
        elif inner.command == "all":
            skipped = plan_steps(cfg, inner.steps, config_of(inner)).skipped
    check_cluster(args.address)
    if skipped:
        print(f"note: the job will skip {', '.join(skipped)}: {config_of(inner)} has no section "
              f"for {'it' if len(skipped) == 1 else 'them'}", file=sys.stderr)
    if args.check:
        print(f"preflight passed: submit to {args.address}: {' '.join(command)}")
        return 0
    try:
        return submit(args)
    except SubmitError as e:
        raise PreflightError(str(e)) from None


def config_cmd(args) -> int:
    from tessera.preflight import check_model_names
    from tessera.core.resolved import as_yaml

    cfg = load(args)
    check_model_names(cfg)
    sys.stdout.write(as_yaml(cfg))
    return 0


def fetch_models_cmd(args) -> int:
    # The one command that goes online: before huggingface_hub reads these.
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "0"
    from tessera.fetch_models import fetch_models, with_pins
    from tessera.models.fetch import FetchError
    from tessera.preflight import check_model_names, check_writable

    try:
        cfg = with_pins(load(args), args.sha256)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_remote(cfg.models_root):
        print(f"error: fetch-models writes to a local models_root, and {cfg.models_root} is on object storage: fetch "
              "into a local folder (--set models_root=models) and copy that folder to the bucket", file=sys.stderr)
        return 2
    check_model_names(cfg)
    check_writable("models_root", cfg.models_root)
    if args.check:
        print(f"preflight passed: fetch-models {config_of(args)}")
        return 0
    try:
        rows = fetch_models(cfg)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for row in rows:
        print(f"{row['action']:<8} {row['key']:<26} {row['path']}")
    print(f"{len(rows)} model(s) in {os.path.abspath(cfg.models_root)}; runs find them there offline.")
    return 0


def status_cmd(args) -> int:
    cfg = load(args)
    from tessera.status import format_status, run_status

    print(format_status(run_status(cfg)))
    return 0


def plan_cmd(args) -> int:
    from tessera.preflight import check_model_names, plan_steps
    from tessera.training.plan import report

    cfg = load(args)
    plan_steps(cfg, [args.stage], config_of(args))
    check_model_names(cfg)
    tcfg = getattr(cfg, args.stage)
    print(report(tcfg, args.stage, args.gpu_gb or tcfg.gpu_memory_gib or 80.0))
    return 0


def export_cmd(args) -> int:
    from tessera.preflight import check_checkpoint, check_writable

    check_checkpoint(args.checkpoint)
    check_writable("the export's folder", os.path.dirname(args.out) or ".")
    import torch

    from tessera.training.checkpoint import ExportRefused, export

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        print(export(args.checkpoint, args.out, dtype=dtype, optimizer=args.optimizer))
    except ExportRefused as e:
        raise UsageError(str(e)) from None
    return 0


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """CONFIG as the first argument or as --config, and --set overrides: the same on every command."""
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="run config (YAML)")
    p.add_argument("--config", default=default, help="run config (YAML), instead of CONFIG"
                   + (" (default: the demo's, shipped with tessera)" if default else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set download.shard_size=500 (repeatable)")
    p.add_argument("--sets", default="", metavar="'KEY=VALUE ...'",
                   help="several overrides in one shell-quoted string, before those of --set (make's SET)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="run the preflight checks only, then exit")


def _run_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, help="run name under runs_root (default: the config's name)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the overrides of --sets (split as a shell splits them) first."""
    args = build_parser().parse_args(argv)
    if getattr(args, "sets", ""):
        try:
            args.overrides = [*shlex.split(args.sets), *args.overrides]
        except ValueError as e:
            raise UsageError(f"--sets {args.sets!r}: {e}") from None
    return args


def build_parser() -> argparse.ArgumentParser:
    from tessera.config.steps import STEPS
    from tessera.core.resolved import tessera_version
    from tessera.submit import add_arguments

    parser = argparse.ArgumentParser(prog="tessera", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tessera {tessera_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every library's log lines and warnings (default: only tessera's and errors)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, fn, default_config: str | None = None, run: bool = True):
        p = sub.add_parser(name, help=help)
        _config_args(p, default_config)
        if run:
            _run_args(p)
        p.set_defaults(fn=fn)
        return p

    p = command("demo", "the whole pipeline on the embedded synthetic set", demo, DEMO_CONFIG)
    p.add_argument("--dir", default=os.environ.get("DEMO_DIR", "demo-output"),
                   help="where the demo writes everything (default: $DEMO_DIR or ./demo-output)")
    p.add_argument("--step", dest="steps", action="append", choices=list(STEPS),
                   help="run only this step (repeatable; default: every step)")
    _wait_arg(command("curate", "download, score, select, caption and tokenize a data set", curate_cmd))
    p = command("all", "curate, then train stage 1 and stage 2, then sample and evaluate: the steps the config "
                       "has sections for", all_cmd)
    p.add_argument("--step", dest="steps", action="append", choices=list(STEPS),
                   help="run only this step (repeatable; default: every step the config has a section for)")
    _run_name(p)
    _wait_arg(p)
    for name, what in (("stage1", "train (or resume) stage 1, 256px"),
                       ("stage2", "train (or resume) stage 2, 512px, from the stage-1 weights")):
        p = command(name, what, train_cmd)
        _run_name(p)
        p.add_argument("--launcher", choices=["flow", "torchrun"], default="flow",
                       help="flow: the Prefect flow, on Ray Train or in this process (use_ray); torchrun: "
                            "num_workers torchrun processes on this machine, without Ray")
    p = command("sample", "a PNG grid of prompts from a checkpoint (default: the run's newest)", sample_cmd)
    _run_name(p)
    p.add_argument("--checkpoint", default=None, help="a checkpoint path, ours or LlamaGen's")
    p = command("eval", "evaluate checkpoints (FID, CLIP score, prompt-following) and the tokenizer", eval_cmd)
    _run_name(p)
    p.add_argument("--checkpoint", dest="checkpoints", action="append", metavar="NAME_OR_PATH",
                   help="untrained, stage1, stage2 or a checkpoint path (repeatable; default: eval.checkpoints)")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer evaluation")
    p = command("fetch-models", "download every model the config names into models_root, verified", fetch_models_cmd)
    p.add_argument("--sha256", action="append", default=[], metavar="NAME=SHA256",
                   help="pin the sha256 of a model's source (repeatable), as model_sources: {NAME: {sha256: ...}} "
                        "would; a source without a published sum is refused until one is pinned")
    command("status", "per stage: shards done, failed and to do; the funnel; newest checkpoints", status_cmd,
            run=False)
    command("config", "print the resolved config (file, environment and --set applied)", config_cmd, run=False)
    p = command("plan", "per-GPU memory and tokens per step of a training stage, before it runs", plan_cmd,
                run=False)
    p.add_argument("--stage", choices=["stage1", "stage2"], default="stage2")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="GPU memory in GiB (default: the stage's gpu_memory_gib, else 80)")
    p = sub.add_parser("export", help="one LlamaGen-format file (weights under `model`) from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/RUN/STAGE/checkpoints/step-N) or file")
    p.add_argument("out", help="the .pt file to write (local or fsspec URL)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--optimizer", action="store_true",
                   help="include the optimizer state and step, as LlamaGen's trainer resumes from them")
    p.set_defaults(fn=export_cmd)
    p = sub.add_parser("submit", help="run a tessera command as a Ray job on a cluster (ray job submit)")
    add_arguments(p)
    _run_args(p)
    p.set_defaults(fn=submit_cmd)
    return parser


def quiet(verbose: bool) -> None:
    """Log lines that read like failures but are not (faiss's AVX512 probe, HTTP requests,
    torch.distributed's single-process notes) are left out unless --verbose."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    for name in ("httpx", "faiss", "faiss.loader", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # Ray workers inherit it


def main(argv: list[str] | None = None) -> int:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    from tessera.preflight import PreflightError

    try:
        args = parse(argv)
        quiet(args.verbose)
        return args.fn(args)
    except (ConfigError, PreflightError, UsageError) as e:
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except LeaseHeld as e:  # another run took the lease between the check and the flow's start
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
