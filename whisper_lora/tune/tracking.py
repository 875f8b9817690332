"""Experiment tracking of the sweep: Ray Tune's logger callbacks for MLflow and TensorBoard, and the link from a
published adapter back to the MLflow run of the trial that trained it.

Tune's loggers run on the driver and see every report a trial forwards: the training curve (every
``train.log_every_steps`` steps) and the evaluations. They plot against ``timesteps_total`` when a report has it,
else against Tune's report counter; ``OptimizerStepAxis`` sets it to the optimizer step, so curves from a resumed
trial, and training and evaluation rows of one trial, share one x axis.

Tune adds CSV, JSON and TensorBoard loggers to whatever it is given unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``
is set: the sweep lists all of its loggers itself (``tracking_callbacks``) and runs under
``only_listed_loggers``, so ``tracking.tensorboard=false`` holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL

from whisper_lora.config import JobConfig
from whisper_lora.manifest import Manifest
from whisper_lora.tune.search import trial_config

log = logging.getLogger(__name__)
AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
PUBLISHED_TAG = "published_adapter"
"""The MLflow tag that holds the URI of the adapter published from a run's trial."""


class TrackingError(RuntimeError):
    """Tracking is configured but cannot work (mlflow missing)."""


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise TrackingError(
            "tracking.mlflow is on but mlflow is not installed: pip install 'whisper-lora[tracking]' "
            "(or set tracking.mlflow=false)"
        ) from None
    return mlflow


def mlflow_tracking_uri(config: JobConfig) -> str:
    """``tracking.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the run directory
    (the loggers run on the driver, so a local store is the driver's)."""
    configured = config.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return configured or f"sqlite:///{(Path(config.run_dir) / 'mlflow.db').resolve()}"


def mlflow_experiment(config: JobConfig) -> str:
    return config.tracking.mlflow_experiment or config.experiment


def run_params(config: JobConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """An MLflow run's params: the trial's choices as its run config holds them (alpha resolved), and the plan
    every trial of the sweep shares."""
    trial = trial_config(config, params).train
    return {
        "language": trial.language,
        "rank": trial.lora.rank,
        "learning_rate": trial.learning_rate,
        "alpha": trial.lora.resolved_alpha,
        "target_modules": ",".join(trial.lora.target_modules)
        if isinstance(trial.lora.target_modules, list)
        else trial.lora.target_modules,
        "lora_dropout": trial.lora.dropout,
        "base_model": config.model.base,
        "mode": trial.mode,
        "precision": trial.precision,
        "freeze_encoder": trial.freeze_encoder,
        "max_steps": trial.max_steps,
        "batch_size": trial.batch_size,
        "grad_accum": trial.grad_accum,
        "num_workers": trial.num_workers,
        "warmup_steps": trial.warmup_steps,
        "seed": trial.seed,
    }


class OptimizerStepAxis(Callback):
    """Sets ``timesteps_total`` (the step Tune's loggers plot against) to the report's optimizer step. Runs before
    the loggers: Tune hands each callback the same result, in the order given."""

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if "step" in result:
            result[TIMESTEPS_TOTAL] = int(result["step"])


class SweepMLflowLogger(MLflowLoggerCallback):
    """Ray's MLflow logger with this sweep's params (``run_params``) instead of the bare Tune config, and the
    tags that find a trial's run again: ``sweep``, ``trial_id``, ``language``."""

    def __init__(self, config: JobConfig, sweep: str, **kwargs: Any) -> None:
        super().__init__(
            tracking_uri=mlflow_tracking_uri(config),
            experiment_name=mlflow_experiment(config),
            tags={"experiment": config.experiment, "sweep": sweep},
            **kwargs,
        )
        self.config = config

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return  # a retried trial goes on logging to its run
        tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id, "language": trial.config["language"]}
        run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
        self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=run_params(self.config, trial.config))


def tracking_callbacks(config: JobConfig, sweep: str) -> list[Callback]:
    """Every callback the sweep logs with: the step axis, Tune's CSV and JSON results (what ``ResultGrid`` reads),
    TensorBoard and MLflow as ``tracking`` says."""
    callbacks: list[Callback] = [OptimizerStepAxis(), CSVLoggerCallback(), JsonLoggerCallback()]
    if config.tracking.tensorboard:
        callbacks.append(TBXLoggerCallback())
    if config.tracking.mlflow:
        _mlflow()
        prepare_mlflow_experiment(config)
        callbacks.append(SweepMLflowLogger(config, sweep))
        log.info("MLflow: experiment %r at %s", mlflow_experiment(config), mlflow_tracking_uri(config))
    return callbacks


def prepare_mlflow_experiment(config: JobConfig) -> None:
    """With the local default store, create the experiment with its artifacts beside the database (MLflow's
    default artifact root is ``./mlruns`` under whatever directory the driver runs in)."""
    if config.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return  # a server or a store someone configured decides where artifacts go
    client = _mlflow().tracking.MlflowClient(mlflow_tracking_uri(config))
    if client.get_experiment_by_name(mlflow_experiment(config)) is None:
        artifacts = (Path(config.run_dir) / "mlflow-artifacts").resolve()
        client.create_experiment(mlflow_experiment(config), artifact_location=artifacts.as_uri())


@contextmanager
def only_listed_loggers() -> Iterator[None]:
    """Within: Tune adds no logger of its own to the callbacks it is given (see the module docstring)."""
    previous = os.environ.get(AUTO_LOGGERS)
    os.environ[AUTO_LOGGERS] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(AUTO_LOGGERS, None)
        else:
            os.environ[AUTO_LOGGERS] = previous


def link_published(config: JobConfig, sweep: str, manifest: Manifest) -> int:
    """Tag the MLflow run of each published adapter's trial in ``sweep`` with the adapter's URI; returns the runs
    tagged. A language that kept an adapter from an earlier sweep has no run here and is left as it is. The
    manifest is already published: a tracking server that cannot be reached is a warning, not a failed job."""
    if not config.tracking.mlflow:
        return 0
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient(mlflow_tracking_uri(config))
    tagged = 0
    try:
        experiment = client.get_experiment_by_name(mlflow_experiment(config))
        for language, entry in sorted(manifest.languages.items()):
            found = f"tags.sweep = '{sweep}' and tags.trial_id = '{entry.trial_id}'"
            runs = client.search_runs([experiment.experiment_id], filter_string=found) if experiment else []
            for run in runs:
                client.set_tag(run.info.run_id, PUBLISHED_TAG, entry.adapter)
                tagged += 1
            if not runs:
                log.info(
                    "%s: trial %s has no MLflow run in sweep %s (published earlier)", language, entry.trial_id, sweep
                )
    except mlflow.exceptions.MlflowException as exc:
        log.warning("could not record the published adapters on MLflow (%s): %s", mlflow_tracking_uri(config), exc)
    return tagged
