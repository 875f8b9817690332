"""The cluster definitions parse, ask for one GPU per worker, run the pinned Ray, and name entrypoints and configs
that exist and validate."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from whisper_lora.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_PIN = re.search(r'"ray\[[^\]]+\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


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


def _ray_pod_specs(document: dict) -> list[dict]:
    spec = document["spec"].get("rayClusterSpec", document["spec"])
    return [spec["headGroupSpec"]] + spec["workerGroupSpecs"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_give_each_worker_one_gpu_and_run_the_pinned_ray(name):
    document = _yaml(CLUSTER / "kuberay" / name)
    spec = document["spec"].get("rayClusterSpec", document["spec"])
    assert spec["rayVersion"] == RAY_PIN
    head, *workers = _ray_pod_specs(document)
    assert workers, "no worker group"
    for group in workers:
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["image"] == head["template"]["spec"]["containers"][0]["image"]


def test_every_pod_mounts_the_shared_output_dir_of_the_cluster_config():
    shared = Path(load_config(ROOT / "ray_jobs" / "configs" / "cluster.yaml").output_dir)
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for group in _ray_pod_specs(_yaml(CLUSTER / "kuberay" / name)):
            for container in group["template"]["spec"]["containers"]:
                mounts = [Path(mount["mountPath"]) for mount in container["volumeMounts"]]
                assert any(shared.is_relative_to(mount) for mount in mounts), f"{name}: {shared} not mounted"
    launcher = _yaml(CLUSTER / "launcher" / "aws-gpu.yaml")
    volumes = [option.split()[-1] for option in launcher["docker"]["run_options"] if option.startswith("-v ")]
    assert any(shared.is_relative_to(volume.split(":")[-1]) for volume in volumes)


def test_entrypoints_named_anywhere_exist_and_their_configs_validate(tmp_path):
    texts = [path.read_text() for path in CLUSTER.rglob("*") if path.is_file()]
    texts += [path.read_text() for path in (ROOT / "ray_jobs").rglob("*.py")]
    texts += [(ROOT / "README.md").read_text()]
    commands = [argv for text in texts for argv in _entrypoints(text)]
    assert any(argv[0] == "ray_jobs/tune_languages.py" for argv in commands)
    for argv in commands:
        _check_entrypoint(argv, tmp_path)
    rayjob = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    _check_entrypoint(shlex.split(rayjob["spec"]["entrypoint"])[1:], tmp_path)


def test_launcher_runtime_env_and_image_agree_with_the_project():
    launcher = _yaml(CLUSTER / "launcher" / "aws-gpu.yaml")
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
    minimum = int(re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text()).group(1))
    assert int(re.search(r"-py3(\d+)", dockerfile).group(1)) >= minimum
    for copied in re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, re.MULTILINE):
        for name in copied.split():
            assert (ROOT / name).exists(), f"Dockerfile copies missing {name}"
