"""cluster/: least privilege. On AWS both node types get an instance profile scoped to the run
bucket and a security group that does not open SSH to the world; on Kubernetes every Ray
pod runs as non-root without capabilities or an API token (only the autoscaler sidecar
mounts one), behind an egress policy; the image pins the Ray it is tagged with."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _statements(role) -> list:
    out = []
    for policy in role["Properties"].get("Policies", []):
        out += policy["PolicyDocument"]["Statement"]
    return out


def test_aws_nodes_get_bucket_scoped_profiles_and_a_private_security_group():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    (worker_name,) = [k for k in types if k != config["head_node_type"]]
    worker = types[worker_name]["node_config"]
    # Each node type names its own profile: Ray's default head role (EC2 + S3 full access) is
    # never created, and the GPU workers can reach s3:// run directories.
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/raybias-head")
    assert worker["IamInstanceProfile"]["Arn"].endswith(":instance-profile/raybias-worker")
    # Given groups: Ray does not make its default group, which opens SSH to 0.0.0.0/0.
    assert head["SecurityGroupIds"] and head["SecurityGroupIds"] == worker["SecurityGroupIds"]

    (access,) = _docs(CLUSTER / "aws-access.yaml")
    res = access["Resources"]
    profiles = {r["Properties"]["InstanceProfileName"]["Fn::Sub"]: r for r in res.values()
                if r["Type"] == "AWS::IAM::InstanceProfile"}
    assert set(profiles) == {"${ClusterName}-head", "${ClusterName}-worker"}
    assert access["Parameters"]["ClusterName"]["Default"] == config["cluster_name"]

    # S3: the run bucket only, for both roles.
    bucket = res["RunBucketAccess"]["Properties"]["PolicyDocument"]["Statement"]
    s3_resources = {r["Fn::Sub"] for st in bucket for r in
                    (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])}
    assert s3_resources == {"arn:${AWS::Partition}:s3:::${RunBucket}", "arn:${AWS::Partition}:s3:::${RunBucket}/*"}
    assert all(a.startswith("s3:") and "*" not in a for st in bucket for a in st["Action"])
    for role in ("HeadRole", "WorkerRole"):
        props = res[role]["Properties"]
        assert props["ManagedPolicyArns"] == [{"Ref": "RunBucketAccess"}]
        for st in _statements(res[role]):
            assert not any(a.startswith("s3:") for a in st["Action"]), st
    assert _statements(res["WorkerRole"]) == []  # workers: the bucket, nothing else
    # The head: destructive EC2 actions only on this cluster's tagged instances; PassRole only
    # of the worker role.
    for st in _statements(res["HeadRole"]):
        destructive = {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:DeleteTags"} & set(st["Action"])
        if destructive:
            assert st["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == {"Ref": "ClusterName"}
        if "iam:PassRole" in st["Action"]:
            assert st["Resource"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
        assert not any(a.endswith(":*") or a == "*" for a in st["Action"]), st

    # The security group: SSH from the SshCidr parameter only, never the world.
    group = res["ClusterSecurityGroup"]["Properties"]
    (ssh,) = group["SecurityGroupIngress"]
    assert (ssh["FromPort"], ssh["ToPort"], ssh["CidrIp"]) == (22, 22, {"Ref": "SshCidr"})
    assert "Default" not in access["Parameters"]["SshCidr"]  # must be given
    (rule,) = access["Rules"]["SshNotOpenToTheWorld"]["Assertions"]
    assert rule["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SshCidr"}, "0.0.0.0/0"]}]}
    internal = res["ClusterInternalTraffic"]["Properties"]
    assert internal["SourceSecurityGroupId"] == internal["GroupId"] == {"Ref": "ClusterSecurityGroup"}
    assert "0.0.0.0/0" not in yaml.safe_dump(res)
    # The CIDR parameter is documented where users look.
    readme = (CLUSTER / "README.md").read_text()
    assert "SshCidr" in readme and "aws-access.yaml" in readme


def _pod_specs():
    """(where, pod spec) of every pod template in the KubeRay manifests."""
    out = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for d in _docs(path):
            if d["kind"] == "RayCluster":
                specs = [("cluster", d["spec"])]
            elif d["kind"] == "RayJob":
                specs = [("job", d["spec"]["rayClusterSpec"])]
                out.append((f"{path.name}:submitter", d["spec"]["submitterPodTemplate"]["spec"]))
            else:
                continue
            for _, spec in specs:
                out.append((f"{path.name}:head", spec["headGroupSpec"]["template"]["spec"]))
                for g in spec["workerGroupSpecs"]:
                    out.append((f"{path.name}:{g['groupName']}", g["template"]["spec"]))
    return out


def test_kuberay_pods_run_unprivileged_without_an_api_token():
    pods = _pod_specs()
    assert len(pods) == 5  # raycluster head + gpu, rayjob submitter + head + gpu
    for where, pod in pods:
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert not sc.get("privileged"), where


def test_only_the_autoscaler_sidecar_mounts_an_api_token():
    for path in ("raycluster.yaml", "rayjob.yaml"):
        (d,) = [x for x in _docs(CLUSTER / "kuberay" / path) if x["kind"] in ("RayCluster", "RayJob")]
        spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
        auto = spec["autoscalerOptions"]
        assert auto["securityContext"]["allowPrivilegeEscalation"] is False
        assert auto["securityContext"]["capabilities"]["drop"] == ["ALL"]
        (mount,) = auto["volumeMounts"]
        assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"]
        head = spec["headGroupSpec"]["template"]["spec"]
        (vol,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
        sources = vol["projected"]["sources"]
        token = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
        assert token and token[0]["expirationSeconds"] <= 3600
        for c in head["containers"]:  # the Ray container itself does not mount it
            assert mount["name"] not in {m["name"] for m in c.get("volumeMounts", [])}


def test_kuberay_egress_is_limited():
    policies = [d for d in _docs(CLUSTER / "kuberay" / "networkpolicy.yaml") if d["kind"] == "NetworkPolicy"]
    (egress,) = [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
    assert egress["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "raybias"}
    rules = egress["spec"]["egress"]
    for rule in rules:
        for peer in rule["to"]:
            if "ipBlock" in peer:
                # anything outside the pod network: only on listed ports, never instance metadata
                assert rule.get("ports"), rule
                assert "169.254.0.0/16" in peer["ipBlock"].get("except", []) or \
                    "169.254.169.254/32" in peer["ipBlock"].get("except", [])
    ports = {p["port"] for r in rules if any("ipBlock" in x for x in r["to"]) for p in r["ports"]}
    assert ports == {443}
    dns = [r for r in rules if any(p.get("port") == 53 for p in r.get("ports", []))]
    assert dns


def test_the_image_pins_the_ray_of_its_tag_and_of_this_project():
    import importlib.metadata

    text = (CLUSTER / "Dockerfile").read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert re.search(r'pip install [^\n]*"ray\[default\]==\$\{RAY_VERSION\}"', text)
    assert "FROM rayproject/ray:${RAY_VERSION}-" in text
    installed = importlib.metadata.version("ray")
    assert version.split(".")[:2] == installed.split(".")[:2], (version, installed)
    # the manifests and the launcher name the same Ray
    for path in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert f'rayVersion: "{version}"' in (CLUSTER / path).read_text()
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert aws["docker"]["head_image"].startswith(f"rayproject/ray:{version}-")
    assert aws["docker"]["worker_image"].startswith(f"rayproject/ray:{version}-")
    assert re.search(r"^USER 1000", text, re.M)  # numeric: runAsNonRoot can verify it
