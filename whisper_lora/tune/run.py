"""The main job: prepare → (encode) → zero-shot → Tune sweep of Train runs → select → publish.

Every stage reuses what an earlier run of the same experiment left: prepared shards, the encoder cache, zero-shot
scores, and the Tune experiment itself (a restarted driver resumes it: finished trials are not trained again,
interrupted ones continue from their last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pyarrow.fs as pafs
import ray
from ray import tune

from whisper_lora.config import JobConfig
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.prepare import ensure_prepared
from whisper_lora.publish import open_storage, publish_selection
from whisper_lora.ray_runtime import init_ray
from whisper_lora.train.trainer import training_data, use_gpu
from whisper_lora.tune.search import max_concurrent_trials, param_space, scheduler
from whisper_lora.tune.select import TrialOutcome, select_best, trial_outcome
from whisper_lora.tune.trainable import train_trial
from whisper_lora.tune.zero_shot import zero_shot_scores

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
    storage = config.train.storage_uri
    name = sweep_name(config)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, config=config.model_dump(mode="json")), TRIAL_DRIVER
    )
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path):
        log.info("resuming sweep %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        concurrency = max_concurrent_trials(config, ray.cluster_resources(), gpu)
        log.info("sweep %s: up to %d trials at once", path, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune.TuneConfig(scheduler=scheduler(config), max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
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


def outcomes_of(grid: tune.ResultGrid, train_storage: str) -> list[TrialOutcome]:
    """Every trial's outcome; its best report is one whose checkpoint Ray still keeps in ``train_storage``."""
    storage = open_storage(train_storage)

    def exists(path: str) -> bool:
        return storage.fs.get_file_info(path).type == pafs.FileType.Directory

    outcomes = []
    for result in grid:
        frame = result.metrics_dataframe
        reports = frame.to_dict("records") if frame is not None else []
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        outcomes.append(trial_outcome(_trial_id(result), result.config, reports, error, exists))
    return outcomes


def tune_languages(config: JobConfig) -> dict:
    """Run the whole job; returns the published manifest."""
    config = config.with_absolute_paths()
    init_ray(config.ray)
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    ensure_prepared(config)
    gpu = use_gpu(config)
    data_root = training_data(config, base, config.data.languages, gpu)
    zero_shot = zero_shot_scores(config, base, data_root, gpu)
    outcomes = outcomes_of(run_sweep(config, gpu), config.train.storage_uri)
    for outcome in outcomes:
        if outcome.failed:
            log.warning(
                "trial %s (%s r=%d) failed: %s", outcome.trial_id, outcome.language, outcome.rank, outcome.error
            )
    selected = select_best(outcomes)
    for language, outcome in selected.items():
        before, after = zero_shot[language]["primary"], outcome.best["primary"]
        log.info(
            "%s: trial %s r=%d lr=%g → %.3f (zero-shot %.3f)",
            language,
            outcome.trial_id,
            outcome.rank,
            outcome.learning_rate,
            after,
            before,
        )
    return publish_selection(config, base, selected, zero_shot, outcomes)
