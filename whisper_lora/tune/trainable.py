"""One Tune trial: a ``TorchTrainer`` for one language × rank × learning rate (the Train V2 pattern: Tune runs a
function, the function runs Train, and ``TuneReportCallback`` forwards every report and checkpoint path).

A trial may run on any node: it resolves nothing itself. The base model and the GPU decision come from the job's
driver (``tune.with_parameters``), so every trial's workers load the same shared copy and request the same
resources.

When the Train run returns, the trial reports once more (``timing.TRIAL_TIME``): the wall-clock stamps of its own
body (start, ``fit()`` start and end), from which ``tune.select.trial_time`` splits the trial's time; Tune adds
``time_since_restore`` (seconds since this trial's actor began this run), which places the actor's start. A function
trainable may report after its Train run returned, as Ray's own wrapper does when the function ends. A trial that
Tune stops (ASHA) or that fails never sends it: its time is what its workers reported."""

from __future__ import annotations

import logging
import time

from ray import tune
from ray.train._internal.session import get_session
from ray.tune.integration.ray_train import TuneReportCallback

from whisper_lora.config import JobConfig
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.train.timing import AT, FIT_ENDED, FIT_STARTED, TRAINABLE_STARTED, TRIAL_TIME
from whisper_lora.train.trainer import build_trainer
from whisper_lora.tune.search import trial_config

log = logging.getLogger(__name__)


def train_run_name(experiment: str, trial_id: str) -> str:
    """The Train run of a trial: stable across retries and driver restarts, so a rerun resumes its checkpoints."""
    return f"{experiment}-train-trial_id={trial_id}"


def train_trial(params: dict, config: dict, base: ResolvedModel, gpu: bool) -> None:
    """Tune function trainable (``config``: the run config as JSON-ready dict; ``base``: the model the driver
    resolved; ``gpu``: whether workers request GPUs; all shared by every trial)."""
    started = time.time()
    run = trial_config(JobConfig.model_validate(config), params)
    trial_id = tune.get_context().get_trial_id()
    run_name = train_run_name(run.experiment, trial_id)
    trainer = build_trainer(run, params["language"], run_name, base, callbacks=[TuneReportCallback()], gpu=gpu)
    fit_started = time.time()
    trainer.fit()
    ended = time.time()
    forwarded_reports_taken(get_session())
    stamps = {TRAINABLE_STARTED: started, FIT_STARTED: fit_started, FIT_ENDED: ended, AT: time.time()}
    tune.report({"report_kind": TRIAL_TIME, **stamps})


def forwarded_reports_taken(session, settle_s: float = 0.2, timeout_s: float = 120.0, poll_s: float = 0.05) -> bool:
    """Wait until Tune's main thread has taken every report ``TuneReportCallback`` forwarded (its inter-actor queue
    and the session's result queue both empty for ``settle_s``); False after ``timeout_s`` (logged). Call after
    ``fit()`` returned: no report can arrive later, the Train controller has put its last one."""
    forwarded = getattr(session, "_inter_actor_queue", None)
    deadline = time.monotonic() + timeout_s
    empty_since = None
    while time.monotonic() < deadline:
        if (forwarded is None or forwarded.empty()) and session.result_queue.empty():
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= settle_s:
                return True
        else:
            empty_since = None
        time.sleep(poll_s)
    log.warning("Tune had not taken the Train run's last reports after %.0f s; reporting anyway", timeout_s)
    return False
