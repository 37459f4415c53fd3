"""infra/: the cluster definitions are valid, keep token auth on, and run commands that exist."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
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
    assert set(template["job_configuration"]) >= {"env", "working_dir"}
    env = template["variables"]["properties"]["env"]["default"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_prefect_work_pool_template_takes_no_command_from_a_run():
    """Whoever reaches the Prefect API must not choose what the worker runs: no `command`
    variable, no place for one in the job, and variables not declared are refused."""
    import jsonschema

    template = json.loads((INFRA / "prefect" / "process-work-pool.json").read_text())
    assert "command" not in template["job_configuration"]
    assert "command" not in json.dumps(template["job_configuration"])
    schema = template["variables"]
    assert "command" not in schema["properties"] and schema["additionalProperties"] is False
    jsonschema.validate({"working_dir": "/srv/tessera", "env": {"RAY_ADDRESS": "auto"}}, schema)
    with pytest.raises(jsonschema.ValidationError, match="'command' was unexpected"):
        jsonschema.validate({"command": "sh -c 'id > /tmp/owned'"}, schema)


# Network hardening ---------------------------------------------------------------------------
def test_cluster_launcher_nodes_require_imdsv2_and_use_the_written_out_security_group():
    cluster = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    for name, node_type in cluster["available_node_types"].items():
        node = node_type["node_config"]
        assert node["MetadataOptions"] == {"HttpEndpoint": "enabled", "HttpTokens": "required",
                                           "HttpPutResponseHopLimit": 1}, name
        # A group of our own: the one the launcher would create lets SSH in from 0.0.0.0/0.
        assert node["SecurityGroupIds"] == ["SECURITY_GROUP_ID"], name
    assert "--env RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/" in cluster["docker"]["run_options"]

    template = yaml.safe_load((INFRA / "ray" / "security-group.yaml").read_text())
    resources = template["Resources"]
    group = resources["NodeGroup"]["Properties"]
    assert group["SecurityGroupIngress"] == [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": {"Ref": "AdminCidr"},
         "Description": "SSH from the admin"}]
    admin = template["Parameters"]["AdminCidr"]["AllowedPattern"]
    assert re.fullmatch(admin, "203.0.113.7/32") and not re.fullmatch(admin, "0.0.0.0/0")
    ingress = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    assert ingress == [{"GroupId": {"Ref": "NodeGroup"}, "IpProtocol": "-1",
                        "SourceSecurityGroupId": {"Ref": "NodeGroup"},
                        "Description": "every port between the cluster's nodes"}]
    assert template["Outputs"]["GroupId"]["Value"] == {"Fn::GetAtt": ["NodeGroup", "GroupId"]}


def network_policies() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((INFRA / "kuberay" / "networkpolicy.yaml").read_text()))
    assert all(d["apiVersion"] == "networking.k8s.io/v1" and d["kind"] == "NetworkPolicy" for d in docs)
    return {d["metadata"]["name"]: d["spec"] for d in docs}


def egress_allows(policy: dict, address: str) -> bool:
    """Whether any ipBlock of the policy's egress rules lets `address` out."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    for rule in policy["egress"]:
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block and ip.version == ipaddress.ip_network(block["cidr"]).version \
                    and ip in ipaddress.ip_network(block["cidr"]) \
                    and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])
                                if ipaddress.ip_network(e).version == ip.version):
                return True
    return False


def test_kuberay_workers_cannot_reach_metadata_or_private_addresses():
    import ipaddress

    from tessera.core.urlcheck import METADATA_ADDRESSES

    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    workers = network_policies()["tessera-ray-workers"]
    # Every worker group (download tasks may land on any of them), by the labels KubeRay sets.
    assert workers["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                                      "ray.io/node-type": "worker"}
    assert set(workers["policyTypes"]) == {"Ingress", "Egress"}
    for rule in workers["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:  # kubernetes refuses an `except` outside its cidr
                cidr = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                assert all(ipaddress.ip_network(e).subnet_of(cidr) for e in peer["ipBlock"]["except"])
    refused = [str(ip) for ip in METADATA_ADDRESSES] + [
        "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "127.0.0.1", "0.0.0.0", "198.18.0.1",
        "fd00::1", "fe80::1", "::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::"]
    assert [a for a in refused if egress_allows(workers, a)] == []
    assert egress_allows(workers, "93.184.215.14") and egress_allows(workers, "2606:4700::1111")
    # DNS and the object store stay reachable.
    dns = [r for r in workers["egress"] if any(p.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
                                              for p in r["to"])]
    assert len(dns) == 1 and {(p["protocol"], p["port"]) for p in dns[0]["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert any(p.get("podSelector", {}).get("matchLabels") == {"tessera.io/object-store": "true"}
               for r in workers["egress"] for p in r["to"])


def test_kuberay_dashboard_is_reached_only_through_the_service_with_token_auth():
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    head = cluster["spec"]["headGroupSpec"]
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)
    assert not {"hostNetwork", "hostPort", "nodePort"} & set(keys(cluster))

    policy = network_policies()["tessera-ray-head"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                                     "ray.io/node-type": "head"}
    assert policy["policyTypes"] == ["Ingress"]
    assert all(rule.get("from") for rule in policy["ingress"])  # a rule without `from` lets anyone in
    outside = [r for r in policy["ingress"]
               if r["from"] != [{"podSelector": {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}}]]
    assert len(outside) == 1 and outside[0]["ports"] == [{"protocol": "TCP", "port": 8265}]
    submitter = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).items() <= submitter.items()
               and "namespaceSelector" not in p for p in outside[0]["from"])


def nacl_decides(entries: list[dict], address: str, egress: bool, port: int, protocol: int = 6) -> str:
    """What a network ACL does with a packet: its entries in rule-number order, first match wins,
    and the implicit deny of every ACL at the end."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    for e in sorted((e for e in entries if e["Egress"] == egress), key=lambda e: e["RuleNumber"]):
        block = e.get("CidrBlock") or e.get("Ipv6CidrBlock")
        network = ipaddress.ip_network(block)
        ports = e.get("PortRange")
        if network.version == ip.version and ip in network and e["Protocol"] in (-1, protocol) \
                and (ports is None or ports["From"] <= port <= ports["To"]):
            return e["RuleAction"]
    return "deny"


def test_cluster_launcher_subnet_acl_denies_private_egress_after_the_clusters_own():
    template = yaml.safe_load((INFRA / "ray" / "security-group.yaml").read_text())
    values = {"ClusterCidr": "10.0.1.0/24", "VpcBaseResolverCidr": "10.0.0.2/32", "EndpointsCidr": "10.0.9.0/24",
              "AdminCidr": "203.0.113.7/32"}
    resources = template["Resources"]
    entries = []
    for r in resources.values():
        if r["Type"] == "AWS::EC2::NetworkAclEntry":
            e = dict(r["Properties"])
            for key in ("CidrBlock", "Ipv6CidrBlock"):
                if isinstance(e.get(key), dict):
                    e[key] = values[e[key]["Ref"]]
            assert e["NetworkAclId"] == {"Ref": "NodeAcl"}
            entries.append(e)
    assert resources["NodeAclAssociation"]["Properties"] == {"SubnetId": {"Ref": "SubnetId"},
                                                              "NetworkAclId": {"Ref": "NodeAcl"}}
    assert len({(e["Egress"], e["RuleNumber"]) for e in entries}) == len(entries)
    out = lambda address, port=443, protocol=6: nacl_decides(entries, address, True, port, protocol)  # noqa: E731
    # The cluster's own subnet, the resolver and the interface endpoints: allowed, ahead of the denies.
    assert out("10.0.1.17", 6379) == "allow" and out("10.0.0.2", 53, 17) == "allow" and out("10.0.9.5") == "allow"
    assert out("10.0.9.5", 22) == "deny" and out("10.0.0.2", 443) == "deny"
    # Every other private, shared and link-local range: denied. The internet: allowed, any port.
    for address in ("10.200.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "100.64.0.1", "169.254.170.2",
                    "169.254.169.254", "fd00:ec2::254", "fe80::1"):
        assert out(address) == "deny", address
    for address in ("8.8.8.8", "52.216.0.1", "172.32.0.1", "2600:1f18::1"):
        assert out(address, 8080) == "allow", address
    # Stateless: replies come back on ephemeral ports; nothing else comes in from outside but SSH.
    inbound = lambda address, port, protocol=6: nacl_decides(entries, address, False, port, protocol)  # noqa: E731
    assert inbound("8.8.8.8", 40000) == "allow" and inbound("203.0.113.7", 22) == "allow"
    assert inbound("8.8.8.8", 22) == "deny" and inbound("8.8.8.8", 40000, 17) == "deny"


def test_kuberay_download_pods_request_and_limit_their_staging_disk():
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "cpu-download")
    resources = group["template"]["spec"]["containers"][0]["resources"]
    request, limit = resources["requests"]["ephemeral-storage"], resources["limits"]["ephemeral-storage"]
    gib = lambda q: int(q.removesuffix("Gi"))  # noqa: E731
    assert 0 < gib(request) <= gib(limit)
