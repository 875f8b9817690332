"""The cluster definitions: they parse, run the pinned Ray and the locked stack from a fully qualified image, name
entrypoints and configs that exist and validate, and are safe and schedulable: token auth on every node, no
secrets in the files, the dashboard never public, a NetworkPolicy that admits only the Ray cluster itself, IAM
scoped to the two buckets the cluster config uses and given to every node, pods that fit the priced instance
types, autoscaling on wherever replicas may vary, and a config that requests GPUs."""

from __future__ import annotations

import json
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from whisper_lora.config import DEFAULT_INSTANCES, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS = CLUSTER / "aws"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
CLUSTER_CONFIG = ROOT / "ray_jobs" / "configs" / "cluster.yaml"
LOCK = CLUSTER / "requirements-gpu.txt"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
RAY_PIN = re.search(r'"ray\[[^\]]+\]==([\d.]+)"', PYPROJECT).group(1)
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.MULTILINE).group(1)
TEXT_SUFFIXES = {".yaml", ".json", ".md", ".txt", ".py", ""}

# AWS shapes (vCPU, GiB) of the instance types the files name. A pod may use what kubelet leaves: one vCPU and
# about 18% of memory go to the system reserve, eviction threshold and daemonsets (GPU device plugin, CNI, proxy).
NODE_SHAPES = {"g4dn.xlarge": (4, 16), "g5.2xlarge": (8, 32), "m5.2xlarge": (8, 32)}
RESERVED_CPU, USABLE_MEMORY = 1, 0.82
AUTOSCALER_DEFAULT = {"cpu": "500m", "memory": "512Mi"}  # KubeRay's sidecar in the head pod
# Ports every Ray node listens on: GCS, dashboard, client, object manager (launcher), the worker range, agent.
RAY_PORTS = [6379, 8265, 10001, 8076, 10002, 19999, 52365]
DASHBOARD = 8265
# AWS has no resource-level permission for these: "*" is the only resource they take.
DESCRIBED = ("Instances", "InstanceTypes", "Images", "Subnets", "SecurityGroups", "KeyPairs")
UNSCOPABLE = {"ecr:GetAuthorizationToken"} | {f"ec2:Describe{thing}" for thing in DESCRIBED}
S3_ACTIONS = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
S3_WRITES = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _cluster_text_files() -> list[Path]:
    paths = [path for path in CLUSTER.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    return [path for path in paths if path.suffix in TEXT_SUFFIXES] + [CLUSTER_CONFIG]


def _ray_clusters() -> dict[str, dict]:
    """Every Ray cluster KubeRay creates from our files: {name: RayClusterSpec} (a RayJob's cluster by job name)."""
    clusters = {}
    for path in KUBERAY.glob("*.yaml"):
        for document in _documents(path):
            if document["kind"] == "RayCluster":
                clusters[document["metadata"]["name"]] = document["spec"]
            elif document["kind"] == "RayJob":
                clusters[document["metadata"]["name"]] = document["spec"]["rayClusterSpec"]
    assert set(clusters) == {"whisper-lora", "whisper-lora-tune"}
    return clusters


def _ray_pod_specs(document: dict) -> list[dict]:
    spec = document["spec"].get("rayClusterSpec", document["spec"])
    return [spec["headGroupSpec"]] + spec["workerGroupSpecs"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(node type as KubeRay labels the pods, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [("worker", group) for group in spec["workerGroupSpecs"]]


def _pod_labels(node_type: str, group: dict) -> dict[str, str]:
    """The labels a pod of this group carries: the template's plus the ones KubeRay adds."""
    return {**group["template"].get("metadata", {}).get("labels", {}), "ray.io/node-type": node_type}


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gib(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for unit, scale in units.items():
        if str(quantity).endswith(unit):
            return float(str(quantity)[: -len(unit)]) * scale
    return float(quantity) / 2**30


def _policies(directory: Path) -> list[tuple[str, dict]]:
    """(file name, document) of every IAM permission policy under ``directory`` (trust policies name a Principal)."""
    documents = [(path.name, json.loads(path.read_text())) for path in sorted(directory.glob("*.json"))]
    return [(name, doc) for name, doc in documents if all("Principal" not in s for s in doc["Statement"])]


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _bucket_and_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def test_kuberay_manifests_give_each_worker_one_gpu_and_run_the_pinned_ray():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        document = _yaml(KUBERAY / name)
        spec = document["spec"].get("rayClusterSpec", document["spec"])
        assert spec["rayVersion"] == RAY_PIN
        head, *workers = _ray_pod_specs(document)
        assert workers, "no worker group"
        for group in workers:
            for container in group["template"]["spec"]["containers"]:
                assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
                assert container["image"] == head["template"]["spec"]["containers"][0]["image"]


def test_every_pod_mounts_the_shared_output_dir_of_the_cluster_config():
    shared = Path(load_config(CLUSTER_CONFIG).output_dir)
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for group in _ray_pod_specs(_yaml(KUBERAY / name)):
            for container in group["template"]["spec"]["containers"]:
                mounts = [Path(mount["mountPath"]) for mount in container["volumeMounts"]]
                assert any(shared.is_relative_to(mount) for mount in mounts), f"{name}: {shared} not mounted"
    launcher = _yaml(LAUNCHER)
    volumes = [option.split()[-1] for option in launcher["docker"]["run_options"] if option.startswith("-v ")]
    assert any(shared.is_relative_to(volume.split(":")[-1]) for volume in volumes)


def _entrypoints(text: str) -> list[list[str]]:
    """Every ``python ray_jobs/….py …`` command in a file, as argv lists."""
    commands = re.findall(r"python (ray_jobs/\S+\.py[^\n\\`]*)", text)
    return [shlex.split(command) for command in commands]


def _check_entrypoint(argv: list[str], tmp_path: Path) -> None:
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"
    assert "--config" in argv, f"{argv} names no config"
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.is_file(), f"{config} does not exist"
    overrides = argv[argv.index("--config") + 2 :]
    source = _yaml(config)["data"]["source"]["path"]
    if "://" not in source:  # a local corpus (the demo's) exists only after `make demo`
        overrides.append(f"data.source.path={tmp_path}")
    load_config(config, overrides)  # validates every field (remote paths are not checked)


def test_entrypoints_named_anywhere_exist_and_their_configs_validate(tmp_path):
    texts = [path.read_text() for path in _cluster_text_files()]
    texts += [path.read_text() for path in (ROOT / "ray_jobs").rglob("*.py")]
    texts += [(ROOT / "README.md").read_text()]
    commands = [argv for text in texts for argv in _entrypoints(text)]
    assert any(argv[0] == "ray_jobs/tune_languages.py" for argv in commands)
    for argv in commands:
        _check_entrypoint(argv, tmp_path)
    rayjob = _yaml(KUBERAY / "rayjob.yaml")
    _check_entrypoint(shlex.split(rayjob["spec"]["entrypoint"])[1:], tmp_path)


def test_launcher_runtime_env_and_image_agree_with_the_project():
    launcher = _yaml(LAUNCHER)
    head = launcher["head_node_type"]
    assert head in launcher["available_node_types"]
    gpu_nodes = [node for node in launcher["available_node_types"].values() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_nodes and all(node["max_workers"] >= 1 for node in gpu_nodes)
    runtime_env = _yaml(CLUSTER / "runtime_env.yaml")
    assert runtime_env["working_dir"] == "." and ".venv/" in runtime_env["excludes"]
    assert not any(
        re.search(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD)(?:_|$)", key) for key in runtime_env.get("env_vars", {})
    )
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_PIN)}-", dockerfile, re.MULTILINE)
    minimum = int(re.search(r'requires-python = ">=3\.(\d+)"', PYPROJECT).group(1))
    assert int(re.search(r"-py3(\d+)", dockerfile).group(1)) >= minimum
    for copied in re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, re.MULTILINE):
        for name in copied.split():
            assert (ROOT / name).exists(), f"Dockerfile copies missing {name}"


def test_the_launcher_file_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_yaml(LAUNCHER)))  # Ray's own schema, after its defaults are merged in


def test_every_cluster_definition_runs_ray_with_token_auth():
    for name, spec in _ray_clusters().items():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: no token auth"
    launcher = _yaml(LAUNCHER)
    docker = launcher["docker"]
    for node in ("head", "worker"):  # run_options apply to every node; per-node options must not undo them
        options = " ".join(docker["run_options"] + docker.get(f"{node}_run_options", []))
        environment = dict(re.findall(r"(?:-e|--env) (\w+)=(\S+)", options))
        assert environment.get("RAY_AUTH_MODE") == "token", f"{node}: RAY_AUTH_MODE is not token"
        token_path = environment.get("RAY_AUTH_TOKEN_PATH")
        assert token_path in launcher["file_mounts"], f"{node}: the token file is not copied to the node"
        assert "RAY_AUTH_TOKEN=" not in options  # a literal token in the command line
    assert launcher["file_mounts"][token_path].startswith("~/"), "the token comes from the user's machine"
    for path in _cluster_text_files():
        assert "RAY_AUTH_MODE=disabled" not in path.read_text(), path


def test_clients_are_told_to_submit_with_the_token_through_a_tunnel():
    """Every ``ray job submit`` in cluster/ sets token mode and goes to a forwarded local port."""
    for path in _cluster_text_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "ray job submit --" in line:  # a command, not prose
                context = "\n".join(lines[max(0, number - 3) : number + 1])
                assert "RAY_AUTH_MODE=token" in context, f"{path.name}:{number + 1}: no RAY_AUTH_MODE=token"
                assert "--address http://127.0.0.1:8265" in line, f"{path.name}:{number + 1}: not through a tunnel"


def test_no_secrets_in_cluster_files_or_pod_environments():
    secret = re.compile(
        r"(?:A[KS]IA[0-9A-Z]{16})|aws_secret_access_key|(?:hf_[A-Za-z0-9]{20,})|\b[0-9a-f]{64}\b|auth_token\s*[:=]\s*['\"]?\w",
        re.IGNORECASE,
    )
    for path in _cluster_text_files():
        assert not secret.search(path.read_text()), f"{path}: looks like a literal secret"
    credential = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL")
    for name, spec in _ray_clusters().items():
        for node_type, group in _groups(spec):
            for container in group["template"]["spec"]["containers"]:
                assert not container.get("envFrom"), f"{name} {node_type}: a whole Secret in the environment"
                for variable in container.get("env", []):
                    if credential.search(variable["name"]):
                        assert "value" not in variable, f"{name}: literal {variable['name']}"
                        reference = variable["valueFrom"]["secretKeyRef"]
                        assert node_type == "head" and reference.get("optional") is True, variable["name"]
                    assert not variable["name"].startswith("AWS_"), f"{name}: AWS credentials in a pod"


def test_the_dashboard_is_never_on_a_public_address():
    for path in _cluster_text_files():
        for document in _documents(path) if path.suffix == ".yaml" else []:
            if isinstance(document, dict) and document.get("kind") == "Service":
                assert document["spec"].get("type", "ClusterIP") == "ClusterIP", path
    for name, spec in _ray_clusters().items():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: head service reachable from outside"
        assert not head.get("enableIngress"), f"{name}: dashboard behind an Ingress"
    launcher = _yaml(LAUNCHER)
    assert "0.0.0.0" not in LAUNCHER.read_text()
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start), "dashboard host not loopback"


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "matchExpressions: extend this test"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _port_matches(entry: dict, port: int) -> bool:
    if "port" not in entry:
        return True
    return entry["port"] <= port <= entry.get("endPort", entry["port"])


def _peers(policies: list[dict], labels: dict[str, str], port: int) -> list[dict] | None:
    """The sources allowed to reach a pod with ``labels`` on ``port``; None when no policy selects the pod (then
    Kubernetes admits everyone). ``{}`` stands for a rule without ``from``: every source."""
    selecting = [policy["spec"] for policy in policies if _selects(policy["spec"]["podSelector"], labels)]
    selecting = [spec for spec in selecting if "Ingress" in spec.get("policyTypes", ["Ingress"])]
    if not selecting:
        return None
    peers = []
    for spec in selecting:
        for rule in spec.get("ingress", []):
            if any(_port_matches(entry, port) for entry in rule.get("ports") or [{}]):
                peers.extend(rule.get("from") or [{}])
    return peers


def test_the_network_policy_admits_only_the_ray_cluster_itself():
    policies = _documents(KUBERAY / "networkpolicy.yaml")
    assert all(policy["kind"] == "NetworkPolicy" for policy in policies)
    for name, spec in _ray_clusters().items():
        submitter = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": name}
        for node_type, group in _groups(spec):
            labels = _pod_labels(node_type, group)
            instance = labels["app.kubernetes.io/instance"]
            for port in RAY_PORTS:
                peers = _peers(policies, labels, port)
                assert peers is not None, f"{name} {node_type}: no NetworkPolicy selects its pods"
                own = [peer for peer in peers if set(peer) == {"podSelector"} and _selects(peer["podSelector"], labels)]
                assert own, f"{name} {node_type}: its own cluster cannot reach port {port}"
                for peer in peers:
                    assert peer and "ipBlock" not in peer, f"{name} {node_type}: port {port} open to any address"
                    if peer in own:
                        assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/instance") == instance
                        continue
                    assert node_type == "head" and port == DASHBOARD, f"{name} {node_type}: {peer} on {port}"
                    if "namespaceSelector" in peer:  # the operator's namespace, named
                        assert set(peer) == {"namespaceSelector"}
                        assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
                    else:  # the RayJob's own submitter pod
                        assert peer["podSelector"]["matchLabels"] == submitter, peer
        other = next(other for other in _ray_clusters() if other != name)
        stranger = {"app.kubernetes.io/name": "whisper-lora", "app.kubernetes.io/instance": other}
        for node_type, group in _groups(spec):
            for peer in _peers(policies, _pod_labels(node_type, group), 6379):
                assert not _selects(peer["podSelector"], stranger), f"pods of {other} reach {name}"


def test_iam_policies_grant_no_wildcards():
    policies = _policies(AWS)
    assert {name for name, _ in policies} >= {"s3-policy.json", "launcher-head-policy.json", "ecr-pull-policy.json"}
    for name, policy in policies:
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
            actions = _listed(statement["Action"])
            assert not any("*" in action for action in actions), f"{name}: wildcard action in {actions}"
            resources = _listed(statement["Resource"])
            if "*" in resources:
                assert set(actions) <= UNSCOPABLE, f"{name}: {actions} on every resource"


def test_s3_access_is_the_two_buckets_the_cluster_config_uses():
    config = load_config(CLUSTER_CONFIG)
    data_bucket, _ = _bucket_and_key(config.data.source.path)
    written = [_bucket_and_key(uri) for uri in (config.train.storage_path, config.publish.storage)]
    artifacts_bucket = {bucket for bucket, _ in written}
    assert len(artifacts_bucket) == 1 and data_bucket not in artifacts_bucket
    (artifacts_bucket,) = artifacts_bucket
    assert re.fullmatch(r"<[a-z-]+>", data_bucket) and re.fullmatch(r"<[a-z-]+>", artifacts_bucket), "placeholders"
    grants: dict[str, set[str]] = {}
    for _, policy in _policies(AWS):
        for statement in policy["Statement"]:
            for resource in _listed(statement["Resource"]):
                actions = {action for action in _listed(statement["Action"]) if action.startswith("s3:")}
                if actions or resource.startswith("arn:aws:s3:"):
                    grants.setdefault(resource, set()).update(actions)
    assert all(actions <= S3_ACTIONS for actions in grants.values()), grants
    buckets = {resource.removeprefix("arn:aws:s3:::").split("/")[0] for resource in grants}
    assert buckets == {data_bucket, artifacts_bucket}, f"S3 access beyond the two buckets: {buckets}"
    data_objects = grants[f"arn:aws:s3:::{data_bucket}/*"]
    assert data_objects == {"s3:GetObject"}, "the corpus is read only"
    writable = [resource for resource, actions in grants.items() if actions & S3_WRITES]
    prefixes = [resource.removeprefix(f"arn:aws:s3:::{artifacts_bucket}/").removesuffix("*") for resource in writable]
    assert writable and all(resource.startswith(f"arn:aws:s3:::{artifacts_bucket}/") for resource in writable)
    for _, key in written:  # checkpoints (Ray Train deletes old ones) and adapters: read, write, delete
        covering = [prefix for prefix in prefixes if f"{key}/".startswith(prefix)]
        assert covering, f"{artifacts_bucket}/{key} is not writable"
        assert grants[f"arn:aws:s3:::{artifacts_bucket}/{covering[0]}*"] >= {"s3:GetObject"} | S3_WRITES
    for bucket in (data_bucket, artifacts_bucket):
        assert grants[f"arn:aws:s3:::{bucket}"] == {"s3:ListBucket"}


def test_every_node_and_pod_gets_the_role_and_the_launcher_head_passes_only_the_worker_role():
    launcher = _yaml(LAUNCHER)
    profiles = {}
    for node_type, node in launcher["available_node_types"].items():
        arn = node["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::<account>:instance-profile/[\w-]+", arn), f"{node_type}: no profile"
        assert node["node_config"].get("MetadataOptions", {}).get("HttpTokens") == "required"
        profiles[node_type] = arn.rsplit("/", 1)[1]
    head_policy = json.loads((AWS / "launcher-head-policy.json").read_text())
    passed = [
        resource
        for statement in head_policy["Statement"]
        if "iam:PassRole" in _listed(statement["Action"])
        for resource in _listed(statement["Resource"])
    ]
    workers = {profile for node_type, profile in profiles.items() if node_type != launcher["head_node_type"]}
    assert {resource.rsplit("/", 1)[1] for resource in passed} == workers
    terminate = [s for s in head_policy["Statement"] if "ec2:TerminateInstances" in _listed(s["Action"])]
    assert terminate and all(
        s["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == launcher["cluster_name"]
        for s in terminate
    ), "the head may terminate other instances"

    (account,) = _documents(KUBERAY / "serviceaccount.yaml")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::<account>:role/[\w-]+", role)
    trust = json.loads((AWS / "irsa-trust-policy.json").read_text())
    subjects = [value for s in trust["Statement"] for key, value in s["Condition"]["StringEquals"].items()]
    assert f"system:serviceaccount:<namespace>:{account['metadata']['name']}" in subjects
    for name, spec in _ray_clusters().items():
        for node_type, group in _groups(spec):
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == account["metadata"]["name"], f"{name} {node_type}: no IRSA role"
            if node_type == "worker":
                assert pod["automountServiceAccountToken"] is False, f"{name}: workers get a Kubernetes API token"


def test_images_are_fully_qualified_and_the_same_everywhere():
    images = {_yaml(LAUNCHER)["docker"]["image"]}
    for spec in _ray_clusters().values():
        for _, group in _groups(spec):
            images |= {container["image"] for container in group["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    (image,) = images
    match = re.fullmatch(r"(?P<registry>[\w<>-]+(?:\.[\w<>-]+)+(?::\d+)?)/(?P<name>[\w./<>-]+):(?P<tag>[\w.-]+)", image)
    assert match, f"{image}: not registry/name:tag"
    assert match["tag"] == VERSION and match["name"].endswith("whisper-lora")
    assert f"-t {image}" in (CLUSTER / "Dockerfile").read_text(), "the Dockerfile builds another name"


def _requests(container: dict) -> tuple[float, float, int]:
    requests = container["resources"]["requests"]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == requests.get("nvidia.com/gpu")
    return _cpu(requests["cpu"]), _gib(requests["memory"]), int(requests.get("nvidia.com/gpu", 0))


def test_pods_fit_the_instance_types_they_are_placed_on():
    priced = {row["name"]: row for row in DEFAULT_INSTANCES}
    for name, spec in _ray_clusters().items():
        for node_type, group in _groups(spec):
            pod = group["template"]["spec"]
            instance = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
            vcpus, memory = NODE_SHAPES[instance]
            cpu, gib, gpus = (sum(values) for values in zip(*map(_requests, pod["containers"]), strict=True))
            if node_type == "head" and spec.get("enableInTreeAutoscaling"):
                sidecar = spec.get("autoscalerOptions", {}).get("resources", {}).get("requests", AUTOSCALER_DEFAULT)
                cpu, gib = cpu + _cpu(sidecar["cpu"]), gib + _gib(sidecar["memory"])
            assert cpu <= vcpus - RESERVED_CPU, f"{name} {node_type}: {cpu} CPU on a {vcpus}-vCPU {instance}"
            assert gib <= memory * USABLE_MEMORY, f"{name} {node_type}: {gib:.1f} GiB on a {memory}-GiB {instance}"
            if gpus:
                assert instance in priced and gpus == priced[instance]["gpus"], f"{instance} is not what is priced"
    launcher = _yaml(LAUNCHER)
    for node in launcher["available_node_types"].values():
        instance = node["node_config"]["InstanceType"]
        vcpus, _ = NODE_SHAPES[instance]
        assert node["resources"].get("CPU", vcpus) <= vcpus
        if node["resources"].get("GPU"):
            assert instance in priced and node["resources"]["GPU"] == priced[instance]["gpus"]


def test_autoscaling_is_on_wherever_replicas_may_vary():
    for name, spec in _ray_clusters().items():
        for group in spec["workerGroupSpecs"]:
            low, high = group["minReplicas"], group["maxReplicas"]
            assert low <= group.get("replicas", low) <= high
            if low != high:
                assert spec.get("enableInTreeAutoscaling") is True, f"{name}: min/max replicas without autoscaler"
    launcher = _yaml(LAUNCHER)
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start, "the head runs no autoscaler"
    workers = [node for key, node in launcher["available_node_types"].items() if key != launcher["head_node_type"]]
    assert all(node["min_workers"] < node["max_workers"] <= launcher["max_workers"] for node in workers)
    commands = " ".join(
        str(command)
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
        for command in launcher.get(key, [])
    )
    assert "pip install" not in commands and all(key in launcher for key in ("setup_commands", "head_setup_commands"))


def test_the_cluster_config_requests_gpus_within_the_autoscalers_reach():
    config = load_config(CLUSTER_CONFIG)
    assert config.train.use_gpu is True, "decided from what exists at start: an autoscaling cluster has no GPU yet"
    gpus_at_once = config.tune.max_concurrent_trials * config.train.num_workers
    for name, spec in _ray_clusters().items():
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            cpu, _, gpus = _requests(container)
            assert gpus_at_once <= group["maxReplicas"] * gpus, f"{name}: trials wait forever"
            assert config.train.cpus_per_worker <= cpu / gpus, f"{name}: a Train worker fits no GPU pod"
    launcher = _yaml(LAUNCHER)
    gpu_nodes = [node for node in launcher["available_node_types"].values() if node["resources"].get("GPU")]
    assert gpus_at_once <= sum(node["max_workers"] * node["resources"]["GPU"] for node in gpu_nodes)


def _lock() -> tuple[dict[str, str], list[str]]:
    pins, options = {}, []
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("--"):
            options.append(line)
            continue
        name, equals, version = line.partition("==")
        assert equals and re.fullmatch(r"[\w.+-]+", version), f"{line}: not an exact pin"
        pins[canonicalize_name(name)] = version
    return pins, options


def test_the_dockerfile_installs_the_lock_file_and_nothing_else():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    installs = re.findall(r"pip install ([^&\n]+)", dockerfile)
    assert any(f"-r {LOCK.relative_to(ROOT)}" in install for install in installs), "the lock is not installed"
    for install in installs:
        assert "-r " in install or "--no-deps" in install, f"pip resolves anew: {install}"
    pins, options = _lock()
    cuda = re.search(r"^FROM \S+-(cu\d+)\s*$", dockerfile, re.MULTILINE).group(1)
    assert Version(pins["torch"]).local == cuda, "torch is not the CUDA build of the base image"
    assert f"--extra-index-url https://download.pytorch.org/whl/{cuda}" in options


def test_the_lock_pins_every_dependency_within_its_range():
    """Every base dependency is locked at a version pyproject allows. Which exact versions the tests ran on is
    checked for the libraries training loads (below): helpers like filelock move with the package index, and a
    fresh install picking up their next patch release is not a stale lock."""
    pins, _ = _lock()
    block = re.search(r"^dependencies = \[(.*?)^\]", PYPROJECT, re.MULTILINE | re.DOTALL).group(1)
    dependencies = [Requirement(line) for line in re.findall(r'^\s*"([^"]+)"', block, re.MULTILINE)]
    assert dependencies
    for dependency in dependencies:
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{name} is not in the lock (make gpu-lock)"
        assert dependency.specifier.contains(Version(pins[name]).public, prereleases=True), f"{name}=={pins[name]}"
    for name, version in pins.items():
        if name != "torch":
            assert "+" not in version, f"{name}=={version}: a local build"


@pytest.mark.parametrize(
    "library", ["ray", "accelerate", "pyarrow", "bitsandbytes", "peft", "transformers", "soxr", "jiwer"]
)
def test_the_lock_holds_the_libraries_training_loads_at_the_tested_version(library):
    pins, _ = _lock()
    assert pins[library] == metadata.version(library), "make gpu-lock"
