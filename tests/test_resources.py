"""GPU requests that wait: every GPU user asks through ``resources.worker_resources``, a stand-in resource name
queues the same way and runs on CPU, concurrency is not read off the cluster at start, and a Train run whose GPUs
do not exist stays pending rather than training on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from whisper_lora.config import ConfigError, JobConfig, load_config
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.resources import task_options, use_gpu, worker_resources
from whisper_lora.train.trainer import build_trainer
from whisper_lora.tune.search import grid_size, max_concurrent_trials


def _config(tmp_path: Path, *overrides: str) -> JobConfig:
    return load_config(None, [f"data.source.path={tmp_path}", f"output_dir={tmp_path}/runs", *overrides])


def test_a_worker_requests_one_gpu_resource_beside_its_cpus(tmp_path):
    config = _config(tmp_path, "train.cpus_per_worker=4")
    assert worker_resources(config, gpu=False) == (False, {"CPU": 4})
    assert worker_resources(config, gpu=True) == (True, {"GPU": 1, "CPU": 4})
    assert task_options(config, gpu=True, cpus=1) == {"num_cpus": 1, "num_gpus": 1, "resources": {}}
    assert task_options(config, gpu=False, cpus=1) == {"num_cpus": 1, "num_gpus": 0, "resources": {}}


def test_a_stand_in_resource_is_requested_the_same_way_and_runs_on_cpu(tmp_path):
    config = _config(tmp_path, "train.use_gpu=true", "train.gpu_resource=dry_run_gpu", "train.cpus_per_worker=1")
    assert worker_resources(config, gpu=True) == (False, {"dry_run_gpu": 1, "CPU": 1})
    options = task_options(config, gpu=True, cpus=0)
    assert options == {"num_cpus": 0, "num_gpus": 0, "resources": {"dry_run_gpu": 1}}
    for name in ("CPU", "memory", "node:1.2.3.4", ""):
        with pytest.raises(ConfigError, match="gpu_resource"):
            _config(tmp_path, f"train.gpu_resource={name}")


def test_the_train_workers_request_what_worker_resources_says(tmp_path):
    """``build_trainer`` on the driver's model (nothing resolved here), with the stand-in: Ray must see a CPU
    worker that asks for one dry_run_gpu."""
    config = _config(tmp_path, "train.use_gpu=true", "train.gpu_resource=dry_run_gpu", "train.num_workers=2",
                     "train.batch_size=2", "data.languages=hi")  # fmt: skip
    stats = config.run_dir / "prepared" / "stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"groups": {"hi/train": {"rows_out": 8}}}))
    base = ResolvedModel(path="/shared/models/hub/org--m/abc", spec="org/m", sha256="a" * 64, revision="abc")
    trainer = build_trainer(config, "hi", "run", base, gpu=use_gpu(config))
    scaling = trainer.scaling_config
    assert (scaling.num_workers, scaling.use_gpu) == (2, False)
    assert scaling.resources_per_worker == {"dry_run_gpu": 1, "CPU": 0.5}
    assert trainer.train_loop_config["base_path"] == base.path


def test_concurrency_with_gpus_is_not_read_off_the_cluster_at_start(tmp_path):
    config = _config(tmp_path, "data.languages=mr,hi,ta", "tune.ranks=8,16", "tune.learning_rates=1e-3,3e-4",
                     "train.num_workers=2", "train.use_gpu=true")  # fmt: skip
    assert grid_size(config) == 12
    no_gpu_node_yet = {"CPU": 8}
    assert max_concurrent_trials(config, no_gpu_node_yet, gpu=True) == 12  # trials queue; the autoscaler adds nodes
    assert max_concurrent_trials(config, {"CPU": 64, "GPU": 2}, gpu=True) == 12
    stand_in = _config(tmp_path, "data.languages=mr,hi", "tune.alphas=8,16", "train.gpu_resource=dry_run_gpu")
    assert max_concurrent_trials(stand_in, {"CPU": 4, "dry_run_gpu": 1}, gpu=True) == grid_size(stand_in) == 8
    pinned = _config(tmp_path, "tune.max_concurrent_trials=3", "train.num_workers=2")
    assert max_concurrent_trials(pinned, {"CPU": 8}, gpu=True) == 3
    assert max_concurrent_trials(pinned, {"CPU": 8}, gpu=False) == 3


def test_on_cpu_concurrency_is_still_real_cores_per_trial(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    config = _config(tmp_path, "train.num_workers=2", "train.torch_threads=2", "data.languages=mr,hi,ta")
    assert max_concurrent_trials(config, {"CPU": 16}, gpu=False) == 2  # 8 cores / (2 workers × 2 threads)
    assert max_concurrent_trials(config, {"CPU": 2}, gpu=False) == 1


def test_use_gpu_is_the_config_or_what_the_cluster_has(tmp_path, monkeypatch):
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 4, "dry_run_gpu": 2})
    assert use_gpu(_config(tmp_path, "train.use_gpu=true")) is True
    assert use_gpu(_config(tmp_path, "train.use_gpu=false", "train.gpu_resource=dry_run_gpu")) is False
    assert use_gpu(_config(tmp_path)) is False
    assert use_gpu(_config(tmp_path, "train.gpu_resource=dry_run_gpu")) is True


def _gpu_placement_groups() -> dict[str, str]:
    """State of every placement group whose bundles ask for a GPU."""
    import ray.util

    return {
        group_id: table["state"]
        for group_id, table in ray.util.placement_group_table().items()
        if any(bundle.get("GPU") for bundle in table["bundles"].values())
    }


DRIVER = """
import json, sys
import ray
from whisper_lora.config import JobConfig
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.train.trainer import build_trainer

config, base = JobConfig.model_validate_json(sys.argv[2]), ResolvedModel(**json.loads(sys.argv[3]))
ray.init(address=sys.argv[1], log_to_driver=False)
build_trainer(config, "hi", "waits-for-gpus", base, gpu=True).fit()
"""
"""A driver of its own, as ``whisper-lora train`` is: Ctrl-C (SIGINT) is how a user stops it."""
START_TIMEOUT_S = 10
"""Ray Train's wait for a worker group's placement group before it gives it back and asks again (60 s by
default; its controller retries without limit)."""


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_train_run_that_wants_gpus_waits_for_them_and_never_trains_on_cpu(ray_local, tiny_model_dir, tmp_path):
    """``train.use_gpu: true`` on a Ray without GPUs (as an autoscaling cluster before its GPU nodes start): the
    run's placement groups stay PENDING past Train's startup timeouts (each retry asks again), no worker starts,
    nothing is written; Ctrl-C stops it and leaves nothing. Ray 2.60's first Ctrl-C asks the controller to abort,
    which a controller waiting for its placement group never gets to; the third exits (Ray's forced stop), and the
    job's end removes its placement groups."""
    ray = ray_local
    before = set(_gpu_placement_groups())
    config = _config(tmp_path, "train.use_gpu=true", "data.languages=hi", "train.batch_size=2", "experiment=t",
                     f"train.storage_path={tmp_path}/ray", "train.max_steps=2").with_absolute_paths()  # fmt: skip
    stats = config.run_dir / "prepared" / "stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"groups": {"hi/train": {"rows_out": 8}}}))
    base = ResolvedModel(path=tiny_model_dir, spec=tiny_model_dir, sha256="a" * 64)
    address = ray.get_runtime_context().gcs_address
    arguments = [address, config.model_dump_json(), json.dumps(dataclasses.asdict(base))]
    log = (tmp_path / "driver.log").open("w")
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *arguments], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        started, pending_since, pending = time.monotonic(), None, set()
        while time.monotonic() - started < 150:  # imports, the controller, then its placement group: slow when busy
            assert driver.poll() is None, f"the run ended instead of waiting: {(tmp_path / 'driver.log').read_text()}"
            states = {k: v for k, v in _gpu_placement_groups().items() if k not in before}
            assert "CREATED" not in states.values(), "GPU bundles were placed on a cluster without GPUs"
            if "PENDING" in states.values():
                pending_since = pending_since or time.monotonic()
                pending |= {k for k, v in states.items() if v == "PENDING"}
                if time.monotonic() - pending_since >= 1.5 * START_TIMEOUT_S:
                    break
            time.sleep(1)
        waited = time.monotonic() - pending_since if pending_since else 0
        assert waited >= 1.5 * START_TIMEOUT_S and len(pending) >= 2, f"pending {waited:.0f} s, groups {pending}"
        assert ray.available_resources().get("CPU", 0) == 4, "workers hold CPUs: they started on CPU"
        assert not list((tmp_path / "ray").rglob("checkpoint_*")), "a checkpoint was written"
        for _ in range(3):
            driver.send_signal(signal.SIGINT)
            time.sleep(2)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    deadline, left = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        left = {k: v for k, v in _gpu_placement_groups().items() if k not in before and v != "REMOVED"}
        if not left:
            break
        time.sleep(1)
    assert not left, f"placement groups left behind: {left}"
