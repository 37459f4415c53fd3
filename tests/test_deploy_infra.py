"""infra/: the cluster definitions are valid, keep token auth on, and run commands that exist."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"


def entrypoint_runs(entrypoint: str) -> None:
    """The command parses with tessera's CLI, and its config loads."""
    from tessera.config import load_config

    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "tessera.cli"]
    config = words[words.index("--config") + 1]
    load_config(REPO / config)


def test_ray_cluster_launcher_config_is_valid_and_authenticated():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert "GPU" not in types["cpu_download"]["resources"]
    assert all(types[t]["resources"]["GPU"] >= 1 for t in ("gpu_score", "gpu_caption", "gpu_train"))
    options = " ".join(cluster["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert token_path in cluster["file_mounts"]
    assert all("127.0.0.1" in c for c in cluster["head_start_ray_commands"] if "--head" in c)


def test_kuberay_manifests_keep_token_auth_and_run_the_pipeline():
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    secret = cluster["spec"]["authOptions"]["secretName"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-download", "gpu-score", "gpu-caption", "gpu-train"}

    def gpus(group):
        return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus(groups["cpu-download"]) == 0 and all(gpus(groups[g]) >= 1 for g in groups if g.startswith("gpu"))

    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entrypoint_runs(job["spec"]["entrypoint"])
    env = {e["name"]: e for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret


def test_image_installs_exactly_the_lock():
    dockerfile = (INFRA / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "pip install --no-deps -r requirements.lock" in dockerfile
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M) and '">=3.11,<3.12"' in pyproject
    copied = re.findall(r"^COPY (.+) \S+$", dockerfile, re.M)
    assert "requirements.lock" in " ".join(copied)
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{name}" in ignore or f"!{name}/**" in ignore
               for c in copied for name in c.split() if not name.startswith("--"))


def test_prefect_work_pool_template_is_a_process_template():
    template = json.loads((INFRA / "prefect" / "process-work-pool.json").read_text())
    assert set(template["job_configuration"]) >= {"command", "env", "working_dir"}
    env = template["variables"]["properties"]["env"]["default"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
