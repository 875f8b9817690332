"""The Tune sweep of Train runs and what it yields per trial.

A sweep is named by what changes its results (``sweep_name``): the same config resumes the same Tune experiment
(a restarted driver goes on: finished trials are not trained again, interrupted ones continue from their last
checkpoint), a changed grid or plan starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import ray
from ray import tune

from whisper_lora.config import JobConfig
from whisper_lora.ray_runtime import ray_storage
from whisper_lora.storage import Location
from whisper_lora.tune.search import max_concurrent_trials, param_space, scheduler
from whisper_lora.tune.select import TrialOutcome, trial_outcome
from whisper_lora.tune.trainable import train_trial

log = logging.getLogger(__name__)
TRIAL_DRIVER = {"CPU": 0.01}
"""A trial's own process only launches its Train run: a whole CPU for it starves the Train workers on small
machines (they never start); zero is not a valid request."""


def sweep_name(config: JobConfig) -> str:
    """Tune experiment name: the same config resumes the same sweep; a changed grid or plan starts a new one."""
    sweep = {key: config.model_dump(mode="json")[key] for key in ("model", "data", "train", "tune")}
    digest = hashlib.sha256(json.dumps(sweep, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.experiment}-tune-{digest}"


def run_sweep(config: JobConfig, gpu: bool) -> tune.ResultGrid:
    storage = ray_storage(config)
    name = sweep_name(config)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, config=config.model_dump(mode="json")), TRIAL_DRIVER
    )
    path = f"{storage['storage_path']}/{name}"
    if tune.Tuner.can_restore(path, storage["storage_filesystem"]):
        log.info("resuming sweep %s", path)
        tuner = tune.Tuner.restore(
            path, trainable, resume_errored=True, storage_filesystem=storage["storage_filesystem"]
        )
    else:
        concurrency = max_concurrent_trials(config, ray.cluster_resources(), gpu)
        log.info("sweep %s: up to %d trials at once", path, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune.TuneConfig(scheduler=scheduler(config), max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name=name,
                **storage,
                failure_config=tune.FailureConfig(max_failures=config.tune.trial_max_failures),
                verbose=1,
            ),
        )
    return tuner.fit()


def _trial_id(result) -> str:
    if "trial_id" in result.metrics:
        return result.metrics["trial_id"]
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", result.path)
    return match.group(1) if match else result.path.rsplit("/", 1)[-1]


def outcomes_of(grid: tune.ResultGrid, train_storage: Location) -> list[TrialOutcome]:
    """Every trial's outcome; its best report is one whose checkpoint Ray still keeps in ``train_storage``."""

    def exists(path: str) -> bool:
        return train_storage.within(path).is_dir()

    outcomes = []
    for result in grid:
        frame = result.metrics_dataframe
        reports = frame.to_dict("records") if frame is not None else []
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        outcomes.append(trial_outcome(_trial_id(result), result.config, reports, error, exists))
    return outcomes
