"""One Tune trial: a ``TorchTrainer`` for one language × rank × learning rate (the Train V2 pattern: Tune runs a
function, the function runs Train, and ``TuneReportCallback`` forwards every report and checkpoint path)."""

from __future__ import annotations

import logging

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from whisper_lora.config import JobConfig
from whisper_lora.train.trainer import build_trainer
from whisper_lora.tune.search import trial_config

log = logging.getLogger(__name__)


def train_run_name(experiment: str, trial_id: str) -> str:
    """The Train run of a trial: stable across retries and driver restarts, so a rerun resumes its checkpoints."""
    return f"{experiment}-train-trial_id={trial_id}"


def train_trial(params: dict, config: dict) -> None:
    """Tune function trainable (``config``: the run config as JSON-ready dict, shared by every trial)."""
    run = trial_config(JobConfig.model_validate(config), params)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        run, params["language"], train_run_name(run.experiment, trial_id), callbacks=[TuneReportCallback()]
    )
    trainer.fit()
