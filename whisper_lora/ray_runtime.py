"""Connecting to Ray: a cluster when an address is given (or inside ``ray job submit``), else a local instance."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from whisper_lora.config import JobConfig, RayConfig
from whisper_lora.storage import open_location

log = logging.getLogger(__name__)


def local_cpus(config: RayConfig) -> int:
    """Logical CPUs for a local instance: on small machines Ray Data's hidden file-listing step needs a whole
    CPU beside the map tasks (``read_parquet`` hangs on 2 CPUs), so never fewer than 4."""
    return config.num_cpus or max(4, os.cpu_count() or 1)


def init_ray(config: RayConfig) -> None:
    """Start or join Ray once per process. ``RAY_ADDRESS`` (set by ``ray job submit``) wins over a local start."""
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address)
        return
    cpus = local_cpus(config)
    log.info("starting a local Ray instance: %d logical CPUs, %.1f GiB object store", cpus, config.object_store_gib)
    # address="local": a new instance even when /tmp/ray/ray_current_cluster names a (possibly dead) `ray start`
    ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=int(config.object_store_gib * 2**30),
        include_dashboard=False,
    )


def ray_storage(config: JobConfig) -> dict[str, Any]:
    """``storage_path`` and ``storage_filesystem`` for Ray Train's and Tune's ``RunConfig``: ``train.storage_path``
    opened with the ``storage`` options, so an S3 endpoint set there applies to checkpoints as to everything else."""
    location = open_location(config.train.storage_path, config.storage)
    return {"storage_path": location.path, "storage_filesystem": None if location.is_local else location.fs}
