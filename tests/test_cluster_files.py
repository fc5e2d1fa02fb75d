"""cluster/: the launcher YAML and KubeRay manifests parse, run the project's real entrypoints
and configs, put GPUs only on the autoscaled worker group, and expose nothing outside."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/opt/raybias/"  # where cluster/Dockerfile puts the repository
RUN_CONFIGS = ("configs/celeba.yaml", "configs/waterbirds.yaml", "configs/utkface.yaml")
EXPOSING_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute"}


def _docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests():
    out = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        out += [(path.name, d) for d in _docs(path)]
    return out


def _walk(node, path=()):
    """Every (path, key, value) in a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def _repo_path(token: str) -> Path:
    return REPO / (token[len(IMAGE_ROOT):] if token.startswith(IMAGE_ROOT) else token)


def _raybias_commands(text: str):
    """The raybias invocations in a shell command: `python jobs/X.py ...` or `raybias STAGE ...`."""
    argv = shlex.split(text)
    return [argv[i:] for i, a in enumerate(argv)
            if (a.endswith(".py") and "/jobs/" in f"/{a}") or a == "raybias"]


def test_every_cluster_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"aws.yaml", "raycluster.yaml", "rayjob.yaml", "storage.yaml"}
    for f in files:
        assert _docs(f), f"{f} is empty"
    assert (CLUSTER / "README.md").is_file() and (CLUSTER / "Dockerfile").is_file()


def test_the_run_configs_the_cluster_files_name_exist():
    for rel in RUN_CONFIGS:
        assert (REPO / rel).is_file(), f"{rel} is missing"
    readme = (CLUSTER / "README.md").read_text()
    for rel in set(re.findall(r"configs/[\w.-]+\.yaml", readme)):
        assert (REPO / rel).is_file(), f"cluster/README.md names {rel}, which does not exist"


def test_the_launcher_config_is_valid_and_safe():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    import jsonschema

    jsonschema.validate(config, schema)  # the launcher's own schema

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert "GPU" not in head.get("resources", {}) or head["resources"]["GPU"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU instance
    (gpu_name, gpu), = workers.items()
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance
    assert config["docker"]["worker_image"].endswith("-gpu")

    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "/home/ray/raybias" in setup
    assert config["file_mounts"]["/home/ray/raybias"] == "."

    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    everything = yaml.safe_dump(config)
    assert "0.0.0.0" not in everything  # nothing of Ray bound or opened to every address


def test_kuberay_manifests_use_gpus_on_an_autoscaled_worker_group():
    manifests = _manifests()
    kinds = {d["kind"] for _, d in manifests}
    assert {"RayCluster", "RayJob"} <= kinds
    specs = []
    for _, d in manifests:
        if d["kind"] == "RayCluster":
            specs.append(d["spec"])
        elif d["kind"] == "RayJob":
            specs.append(d["spec"]["rayClusterSpec"])
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1"
    for spec in specs:
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"]["mode"] == "token"
        head = spec["headGroupSpec"]
        for c in head["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in str(c.get("resources", {}))
        (gpu,) = spec["workerGroupSpecs"]
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        (worker,) = gpu["template"]["spec"]["containers"]
        assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        # Shared storage: the same volume at the same path on every pod.
        mounts = {(m["name"], m["mountPath"]) for m in worker["volumeMounts"]}
        assert mounts >= {(m["name"], m["mountPath"]) for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
        claims = [v for v in gpu["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims


def test_the_rayjob_runs_the_projects_entrypoint_on_shared_storage():
    (job,) = [d for _, d in _manifests() if d["kind"] == "RayJob"]
    commands = _raybias_commands(job["spec"]["entrypoint"])
    assert commands, job["spec"]["entrypoint"]
    for argv in commands:
        script = argv[0]
        if script.endswith(".py"):
            assert _repo_path(script).is_file(), f"{script} is not in the repository"
            config = argv[1]
        else:
            config = argv[2]
        assert _repo_path(config).is_file(), f"{config} is not in the repository"
        assert _repo_path(config).relative_to(REPO).as_posix() in RUN_CONFIGS
        run_dir = argv[argv.index("--run-dir") + 1]
        assert run_dir.startswith("s3://") or os.path.isabs(run_dir)  # storage every pod shares
        assert "--resume" in argv  # a retried job continues instead of redoing
    # The entry script forwards to the CLI's run command.
    assert 'main(["run"' in (REPO / "jobs" / "run.py").read_text()
    # The PVC the pods mount is defined.
    claim_names = {d["metadata"]["name"] for _, d in _manifests() if d["kind"] == "PersistentVolumeClaim"}
    used = {vol["persistentVolumeClaim"]["claimName"]
            for _, key, volumes in _walk(job) if key == "volumes"
            for vol in volumes if "persistentVolumeClaim" in vol}
    assert used and used <= claim_names
    assert {d["spec"]["accessModes"][0] for _, d in _manifests() if d["kind"] == "PersistentVolumeClaim"} == {
        "ReadWriteMany"}


def test_nothing_is_exposed_outside_the_cluster():
    for name, d in _manifests():
        assert d["kind"] not in EXPOSING_KINDS, f"{name}: {d['kind']}"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", name
        for path, key, value in _walk(d):
            if key == "serviceType":
                assert value == "ClusterIP", f"{name}: {'.'.join(map(str, path))}"
            assert key not in ("hostNetwork", "hostPort"), f"{name}: {key} at {'.'.join(map(str, path))}"
            if key == "type" and value in EXPOSING_SERVICE_TYPES:
                pytest.fail(f"{name}: a {value} service at {'.'.join(map(str, path))}")
            if key == "dashboard-host" and value == "0.0.0.0":
                # Only inside the pod network: the head group must then be ClusterIP-only.
                head = path[:-1]
                group = d
                for p in head:
                    group = group[p]
                assert group.get("serviceType") == "ClusterIP", f"{name}: dashboard on 0.0.0.0 without ClusterIP"


@pytest.mark.parametrize("where", ["cluster/README.md", "cluster/kuberay/raycluster.yaml"])
def test_the_instructions_submit_through_a_tunnel(where):
    text = (REPO / where).read_text()
    assert "raybias submit" in text and "http://127.0.0.1:8265" in text
    assert "port-forward" in text
