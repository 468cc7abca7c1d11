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
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    _configure_from_network_interfaces(cfg)  # Ray's own check of NetworkInterfaces (subnet + groups on each)

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert gpu and all(re.match(r"(p4d|p5|p5e|g5|g6)\.", t["node_config"]["InstanceType"]) for t in gpu)
    assert any(t["max_workers"] > 0 for t in gpu)
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
        node = node_type["node_config"]
        groups = node.get("SecurityGroupIds") or [g for ni in node.get("NetworkInterfaces", []) for g in ni["Groups"]]
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
    assert command[:3] == ["dmvae-scale", "pipeline", "/configs/imagenet256"]
    from dmvae_scale.pipeline.spec import load_pipeline
    filled = [w.replace("<your-bucket>", "example-bucket").replace("<dinov2-sha256>", "ab" * 32) for w in command]
    overrides = [w for w in filled[3:filled.index("--store")]]
    assert overrides == ["tokenizer:tokenizer.encoder.sha256=" + "ab" * 32]
    load_pipeline(REPO / "configs" / "imagenet256", filled[filled.index("--store") + 1], overrides)  # valid today


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
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE_DIGEST$", text, re.M), "the digest has no default: a placeholder is refused"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}@\$\{RAY_IMAGE_DIGEST\} AS base$", text, re.M)
    pip_lines = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line
                 and not line.lstrip().startswith("#")]
    for line in pip_lines:  # every pip install: from a hash lock, or this checkout / apex without dependencies
        assert "--require-hashes" in line or "--no-deps" in line, line
    assert sum("--require-hashes" in line for line in pip_lines) == 2
    # The lock's inputs pin every package exactly: test_every_pip_input_and_the_efa_stage_are_pinned.
    # The build script refuses without a digest (before docker runs) and names what to do.
    refused = subprocess.run([str(CLUSTER / "build-image.sh"), "-t", "x"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "RAY_IMAGE_DIGEST": "sha256:<digest>"})
    assert refused.returncode == 2
    assert "RAY_IMAGE_DIGEST: expected the base image's digest, sha256: and 64 hex digits" in refused.stderr
    no_lock = subprocess.run([str(CLUSTER / "build-image.sh"), "-t", "x", "--build-arg", "WITH_EFA=0"],
                             capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "RAY_IMAGE_DIGEST": "sha256:" + "a" * 64})
    if not (CLUSTER / "requirements.lock").exists():
        assert no_lock.returncode == 2 and "cluster/requirements.lock: missing or without hashes" in no_lock.stderr


# EFA interfaces per instance type: one per network card (AWS: p5 / p5e 32 cards, p4d 4).
EFA_INTERFACES = {"p5.48xlarge": 32, "p5e.48xlarge": 32, "p4d.24xlarge": 4, "p4de.24xlarge": 4}
IMAGENET256 = REPO / "configs" / "imagenet256"


def _local_paths_the_configs_name() -> set[str]:
    """Every weights / data location configs/imagenet256 names that is not s3:// (resolved by the config loader for
    the stage configs, read from pipeline.yaml for its steps' sources)."""
    paths = set()
    for path in sorted(IMAGENET256.glob("*.yaml")):
        if path.name == "pipeline.yaml":
            steps = yaml.safe_load(path.read_text())["steps"]
            paths |= {s["source"] for s in steps if "source" in s}
            continue
        cfg = load_config(path)
        paths |= {cfg.data.source, cfg.loss.perceptual_weights if hasattr(cfg, "loss") else None,
                  cfg.tokenizer.encoder.weights if hasattr(cfg, "tokenizer") else None}
    return {p for p in paths if p and not p.startswith("s3://")}


def _launcher_mounts() -> dict[str, str]:
    cfg = _load("aws-gpu.yaml")
    mounts = {}
    for opt in cfg["docker"]["run_options"]:
        if opt.startswith("--volume "):
            host, container, mode = opt.split()[1].split(":")
            assert mode == "ro", opt
            mounts[container] = host
    return mounts


@pytest.mark.unit
def test_every_local_path_the_imagenet256_configs_name_is_mounted_by_both_cluster_files():
    paths = _local_paths_the_configs_name()
    assert {"/weights/dinov2_vitl14_pretrain.pth", "/weights/vgg16-397923af.pth", "/data/imagenet"} <= paths
    launcher = _launcher_mounts()
    init = " ".join(_load("aws-gpu.yaml")["initialization_commands"])
    for container, host in launcher.items():  # each bound host folder is filled or mounted on the host first
        assert host.rstrip("/") in init, f"{host}: bound into the container but never made on the host"
    for name, template in _rayjob_templates():
        kube = {m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
        for path in paths:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in launcher), f"aws-gpu.yaml: {path}"
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in kube), f"kuberay {name}: {path}"


@pytest.mark.unit
def test_gpu_workers_get_every_efa_interface_and_a_placement_group():
    cfg = _load("aws-gpu.yaml")
    text = (CLUSTER / "README.md").read_text()
    gpu = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    assert {"p5.48xlarge", "p4d.24xlarge"} <= {t["node_config"]["InstanceType"] for t in gpu.values()}
    for name, node_type in gpu.items():
        node = node_type["node_config"]
        interfaces = node["NetworkInterfaces"]
        assert len(interfaces) == EFA_INTERFACES[node["InstanceType"]], name
        assert all(ni["InterfaceType"] == "efa" for ni in interfaces), name
        assert sorted(ni["NetworkCardIndex"] for ni in interfaces) == list(range(len(interfaces))), name
        assert [ni["DeviceIndex"] for ni in interfaces] == [0] + [1] * (len(interfaces) - 1), name
        assert len({ni["SubnetId"] for ni in interfaces}) == 1, name  # one subnet: the placement group's zone
        group = node["Placement"]["GroupName"]
        assert f"aws ec2 create-placement-group --group-name {group} --strategy cluster" in text, group
        run = node_type["docker"]["worker_run_options"]
        assert "--device=/dev/infiniband" in run and "--ulimit memlock=-1:-1" in run, name
    assert "Placement" not in cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    assert cfg["provider"]["use_internal_ips"] is True  # several interfaces: no public address on GPU nodes
    assert "," not in cfg["provider"]["availability_zone"]  # a cluster placement group lives in one zone


@pytest.mark.unit
def test_head_advertises_no_cpus_or_gpus_so_only_drivers_run_there():
    cfg = _load("aws-gpu.yaml")
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    head = _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "--entrypoint-num-cpus 0" in (CLUSTER / "aws-gpu.yaml").read_text()  # the driver's reservation, stated


@pytest.mark.unit
def test_rayjob_reads_the_configs_from_a_configmap_and_bakes_no_bucket():
    job_text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert "s3://my-bucket" not in job_text
    job = _load("kuberay-rayjob.yaml")
    command = job["spec"]["entrypoint"].split()
    config_dir = command[2]
    for name, template in _rayjob_templates():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for c in template["spec"]["containers"] for m in c["volumeMounts"]}
        assert mounts[config_dir].get("readOnly") is True, name
        cm = volumes[mounts[config_dir]["name"]]["configMap"]["name"]
        assert f"kubectl create configmap {cm} --from-file=configs/imagenet256/" in job_text
        assert f"kubectl create configmap {cm} --from-file=configs/imagenet256/" in (CLUSTER / "README.md").read_text()
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"].get("vpc.amazonaws.com/efa") == res["requests"].get("vpc.amazonaws.com/efa")
    assert "EFA (optional)" in job_text


@pytest.mark.unit
def test_every_pip_input_and_the_efa_stage_are_pinned():
    from packaging.requirements import Requirement
    import tomllib
    wanted = {}
    for name in ("requirements-image.in", "requirements-flash-attn.in"):
        for line in (CLUSTER / name).read_text().splitlines():
            if line and not line.startswith("#"):
                req = Requirement(line)
                assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
                wanted[req.name.lower()] = next(iter(req.specifier)).version
    assert {"flash-attn", "ninja", "packaging", "einops", "torch"} <= set(wanted)
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)  # each package dependency pinned inside pyproject.toml's own range
        assert req.specifier.contains(wanted[req.name.lower()]), dep
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:\d+\.\d+\.\d+-py\d+-cu\d+$", text, re.M)  # an exact tag
    assert re.search(r"^ARG WITH_EFA=1$", text, re.M) and re.search(r"^FROM efa-\$\{WITH_EFA\} AS image$", text, re.M)
    assert re.search(r"^ARG EFA_INSTALLER_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert "sha256sum -c" in text and re.search(r"^ARG EFA_INSTALLER_SHA256$", text, re.M)
    for var in ("FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1", "FI_EFA_FORK_SAFE=1"):
        assert var in text, var


@pytest.mark.unit
def test_build_script_wants_the_efa_sha_unless_built_without_efa(tmp_path):
    import subprocess
    env = {"PATH": os.environ["PATH"], "RAY_IMAGE_DIGEST": "sha256:" + "a" * 64, "EFA_INSTALLER_SHA256": "x"}
    script = str(CLUSTER / "build-image.sh")
    refused = subprocess.run([script, "-t", "x"], capture_output=True, text=True, env=env)
    if not (CLUSTER / "image-pins.env").exists():
        assert refused.returncode == 2 and "error: EFA_INSTALLER_SHA256: expected 64 hex digits" in refused.stderr
    no_efa = subprocess.run([script, "-t", "x", "--build-arg", "WITH_EFA=0"], capture_output=True, text=True, env=env)
    assert "EFA_INSTALLER_SHA256" not in no_efa.stderr
    if not (CLUSTER / "requirements.lock").exists():
        assert no_efa.returncode == 2 and "cluster/requirements.lock: missing or without hashes" in no_efa.stderr
