"""Connecting to Ray: a cluster when an address is given (or inside ``ray job submit``), else a local instance.

A local instance starts with its dashboard when ``ray[default]`` is installed (it is a dependency): Ray's state
API lives there, and Ray Train's placement-group cleaner polls it for the controller's state; without it every
Train run logs "Failed to query Ray Train Controller actor state" every few seconds and a traceback when it
stops. Every worker runs ``setup_worker`` as it starts: library notices are silenced there too, and the state
API is asked on this cluster (the cleaner otherwise picks the newest Ray on the machine, which on a shared host
may be someone else's, and dies with a traceback).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import ray

from whisper_lora.config import JobConfig, RayConfig
from whisper_lora.console import quiet
from whisper_lora.storage import open_location

log = logging.getLogger(__name__)
WORKER_SETUP_HOOK = "whisper_lora.ray_runtime.setup_worker"
"""``runtime_env["worker_process_setup_hook"]``: what every Ray worker of our jobs runs as it starts."""


def local_cpus(config: RayConfig) -> int:
    """Logical CPUs for a local instance: on small machines Ray Data's hidden file-listing step needs a whole
    CPU beside the map tasks (``read_parquet`` hangs on 2 CPUs), so never fewer than 4."""
    return config.num_cpus or max(4, os.cpu_count() or 1)


def setup_worker() -> None:
    """Ray worker start-up: ``console.quiet``, and ``RAY_ADDRESS`` pinned to the cluster this worker belongs to,
    so that Ray's own state-API clients in the worker (Train's placement-group cleaner) never look elsewhere."""
    quiet()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def dashboard_available() -> bool:
    """Whether this environment can run Ray's dashboard (and with it the state API): ``ray[default]``."""
    return all(importlib.util.find_spec(name) is not None for name in ("aiohttp", "aiohttp_cors", "opencensus"))


def init_ray(config: RayConfig) -> None:
    """Start or join Ray once per process. ``RAY_ADDRESS`` (set by ``ray job submit``) wins over a local start."""
    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
        return
    cpus = local_cpus(config)
    dashboard = dashboard_available()
    # address="local": a new instance even when /tmp/ray/ray_current_cluster names a (possibly dead) `ray start`
    context = ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=int(config.object_store_gib * 2**30),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
    )
    where = f"dashboard http://{context.dashboard_url}" if dashboard and context.dashboard_url else "no dashboard"
    log.info("local Ray: %d logical CPUs, %.1f GiB object store, %s", cpus, config.object_store_gib, where)


def ray_storage(config: JobConfig) -> dict[str, Any]:
    """``storage_path`` and ``storage_filesystem`` for Ray Train's and Tune's ``RunConfig``: ``train.storage_path``
    opened with the ``storage`` options, so an S3 endpoint set there applies to checkpoints as to everything else."""
    location = open_location(config.train.storage_path, config.storage)
    return {"storage_path": location.path, "storage_filesystem": None if location.is_local else location.fs}
