"""Preflight: each first mistake ends, before Prefect or Ray starts, with one line on stderr that
names the problem, exit status 2 and no traceback (the CLI run as a user runs it, in a subprocess).
The configs for one's own data load and pass preflight once their source and models are there."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tessera import cli
from tessera.config import load_config
from tessera.preflight import needed_models
from tests.conftest import REPO

LOCAL_PARQUET = str(REPO / "configs" / "local_parquet.yaml")
LOCAL_IMAGES = str(REPO / "configs" / "local_images.yaml")


def tessera(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("TESSERA_DATA_ROOT", "TESSERA_RUNS_ROOT", "TESSERA_MODELS_ROOT", "TESSERA_SOURCE", "RAY_ADDRESS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "tessera.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd or REPO)


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit 2 and one line on stderr holding `words`; nothing else was printed."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def source(tmp_path) -> str:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a red circle"]}), path)
    return str(path)


def roots(tmp_path, source: str) -> list[str]:
    return ["--set", f"data_root={tmp_path}/data", "--set", f"runs_root={tmp_path}/runs",
            "--set", f"models_root={tmp_path}/models", "--set", f"source.path={source}"]


def with_models(config: str, tmp_path, source: str) -> None:
    """Every model the config's steps load, put where they are looked for (as fetch-models would)."""
    cfg = load_config(config, [a for a in roots(tmp_path, source) if a != "--set"])
    for _, ref in needed_models(cfg, ["curate", "stage1", "stage2", "sample", "eval"]):
        path = tmp_path / "models" / ref
        if ref.endswith((".pt", ".pth", ".bin")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")
        else:
            path.mkdir(parents=True, exist_ok=True)


# The mistakes, one test each --------------------------------------------------------------------
def test_a_missing_source_parquet(tmp_path, source):
    one_line_error(tessera("curate", LOCAL_PARQUET, *roots(tmp_path, str(tmp_path / "missing.parquet"))),
                   "source.path", "missing.parquet")


def test_a_source_without_the_named_column(tmp_path, source):
    one_line_error(tessera("curate", LOCAL_PARQUET, *roots(tmp_path, source), "--set", "source.columns.url=url"),
                   "no column 'url'", "source.columns.url", "URL, TEXT")


def test_a_data_root_that_is_not_writable(tmp_path, source):
    one_line_error(tessera("curate", LOCAL_PARQUET, *roots(tmp_path, source), "--set", "data_root=/proc/tessera-data"),
                   "data_root /proc/tessera-data is not writable")


def test_bad_yaml_in_set(tmp_path):
    one_line_error(tessera("curate", LOCAL_PARQUET, "--set", "sample.prompts=[a, b"),
                   "sample.prompts=[a, b", "not valid YAML")


def test_an_unknown_model_name(tmp_path, source):
    one_line_error(tessera("stage1", LOCAL_PARQUET, *roots(tmp_path, source), "--set", "stage1.model=GPT-XXXL"),
                   "stage1.model", "unknown model 'GPT-XXXL'", "GPT-XL")


def test_a_step_asked_for_without_its_section(tmp_path, source):
    one_line_error(tessera("all", LOCAL_PARQUET, "--step", "stage2", *roots(tmp_path, source)),
                   "stage2", "no `stage2` section")


def test_missing_model_weights_name_fetch_models(tmp_path, source):
    line = one_line_error(tessera("curate", LOCAL_PARQUET, *roots(tmp_path, source)),
                          "not in models_root", "tessera fetch-models")
    assert "filters.clip.checkpoint=clip-vit-l-14/open_clip_pytorch_model.bin" in line
    assert "stage1" not in line  # only the models of the step asked for


def test_export_of_a_missing_checkpoint(tmp_path):
    one_line_error(tessera("export", str(tmp_path / "runs" / "r" / "stage1" / "checkpoints" / "step-00000009"),
                           str(tmp_path / "gpt.pt")), "checkpoint", "no such file or folder")


def test_submit_to_a_cluster_that_does_not_answer(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_line_error(tessera("submit", "--address", f"http://127.0.0.1:{port}", "--", "all", LOCAL_PARQUET),
                   f"the cluster at http://127.0.0.1:{port} does not answer")


def test_a_typo_in_a_key(tmp_path):
    one_line_error(tessera("curate", LOCAL_PARQUET, "--set", "download.shard_sise=5"),
                   "download.shard_sise: unknown key")


def test_a_missing_config_file(tmp_path):
    one_line_error(tessera("status", str(tmp_path / "nope.yaml")), "nope.yaml: no such config file")


def test_no_config_at_all():
    one_line_error(tessera("curate"), "give the run config: tessera curate CONFIG")


# What passes ------------------------------------------------------------------------------------
def test_local_parquet_config_passes_preflight_once_its_models_are_there(tmp_path, source, capsys):
    with_models(LOCAL_PARQUET, tmp_path, source)
    assert cli.main(["all", LOCAL_PARQUET, "--check", *roots(tmp_path, source)]) == 0
    out, err = capsys.readouterr()
    assert "preflight passed" in out and "curate, stage1, sample" in out
    assert "skipping stage2, eval" in err  # `all` runs the steps the config has sections for
    assert not (tmp_path / "data" / "resolved-config.yaml").exists()  # --check writes nothing else


def test_local_images_config_passes_preflight_once_its_models_are_there(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.txt").write_text("a cat")
    with_models(LOCAL_IMAGES, tmp_path, str(images))
    assert cli.main(["curate", "--config", LOCAL_IMAGES, "--check", *roots(tmp_path, str(images))]) == 0
    assert "preflight passed" in capsys.readouterr().out
    assert cli.main(["curate", LOCAL_IMAGES, "--check", *roots(tmp_path, str(tmp_path / "no-such-folder"))]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_demo_config_ships_with_the_package_and_passes_preflight(tmp_path, capsys):
    # From a folder outside the checkout: the packaged demo config, its tiny models built on demand.
    assert os.path.samefile(cli.DEMO_CONFIG, REPO / "configs" / "demo.yaml")
    result = tessera("demo", "--check", "--dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0 and "preflight passed" in result.stdout, result.stderr[-2000:]


def test_config_prints_the_resolved_config_and_keeps_text_as_text(tmp_path):
    result = tessera("config", "--config", LOCAL_PARQUET, "--set", "name=2024", "--set", "filters.nsfw.source=off",
                     "--set", "download.shard_size=500", "--set", 'sample.prompts=["a red circle", "a cat"]')
    assert result.returncode == 0, result.stderr
    tree = yaml.safe_load(result.stdout)
    assert tree["name"] == "2024" and tree["filters"]["nsfw"]["source"] == "off"
    assert tree["download"]["shard_size"] == 500 and tree["sample"]["prompts"] == ["a red circle", "a cat"]
    assert load_config(LOCAL_PARQUET, ["tokenize.text_encoder=null"]).tokenize.text_encoder is None


def test_version():
    result = tessera("--version")
    assert result.returncode == 0 and result.stdout.startswith("tessera ")
