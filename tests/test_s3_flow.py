"""The demo's curation with data_root and runs_root in a bucket of a real S3 API server
(moto's, on loopback): complete on the first run, skip everything on a rerun, redo exactly the
shards whose state was lost or damaged (a deleted marker, an empty marker, a tar cut short), and
end with what a local-disk run writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import pytest

from tessera.config.storage import StorageConfig, apply_storage
from tests.conftest import REPO
from tests.s3server import CREDENTIALS, s3_server, s3_with_credentials
from tests.test_evaluate import write_nano_checkpoint

SMALL = ["source.synthetic.num_images=30", "source.synthetic.bad_records=false",
         "download.shard_size=10", "download.timeout=10"]


def run_steps(tmp_path, steps: list[list]) -> list:
    """The steps in one fresh process (its own Ray, started with the storage settings)."""
    out = tmp_path / "steps.json"
    env = {**os.environ, **CREDENTIALS, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "tests.flow_steps", str(out), *map(json.dumps, steps)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_curation_on_s3_reruns_and_equals_a_local_run(tmp_path):
    with s3_server() as endpoint:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir("tessera")
        source = str(tmp_path / "source" / "laion-synthetic.parquet")  # one source for both runs
        s3 = ["storage.endpoint=" + endpoint, "data_root=s3://tessera/demo/data", "runs_root=s3://tessera/demo/runs",
              f"models_root={tmp_path}/models", f"source.path={source}", *SMALL]
        local = [f"data_root={tmp_path}/local/data", f"runs_root={tmp_path}/local/runs",
                 f"models_root={tmp_path}/models", f"source.path={source}", *SMALL]
        data = "s3://tessera/demo/data"
        first, again, redone, s3_out, local_out = (r for r in run_steps(tmp_path, [
            ["curate", "configs/demo.yaml", s3], ["snapshot", data],
            ["curate", "configs/demo.yaml", s3], ["snapshot", data],
            ["rm", f"{data}/download/00001.done"], ["cut_tar", f"{data}/download/00002.tar"],
            ["empty", f"{data}/score/00000.done"],
            ["curate", "configs/demo.yaml", s3], ["snapshot", data], ["contents", data],
            ["curate", "configs/demo.yaml", local], ["contents", f"{tmp_path}/local/data"],
        ]) if r is not None)

    stages = ("download/", "score/", "scores/", "embeddings/", "select/", "caption/", "captions/", "tokens/")
    outputs = {k: v for k, v in first.items() if k.startswith(stages)}
    assert any(k.startswith("tokens/") for k in outputs) and "download/00001.done" in outputs
    assert "resolved-config.yaml" in first  # saved by the flow once it held the lease
    # A rerun writes nothing in any stage folder.
    assert {k: v for k, v in again.items() if k.startswith(stages)} == outputs
    # Exactly the damaged shards are written again: download 00001 (marker deleted), download 00002
    # (tar cut at a member boundary), score 00000 (empty marker). Their content, and so their
    # fingerprints, are the same as before, so nothing after them is redone.
    changed = sorted(k for k, v in redone.items() if k.startswith(stages) and outputs.get(k) != v)
    assert {"download/00001.done", "download/00002.tar", "download/00002.done", "score/00000.done"} <= set(changed)
    assert all(k.startswith(("download/00001", "download/00002", "score/00000")) for k in changed), changed
    assert redone["download/00002.tar"][0] == outputs["download/00002.tar"][0]  # whole again
    assert s3_out == local_out


@pytest.mark.slow  # a moto server, a fresh Ray, sampling and the reference features: about a minute
def test_evaluation_on_s3_writes_rows_page_samples_and_tensorboard_there(tmp_path):
    with s3_with_credentials() as endpoint:
        apply_storage(StorageConfig(endpoint=endpoint))
        fsspec.filesystem("s3").mkdir("tessera")
        write_nano_checkpoint("s3://tessera/ev/runs/demo/stage1")
        overrides = ["storage.endpoint=" + endpoint, "data_root=s3://tessera/ev/data", "runs_root=s3://tessera/ev/runs",
                     f"models_root={tmp_path}/models", "eval.synthetic_prompts=4", "eval.images_per_prompt=1",
                     "eval.shard_size=2", "eval.batch_size=2", "eval.tokenizer.max_images=2"]
        rows, written = run_steps(tmp_path, [["eval", "configs/demo.yaml", overrides, ["untrained", "stage1"]],
                                             ["snapshot", "s3://tessera/ev/runs/demo/eval"]])
    assert [r["label"] for r in rows] == ["untrained", "stage1-step-00000002"]
    assert all(r["images"] == 4 and r["failed_shards"] == 0 for r in rows)
    assert {"metrics.jsonl", "samples.html"} <= set(written)
    assert {k.split("/")[1] for k in written if k.startswith("tensorboard/")} == {"untrained", "stage1"}
    assert len([k for k in written if k.endswith(".png") and "/samples/" in k]) == 8, sorted(written)
