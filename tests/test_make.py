"""The Makefile hands SET to the CLI whole: overrides whose values hold spaces or quotes stay whole."""
from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from tessera import cli
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_command(target: str, **variables: str) -> list[str]:
    """The tessera command line `make TARGET` would run (make -n runs nothing)."""
    out = subprocess.run(["make", "-n", "-s", target, *(f"{k}={v}" for k, v in variables.items())],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "-m tessera.cli" in line)
    argv = shlex.split(line)
    return argv[argv.index("tessera.cli") + 1:]


def test_set_values_with_spaces_and_quotes_reach_the_cli_whole():
    argv = make_command("stage1", SET='stage1.max_steps=10 sample.prompts=["a red circle"] name="it\'s mine"')
    args = cli.parse(argv)
    assert args.command == "stage1" and cli.config_of(args) == "configs/demo.yaml"
    assert args.overrides == ["stage1.max_steps=10", "sample.prompts=[a red circle]", "name=it's mine"]
    cfg = cli.load(args)
    assert cfg.stage1.max_steps == 10 and cfg.sample.prompts == ["a red circle"] and cfg.name == "it's mine"


def test_submit_passes_set_and_the_flow_to_the_job():
    argv = make_command("submit", FLOW="stage2", CONFIG="configs/aesthetic_stage2.yaml", SET="stage2.max_steps=5")
    job = argv[argv.index("--") + 1:]
    inner = cli.parse(job)
    assert inner.command == "stage2" and inner.overrides == ["stage2.max_steps=5"]
