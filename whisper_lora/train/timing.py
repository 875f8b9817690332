"""Where a Train worker's time goes, and the training figures every report carries, each defined once here.

A worker-group attempt (the loop entered once: the first start, or a restart after a failure) keeps an
``AttemptClock``: wall-clock stamps (``time.time()``) of its start-up — loop entry, model and optimizer built (and a
checkpoint restored), reader ready — and ``perf_counter`` durations of what its loop did: evaluation, checkpoints
(saving and the ``ray.train.report`` that hands them over) and the other reports (training curve, preemption checks:
Ray Train collectives). Optimizer compute and data wait are read from ``Progress`` as differences since the attempt
began, so they are counted in one place (``Progress.count``). Every report of the attempt carries the clock as
``time_*`` metrics; ``tune.select.trial_time`` sums a trial's attempts from them.

Stamps are wall clock so that they compare across the processes of one machine (the Tune trial, the Train worker);
across nodes they are only as close as the nodes' clocks (NTP: milliseconds). Durations never cross a process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from whisper_lora.train.plan import Progress

ATTEMPT = "time_attempt"
"""Wall clock when the attempt entered the loop: also what tells one attempt's reports from another's."""
MODEL_READY = "time_model_ready"
DATA_READY = "time_data_ready"
AT = "time_at"
"""Wall clock when the report's figures were taken (the loop's end, for the attempt's last report)."""
PHASES = ("compute", "data_wait", "evaluation", "checkpoint", "reporting")
"""Durations an attempt's loop accounts for, each reported as ``time_<phase>``; the rest of its loop is overhead."""
TRIAL_TIME = "trial_time"
"""``report_kind`` of the Tune trial's own report after its Train run (``tune.trainable``): wall-clock stamps of its
body, nothing else."""
TRAINABLE_STARTED = "trainable_started"
FIT_STARTED = "trainable_fit_started"
"""After ``build_trainer``: the trial config built, the split's rows counted, the encoder cache checked."""
FIT_ENDED = "trainable_fit_ended"


def figures(progress: Progress, world: int, since: Progress | None = None) -> dict[str, float]:
    """The training figures of the steps since ``since`` (default: the start), on the same two sums, so they agree by
    construction: ``compute_seconds`` (optimizer compute: collate, forward, backward, optimizer step, summed over
    steps), ``data_wait_seconds`` (the loop waiting for batches), ``train_seconds`` = compute + data wait,
    ``step_seconds`` = compute per optimizer step (mean), ``samples_per_second`` and ``audio_seconds_per_second``
    = utterances (audio) of all workers per ``train_seconds``, ``accelerator_seconds`` = ``train_seconds`` × workers.
    Evaluation, checkpoints and reports are in none of them (``AttemptClock`` has those)."""
    since = since or Progress()
    compute = progress.compute_seconds - since.compute_seconds
    waited = progress.data_wait_seconds - since.data_wait_seconds
    train = max(compute + waited, 1e-9)
    return {
        "compute_seconds": compute,
        "data_wait_seconds": waited,
        "train_seconds": compute + waited,
        "step_seconds": compute / max(progress.step - since.step, 1),
        "samples_per_second": (progress.samples - since.samples) / train,
        "audio_seconds_per_second": (progress.audio_seconds - since.audio_seconds) / train,
        "accelerator_seconds": (compute + waited) * world,
    }


@dataclass
class AttemptClock:
    """One attempt's time on this worker (see the module docstring)."""

    started: float = field(default_factory=time.time)
    model_ready: float | None = None
    data_ready: float | None = None
    baseline: Progress = field(default_factory=Progress)
    """``Progress`` when the loop began (restored from a checkpoint on a restart): compute and data wait of this
    attempt are differences from it."""
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES[2:], 0.0))
    """Evaluation, checkpoint and reporting seconds so far."""

    def stamp_model(self, progress: Progress) -> None:
        """The model, optimizer and schedule are built and ``progress`` restored (or fresh)."""
        self.model_ready = time.time()
        self.baseline = replace(progress)

    def stamp_data(self) -> None:
        """The train split's reader is ready: the loop starts."""
        self.data_ready = time.time()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time inside the block to ``name`` (``evaluation``, ``checkpoint`` or ``reporting``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def metrics(self, progress: Progress) -> dict[str, float]:
        """The clock as report metrics (``time_*``), with the compute and data wait ``progress`` shows since the
        attempt began."""
        model_ready = self.model_ready or self.started
        return {
            ATTEMPT: self.started,
            MODEL_READY: model_ready,
            DATA_READY: self.data_ready or model_ready,
            AT: time.time(),
            "time_compute": progress.compute_seconds - self.baseline.compute_seconds,
            "time_data_wait": progress.data_wait_seconds - self.baseline.data_wait_seconds,
            **{f"time_{name}": seconds for name, seconds in self.seconds.items()},
        }
