"""The shipped cluster configs: they parse, carry what Ray / KubeRay require, and expose nothing publicly."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import ray
import yaml

from repo import CLUSTER
from dmvae_scale.config import load_config

REPO = CLUSTER.parent
SECRET_PATTERNS = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key\s*[=:]", r"RAY_AUTH_TOKEN=\S",
                                           r"-----BEGIN [A-Z ]*PRIVATE KEY")]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.unit
def test_launcher_config_passes_rays_schema_and_defaults():
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config
    cfg = _load("aws-gpu.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(fillout_defaults(cfg))  # what `ray up` does before it touches the cloud

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert gpu and all(t["max_workers"] > 0 and re.match(r"(p4d|p5|p5e|g5|g6)\.", t["node_config"]["InstanceType"])
                       for t in gpu)
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in gpu)
    assert cfg["docker"]["image"]
    # Bucket access through the instance role, on every node: no keys needed anywhere.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


@pytest.mark.unit
def test_launcher_keeps_the_job_api_private_and_turns_on_token_auth():
    cfg = _load("aws-gpu.yaml")
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in (head, " ".join(cfg["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert "RAY_JOB_STOP_WAIT_TIME_S=300 " in head  # `jobs stop` leaves the driver time for the stop checkpoint
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]



@pytest.mark.unit
def test_launcher_uses_a_pre_created_security_group_on_every_node():
    """A group Ray creates gets an SSH rule open to 0.0.0.0/0: every node names one made beforehand instead."""
    cfg = _load("aws-gpu.yaml")
    assert "security_group" not in cfg["provider"]
    for name, node_type in cfg["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups and all(g.startswith(("sg-", "<")) for g in groups), name
    from ray.autoscaler._private.util import fillout_defaults
    filled = fillout_defaults(cfg)
    assert "security_group" not in filled["provider"]
    comments = "\n".join(line for line in (CLUSTER / "aws-gpu.yaml").read_text().splitlines() if "#" in line)
    assert "only SSH" not in comments and "SSH only" not in comments  # nothing here can promise that


@pytest.mark.unit
def test_rayjob_manifest_names_what_kuberay_requires():
    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside YAML: must parse too

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray = the client's Ray
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)  # required by the CRD even when empty
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] and {"dashboard", "gcs-server"} <= {p["name"] for p in head_container["ports"]}
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head_container["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.unit
def test_rayjob_is_private_authenticated_and_runs_the_same_train_command():
    job = _load("kuberay-rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth exists from 2.52
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    head_env = {e["name"]: e["value"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]
                for e in c.get("env", [])}
    assert int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60  # `jobs stop` leaves the driver time to checkpoint
    # Bucket access through a workload identity, not keys.
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert template["spec"]["serviceAccountName"] == "dmvae-scale"
        assert not any(e.get("name", "").startswith("AWS_") for c in template["spec"]["containers"]
                       for e in c.get("env", []))
    command = job["spec"]["entrypoint"].split()
    assert command[:2] == ["dmvae-scale", "train"]
    image_root = "/home/ray/dmvae-scale/"
    assert command[2].startswith(image_root)
    load_config(REPO / command[2][len(image_root):])  # the config the job runs is valid today


@pytest.mark.unit
def test_rayjob_containers_keep_caches_on_the_cache_volume_and_mount_the_weights():
    """The code caches shards, artifacts and checkpoints under $TMPDIR; the imagenet256 weight files under /weights."""
    cluster = _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert env.get("TMPDIR") in mounts, f"{container['name']}: TMPDIR is not a mounted volume"
            cache = volumes[mounts[env["TMPDIR"]]["name"]]
            assert "emptyDir" in cache or "persistentVolumeClaim" in cache
            assert "/weights" in mounts and mounts["/weights"].get("readOnly") is True
            assert mounts["/weights"]["name"] in volumes
    tok = load_config(REPO / "configs" / "imagenet256" / "tokenizer.yaml")
    assert tok.tokenizer.encoder.weights.startswith("/weights/")


@pytest.mark.unit
def test_image_builds_flash_attn_and_nvidia_apex_for_the_same_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in text
    assert "flash-attn" in text and "--no-build-isolation" in text
    assert "https://github.com/NVIDIA/apex" in text and "APEX_CUDA_EXT=1" in text
    assert re.search(r"^ARG APEX_COMMIT=[0-9a-f]{40}$", text, re.M), "apex must be pinned to a commit"
    assert "--branch" not in text and "APEX_REF" not in text
    assert not re.search(r"pip install[^\n]*\bapex\b(?!\.)", text.replace("apex.normalization", "")), \
        "the PyPI package called apex is unrelated to NVIDIA's"
    assert "torch==2.14.1" in text  # the pin of pyproject.toml


@pytest.mark.unit
def test_no_shipped_cluster_file_holds_a_secret():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 4
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{path.name} matches {pattern.pattern}"
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "unset-secret") not in "".join(p.read_text() for p in files)


def test_cluster_files_have_no_duplicate_keys():
    """YAML keeps the last of two equal keys silently: a second `env:` once dropped the stop-wait setting."""
    import collections

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dupes = [k for k, n in collections.Counter(keys).items() if n > 1]
        assert not dupes, f"duplicate keys {dupes} at line {node.start_mark.line + 1}"
        return loader.construct_mapping(node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    for path in sorted(CLUSTER.glob("*.yaml")):
        list(yaml.load_all(path.read_text(), Loader=Strict))


@pytest.mark.unit
def test_launcher_nodes_require_imdsv2_and_encrypt_every_volume():
    cfg = _load("aws-gpu.yaml")
    for name, node_type in cfg["available_node_types"].items():
        node = node_type["node_config"]
        assert node["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv2 only
        assert node["MetadataOptions"]["HttpPutResponseHopLimit"] >= 2, name  # the Ray container reaches it
        volumes = node["BlockDeviceMappings"]
        assert volumes and all(v["Ebs"]["Encrypted"] is True for v in volumes), name


def _rayjob_templates():
    cluster = _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"]["template"])] + \
        [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]


@pytest.mark.unit
def test_rayjob_pods_run_as_non_root_without_privilege_escalation():
    for name, template in _rayjob_templates():
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in template["spec"]["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc.get("privileged", False) and sc.get("runAsUser", 1) != 0, name


@pytest.mark.unit
def test_network_policy_admits_only_the_clusters_own_pods_to_the_heads_ports():
    policies = list(yaml.safe_load_all((CLUSTER / "kuberay-networkpolicy.yaml").read_text()))
    assert all(p["apiVersion"] == "networking.k8s.io/v1" and p["kind"] == "NetworkPolicy" for p in policies)
    head_labels = {k: v for k, v in _rayjob_templates()[0][1]["metadata"]["labels"].items()}
    head = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head")
    assert head["spec"]["policyTypes"] == ["Ingress"]
    selected = head["spec"]["podSelector"]["matchLabels"]
    assert {k: v for k, v in selected.items() if k != "ray.io/node-type"} == head_labels  # it selects our head
    job_name = _load("kuberay-rayjob.yaml")["metadata"]["name"]
    allowed_ports = {}
    for rule in head["spec"]["ingress"]:
        assert rule["from"] and all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"]), \
            "every rule names the pods it admits (no ipBlock, no empty selector: that would admit everyone)"
        for peer in rule["from"]:
            key = tuple(sorted(peer["podSelector"]["matchLabels"].items()))
            allowed_ports.setdefault(key, set()).update(p["port"] for p in rule["ports"])
    assert allowed_ports[tuple(sorted(head_labels.items()))] == {6379, 8265, 10001}  # the cluster's own pods
    assert allowed_ports[(("batch.kubernetes.io/job-name", job_name),)] == {8265}  # the RayJob's submitter
    assert allowed_ports[(("app.kubernetes.io/name", "kuberay-operator"),)] == {8265}
    workers = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "worker")
    assert [peer["podSelector"]["matchLabels"] for rule in workers["spec"]["ingress"] for peer in rule["from"]] == \
        [head_labels]


@pytest.mark.unit
def test_image_base_is_pinned_by_digest_and_packages_by_hash_lock(tmp_path):
    import subprocess
    import tomllib
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE_DIGEST$", text, re.M), "the digest has no default: a placeholder is refused"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}@\$\{RAY_IMAGE_DIGEST\}$", text, re.M)
    pip_lines = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line
                 and not line.lstrip().startswith("#")]
    for line in pip_lines:  # every pip install: from a hash lock, or this checkout / apex without dependencies
        assert "--require-hashes" in line or "--no-deps" in line, line
    assert sum("--require-hashes" in line for line in pip_lines) == 2
    # The lock's input names exactly the package's pinned dependencies.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [line for line in (CLUSTER / "requirements-image.in").read_text().splitlines()
              if line and not line.startswith("#")]
    assert set(deps) <= set(wanted)
    # The build script refuses without a digest (before docker runs) and names what to do.
    refused = subprocess.run([str(CLUSTER / "build-image.sh"), "-t", "x"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "RAY_IMAGE_DIGEST": "sha256:<digest>"})
    assert refused.returncode == 2
    assert "RAY_IMAGE_DIGEST: expected the base image's digest, sha256: and 64 hex digits" in refused.stderr
    no_lock = subprocess.run([str(CLUSTER / "build-image.sh"), "-t", "x"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "RAY_IMAGE_DIGEST": "sha256:" + "a" * 64})
    if not (CLUSTER / "requirements.lock").exists():
        assert no_lock.returncode == 2 and "cluster/requirements.lock: missing or without hashes" in no_lock.stderr
