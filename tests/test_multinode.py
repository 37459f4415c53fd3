"""The demo's curation on a real multi-node Ray (a head and two worker nodes on 127.0.0.1), with
one worker node's raylet killed in the middle of the download stage, and a node that joins later
killed in the middle of a model actors' stage (score, caption or tokenize): their shards are
retried on the other nodes, and the outputs equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SMALL = ["source.synthetic.num_images=30", "source.synthetic.bad_records=false", "download.shard_size=10",
         "download.timeout=10", "download.max_tasks_in_flight=4",
         # Two model actors per stage: one on each worker node, so the node that joins later runs one.
         "filters.concurrency=2", "caption.num_actors=2", "tokenize.num_actors=2"]


@pytest.mark.slow
def test_curation_survives_losing_a_worker_node(tmp_path):
    out = tmp_path / "out.json"
    overrides = [f"source.path={tmp_path}/source/laion-synthetic.parquet", f"models_root={tmp_path}/models", *SMALL]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "RAY_ADDRESS": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "tests.multinode_steps", str(out), "configs/demo.yaml",
                           str(tmp_path), json.dumps(overrides)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    # Ray's own lines fill the tail: the kills and the failed attempts are picked out first.
    told = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                     if "Killed raylet" in line or "failed" in line)
    assert proc.returncode == 0, told[-4000:] + "\n...\n" + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    download, later = result["killed"] + [{}] * (2 - len(result["killed"]))
    assert download.get("running") == "ray::process_batch", "the worker node never ran a download shard"
    assert later.get("running") == "ray::ShardActor.process", "the node that joined never ran a later stage's shard"
    log = proc.stdout + proc.stderr
    # Each lost shard was retried: one of the first node's, one of a later stage's on the second.
    assert "failed (attempt 1 of" in log
    assert re.search(r"(score|caption|tokenize): \d{5} failed \(attempt 1 of", log), log[-3000:]
    assert any(k.startswith("tokens/") for k in result["whole"])
    assert result["lost"] == result["whole"]
