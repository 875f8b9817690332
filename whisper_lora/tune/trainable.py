"""One Tune trial: a ``TorchTrainer`` for one language × rank × learning rate (the Train V2 pattern: Tune runs a
function, the function runs Train, and ``TuneReportCallback`` forwards every report and checkpoint path).

A trial may run on any node: it resolves nothing itself. The base model and the GPU decision come from the job's
driver (``tune.with_parameters``), so every trial's workers load the same shared copy and request the same
resources."""

from __future__ import annotations

import logging

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from whisper_lora.config import JobConfig
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.train.trainer import build_trainer
from whisper_lora.tune.search import trial_config

log = logging.getLogger(__name__)


def train_run_name(experiment: str, trial_id: str) -> str:
    """The Train run of a trial: stable across retries and driver restarts, so a rerun resumes its checkpoints."""
    return f"{experiment}-train-trial_id={trial_id}"


def train_trial(params: dict, config: dict, base: ResolvedModel, gpu: bool) -> None:
    """Tune function trainable (``config``: the run config as JSON-ready dict; ``base``: the model the driver
    resolved; ``gpu``: whether workers request GPUs; all shared by every trial)."""
    run = trial_config(JobConfig.model_validate(config), params)
    trial_id = tune.get_context().get_trial_id()
    run_name = train_run_name(run.experiment, trial_id)
    build_trainer(run, params["language"], run_name, base, callbacks=[TuneReportCallback()], gpu=gpu).fit()
