"""Fault injection: score, caption and tokenize killed mid-stage (kill -9 of the driver and its
local Ray), then rerun, end exactly where an uninterrupted run ends."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tessera.config.caption import CaptionConfig
from tessera.config.ray import RayConfig
from tessera.config.filters import FiltersConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.pipelines import caption, score, tokenize
from tessera.core.store import ShardStore
from tests.fixtures import write_download_shard, write_selection

REPO = Path(__file__).resolve().parent.parent
SHARDS = [f"{i:05d}" for i in range(8)]
STAGES = {
    "score": (score, FiltersConfig, {
        "batch_size": 4, "precision": "fp32",
        "clip": {"model": "tessera-tiny-clip", "checkpoint": "tiny:clip", "force_quick_gelu": False},
        "aesthetic": {"weights": "tiny:aesthetic", "keep_fraction": 0.9},
        "watermark": {"source": "metadata", "max": 0.5}, "nsfw": {"source": "metadata", "max": 0.5}}),
    "caption": (caption, CaptionConfig, {"model": "tiny:llava", "max_new_tokens": 6, "batch_size": 4,
                                         "num_actors": 1, "precision": "fp32"}),
    "tokenize": (tokenize, TokenizeConfig, {"batch_size": 4, "flip": True}),
}
DRIVER = """
import json, sys
from tests.test_kill import STAGES
from tessera.config.ray import RayConfig
from tessera.core.store import ShardStore
module, config, values = STAGES[sys.argv[1]]
module.run(config.model_validate(values), RayConfig(num_cpus=1), ShardStore(sys.argv[2]), sys.argv[3])
"""


def make_inputs(root: Path) -> ShardStore:
    store = ShardStore(str(root))
    for i, shard in enumerate(SHARDS):
        rows = write_download_shard(store, shard, n=4, seed=i)
        write_selection(store, shard, rows, [True, True, False, True])
    return store


def contents(root: Path, folders: list[str]) -> dict:
    """Every output of the stage: table rows, tar members' hashes, markers without their timings."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            rel = str(path.relative_to(root))
            if path.suffix == ".parquet":
                out[rel] = pq.read_table(path).to_pylist()
            elif path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    out[rel] = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()}
            elif path.suffix in (".done", ".json"):
                out[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}
            elif path.suffix == ".npy":
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_file():
                out[rel] = "unexpected file"
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_inputs(root / "pristine")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["score", "caption", "tokenize"])
def test_a_stage_killed_mid_way_resumes_to_the_uninterrupted_result(stage, inputs, ray_local):
    module, config, values = STAGES[stage]
    cfg = config.model_validate(values)
    models = str(inputs / "models")
    folders = {"score": ["score", "scores", "embeddings"], "caption": ["caption", "captions"],
               "tokenize": ["tokenize", "tokens"]}[stage]
    if stage == "tokenize":  # tokenize reads the captions when there are any: run it on captioned shards
        caption.run(CaptionConfig.model_validate(STAGES["caption"][2]), RayConfig(), ShardStore(str(inputs / "pristine")),
                    models)
    reference, killed = inputs / f"{stage}-reference", inputs / f"{stage}-killed"
    for root in (reference, killed):
        shutil.copytree(inputs / "pristine", root)
    module.run(cfg, RayConfig(), ShardStore(str(reference)), models)

    marker_folder = killed / stage
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, stage, str(killed), models], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(marker_folder.glob("*.done")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(marker_folder.glob("*.done")))
    assert 1 <= done < len(SHARDS), f"the kill must land mid-way ({done} of {len(SHARDS)} shards done)"

    module.run(cfg, RayConfig(), ShardStore(str(killed)), models)
    assert contents(killed, folders) == contents(reference, folders)
    assert not [p for p in killed.rglob("*") if ".tmp-" in p.name]
