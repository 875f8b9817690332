"""What a GPU user asks Ray for: Train workers, the encoder-cache actors and the zero-shot and test-scoring tasks.

One request, built in one place (``worker_resources``), so that every GPU user waits the same way. A request for
a resource the cluster lacks is not an error in Ray: the task or placement group stays pending until a node that
has it joins, which is how an autoscaling cluster that starts without GPU nodes gets them. Whether to request GPUs
is therefore decided by the config (``train.use_gpu: true``) rather than by what the cluster holds at start; only
``use_gpu: null`` looks at the cluster, once.

``train.gpu_resource`` names the resource one GPU user requests: ``GPU``, or a custom resource that stands in for
GPUs on a CPU-only dry-run cluster (its worker nodes offer, say, ``dry_run_gpu``). The stand-in goes through the
same requests and queues; the processes it lands on have no CUDA device and run on CPU.
"""

from __future__ import annotations

import logging

import ray

from whisper_lora.config import JobConfig

log = logging.getLogger(__name__)
GPU = "GPU"


def use_gpu(config: JobConfig) -> bool:
    """Whether this run requests ``train.gpu_resource``: ``train.use_gpu`` when set, else whether the cluster has
    any of it now (an autoscaling cluster may have none yet: set ``use_gpu: true`` there)."""
    if config.train.use_gpu is not None:
        return config.train.use_gpu
    found = ray.cluster_resources().get(config.train.gpu_resource, 0) > 0
    log.info("train.use_gpu is null: the cluster has %s %s now", "some" if found else "no", config.train.gpu_resource)
    return found


def worker_resources(config: JobConfig, gpu: bool, cpus: float | None = None) -> tuple[bool, dict[str, float]]:
    """One GPU user's request: whether it runs on a CUDA device (``ScalingConfig.use_gpu``) and the Ray resources it
    asks for (``resources_per_worker``): one ``train.gpu_resource`` when ``gpu``, and ``cpus`` CPUs (default
    ``train.cpus_per_worker``)."""
    request: dict[str, float] = {"CPU": config.train.cpus_per_worker if cpus is None else cpus}
    if not gpu:
        return False, request
    name = config.train.gpu_resource
    return name == GPU, {name: 1, **request}


def task_options(config: JobConfig, gpu: bool, cpus: float) -> dict:
    """``worker_resources`` as the options of a Ray task or actor (``.options(**...)``, ``map_batches(**...)``):
    Ray takes GPUs and CPUs as their own arguments and every other resource in ``resources``."""
    _, request = worker_resources(config, gpu, cpus)
    return {"num_cpus": request.pop("CPU"), "num_gpus": request.pop(GPU, 0), "resources": request}


def gpu_count(config: JobConfig) -> int:
    """How many of ``train.gpu_resource`` the cluster holds now (0 on an autoscaling cluster before its GPU nodes
    start): a size for pools that should use what is there, never a reason to run on CPU instead."""
    return int(ray.cluster_resources().get(config.train.gpu_resource, 0))
