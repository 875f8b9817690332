"""What the sweep tries and how many trials run at once.

The grid is languages × ranks × learning rates (× alphas when given). Early stopping compares trials of the same
language only: a Tamil CER and a Hindi WER are different scales, so one ASHA bracket per language.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from whisper_lora.config import JobConfig
from whisper_lora.metrics import PRIMARY

log = logging.getLogger(__name__)
METRIC = PRIMARY
"""WER or CER, whichever the language registry names primary: lower is better."""


def param_space(config: JobConfig) -> dict[str, Any]:
    space = {
        "language": tune.grid_search(config.data.languages),
        "rank": tune.grid_search(config.tune.ranks),
        "learning_rate": tune.grid_search(config.tune.learning_rates),
    }
    if config.tune.alphas:
        space["alpha"] = tune.grid_search(config.tune.alphas)
    return space


def trial_config(config: JobConfig, params: Mapping[str, Any]) -> JobConfig:
    """The run config of one trial: the sweep's choices written into ``train``."""
    tree = config.model_dump(mode="json")
    tree["train"].update(language=params["language"], learning_rate=params["learning_rate"])
    tree["train"]["lora"].update(rank=params["rank"], alpha=params.get("alpha"))
    return JobConfig.model_validate(tree)


def grid_size(config: JobConfig) -> int:
    """Trials in the sweep: languages × ranks × learning rates (× alphas)."""
    grid = config.tune
    return math.prod(map(len, (config.data.languages, grid.ranks, grid.learning_rates, grid.alphas or [None])))


def max_concurrent_trials(config: JobConfig, resources: Mapping[str, float], gpu: bool) -> int:
    """Trials run side by side: ``tune.max_concurrent_trials`` when set. With GPUs requested, no cap: what the
    cluster holds at start says nothing of what an autoscaler will add (a cluster may start with no GPU node), and
    a trial whose workers find no GPU waits (its placement group queues). On CPU, real cores / workers (torch
    threads compete for cores; Ray's logical CPUs here are inflated to keep Ray Data from deadlocking)."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    workers = config.train.num_workers
    if gpu:
        trials = grid_size(config)
        have = int(resources.get(config.train.gpu_resource, 0))
        log.info(
            "%d trials may start at once (tune.max_concurrent_trials unset): each waits for %d %s, the cluster has "
            "%d now; the rest queue until an autoscaler adds nodes or trials finish",
            trials, workers, config.train.gpu_resource, have,
        )  # fmt: skip
        return trials
    cores = int(resources.get("CPU", 1)) if config.ray.address else min(os.cpu_count() or 1, int(resources["CPU"]))
    threads = config.train.torch_threads or 1
    return max(1, cores // (workers * threads))


class PerLanguageASHA(FIFOScheduler):
    """ASHA with one independent scheduler per language (trials are routed by their ``language`` config).

    Only evaluations (reports with the primary metric) reach it; training-curve rows pass. It names no metric to
    Tune (nor does the ``TuneConfig``): Tune's strict check would otherwise refuse every training row."""

    def __init__(self, grace_period: int, reduction_factor: int, max_t: int) -> None:
        super().__init__()
        self._settings = {"grace_period": grace_period, "reduction_factor": reduction_factor, "max_t": max_t}
        self._schedulers: dict[str, AsyncHyperBandScheduler] = {}

    def _of(self, trial) -> AsyncHyperBandScheduler:
        language = trial.config["language"]
        if language not in self._schedulers:
            self._schedulers[language] = AsyncHyperBandScheduler(
                time_attr="step", metric=METRIC, mode="min", **self._settings
            )
        return self._schedulers[language]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Only evaluations before the last step are judged: a training-curve row, a checkpoint saved in a hurry for
        a preemption and the trial's own time report are no grounds to stop a trial, and one at ``max_t`` ends by
        itself (a STOP there would cut the trial's own time report)."""
        if result.get("report_kind") != "evaluation" or METRIC not in result:
            return self.CONTINUE
        if result.get("step", 0) >= self._settings["max_t"]:
            return self.CONTINUE
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{language}: {s.debug_string()}" for language, s in sorted(self._schedulers.items()))


def scheduler(config: JobConfig) -> TrialScheduler:
    asha = config.tune.asha
    if not asha.enabled:
        return FIFOScheduler()
    return PerLanguageASHA(asha.grace_period_steps, asha.reduction_factor, config.train.max_steps)
