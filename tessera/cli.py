"""`tessera` / `python -m tessera.cli`: run a flow from a config, or the whole demo."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from tessera.config import ConfigError, load_config


def _common(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument("--config", default=default_config, required=default_config is None,
                   help="run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set download.shard_size=500 (repeatable)")


def demo(args) -> int:
    from tessera.demo.flow import run_demo

    return run_demo(args.config, args.dir, args.overrides)


def curate_cmd(args) -> int:
    from tessera.flows.curate import curate

    load_config(args.config, args.overrides)
    curate(config=args.config, overrides=args.overrides)
    return 0


def all_cmd(args) -> int:
    from tessera.flows.all import all_stages

    load_config(args.config, args.overrides)
    all_stages(config=args.config, overrides=args.overrides, run=args.run, steps=args.steps)
    return 0


def submit_cmd(args) -> int:
    from tessera.submit import SubmitError, submit

    try:
        return submit(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train_cmd(args) -> int:
    from tessera.flows import train as flows

    cfg = load_config(args.config, args.overrides)
    if args.launcher == "torchrun":
        return torchrun_stage(args, getattr(cfg, args.command))
    getattr(flows, args.command)(config=args.config, overrides=args.overrides, run=args.run)
    return 0


def torchrun_stage(args, tcfg) -> int:
    """The stage's workers as torchrun processes on this machine (one per GPU: num_workers)."""
    if tcfg is None:
        print(f"error: the config {args.config} has no {args.command} section", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tcfg.num_workers),
               "-m", "tessera.pipelines.train", args.config, "--stage", args.command,
               *(["--run-name", args.run] if args.run else []), *(x for o in args.overrides for x in ("--set", o))]
    return subprocess.run(command).returncode


def sample_cmd(args) -> int:
    from tessera.flows.train import sample

    load_config(args.config, args.overrides)
    sample(config=args.config, overrides=args.overrides, run=args.run, checkpoint=args.checkpoint)
    return 0


def eval_cmd(args) -> int:
    from tessera.flows.eval import eval_flow

    load_config(args.config, args.overrides)
    eval_flow(config=args.config, overrides=args.overrides, run=args.run, checkpoints=args.checkpoints or None,
              tokenizer=not args.no_tokenizer)
    return 0


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="run config (YAML)")
    _common(p, "")


def _config_of(args) -> str:
    path = args.config_file or args.config
    if not path:
        raise ConfigError("give the run config: tessera %s CONFIG" % args.command)
    return path


def fetch_models_cmd(args) -> int:
    # The one command that goes online: before huggingface_hub reads these.
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "0"
    from tessera.models.fetch import FetchError
    from tessera.fetch_models import fetch_models

    cfg = load_config(_config_of(args), args.overrides)
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
    from tessera.status import format_status, run_status

    print(format_status(run_status(load_config(_config_of(args), args.overrides))))
    return 0


def plan_cmd(args) -> int:
    from tessera.training.plan import report

    cfg = load_config(args.config, args.overrides)
    tcfg = getattr(cfg, args.stage)
    if tcfg is None:
        print(f"error: the config {args.config} has no {args.stage} section", file=sys.stderr)
        return 2
    print(report(tcfg, args.stage, args.gpu_gb or tcfg.gpu_memory_gib or 80.0))
    return 0


def export_cmd(args) -> int:
    import torch

    from tessera.training.checkpoint import ExportRefused, export

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        print(export(args.checkpoint, args.out, dtype=dtype, optimizer=args.optimizer))
    except ExportRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic set")
    _common(p, "configs/demo.yaml")
    p.add_argument("--dir", default=os.environ.get("DEMO_DIR", "demo-output"),
                   help="where the demo writes everything (default: $DEMO_DIR or ./demo-output)")
    p.set_defaults(fn=demo)
    p = sub.add_parser("curate", help="download (and later stages) for a run config")
    _common(p)
    p.set_defaults(fn=curate_cmd)
    p = sub.add_parser("all", help="curate, then train stage 1 and stage 2, then sample")
    _common(p)
    p.add_argument("--step", dest="steps", action="append",
                   choices=["curate", "stage1", "stage2", "sample", "eval"],
                   help="run only this step (repeatable; default: every step, in order)")
    p.add_argument("--run", default=None, help="training run name under runs_root (default: the config's name)")
    p.set_defaults(fn=all_cmd)
    p = sub.add_parser("submit", help="run a tessera command as a Ray job on a cluster (ray job submit)")
    from tessera.submit import add_arguments

    add_arguments(p)
    p.set_defaults(fn=submit_cmd)
    for name, what in (("stage1", "train (or resume) stage 1, 256px"),
                       ("stage2", "train (or resume) stage 2, 512px, from the stage-1 weights")):
        p = sub.add_parser(name, help=what)
        _common(p)
        p.add_argument("--run", default=None, help="run name under runs_root (default: the config's name)")
        p.add_argument("--launcher", choices=["flow", "torchrun"], default="flow",
                       help="flow: the Prefect flow, on Ray Train or in this process (use_ray); torchrun: "
                            "num_workers torchrun processes on this machine, without Ray")
        p.set_defaults(fn=train_cmd)
    p = sub.add_parser("sample", help="a PNG grid of prompts from a checkpoint (default: the run's newest)")
    _common(p)
    p.add_argument("--run", default=None, help="run name under runs_root (default: the config's name)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint path, ours or LlamaGen's")
    p.set_defaults(fn=sample_cmd)
    p = sub.add_parser("eval", help="evaluate checkpoints (FID, CLIP score, prompt-following) and the tokenizer")
    _common(p)
    p.add_argument("--run", default=None, help="run name under runs_root (default: the config's name)")
    p.add_argument("--checkpoint", dest="checkpoints", action="append", metavar="NAME_OR_PATH",
                   help="untrained, stage1, stage2 or a checkpoint path (repeatable; default: eval.checkpoints)")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer evaluation")
    p.set_defaults(fn=eval_cmd)
    p = sub.add_parser("fetch-models", help="download every model the config names into models_root, verified")
    _config_arg(p)
    p.set_defaults(fn=fetch_models_cmd)
    p = sub.add_parser("status", help="per stage: shards done, failed and to do; the funnel; newest checkpoints")
    _config_arg(p)
    p.set_defaults(fn=status_cmd)
    p = sub.add_parser("plan", help="per-GPU memory and tokens per step of a training stage, before it runs")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--stage", choices=["stage1", "stage2"], default="stage2")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="GPU memory in GiB (default: the stage's gpu_memory_gib, else 80)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=plan_cmd)
    p = sub.add_parser("export", help="one LlamaGen-format file (weights under `model`) from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/RUN/STAGE/checkpoints/step-N) or file")
    p.add_argument("out", help="the .pt file to write (local or fsspec URL)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--optimizer", action="store_true",
                   help="include the optimizer state and step, as LlamaGen's trainer resumes from them")
    p.set_defaults(fn=export_cmd)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
