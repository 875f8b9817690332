"""What a worker is told and where it stands: ``WorkerPlan`` (decided on the driver) and ``Progress`` (counted by
the worker, stored in checkpoints). The light half of training: the driver, the Tune trial and the Train controller
import this module without torch, transformers or peft (``train.step`` holds the heavy half)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from whisper_lora.config import EvalConfig, TrainConfig
from whisper_lora.storage import StorageOptions

Rows = dict[str, np.ndarray]
"""One micro-batch as Ray Data (and ``iter_batches``) yields it: column name → values."""


class WorkerPlan(BaseModel):
    """Everything a worker needs, decided on the driver: the run's train and eval sections plus what the driver
    derived from them and the data. Crosses to the workers as ``model_dump(mode="json")``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainConfig
    """The run's train section, as configured: the one source of every training setting."""
    eval: EvalConfig
    base_path: str
    language: str
    micro_batches_per_epoch: int
    """Micro-batches each worker takes from its shard per epoch: equal on every worker, so DDP never waits; a
    multiple of ``train.grad_accum``."""
    train_dir: str
    """Prepared (or encoded) train split: a path every worker can read (local, NFS or s3://)."""
    eval_dir: str
    """Prepared eval split, likewise."""
    storage: StorageOptions = StorageOptions()
    """How ``train_dir`` and ``eval_dir`` are reached when remote."""


@dataclass
class Progress:
    """Where training stands. ``asdict`` of it is the ``progress`` a checkpoint's ``trainer_state.json`` holds."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Micro-batches of the current epoch already trained on: a restarted worker skips them."""
    samples: int = 0
    """Utterances trained on, all workers together."""
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0
    """This worker's optimizer compute, summed over steps (``StepResult.seconds``)."""
    data_wait_seconds: float = 0.0
    """The time this worker's loop waited for batches. ``train.timing.figures`` derives every rate from these two."""

    def count(self, micro_batches: Sequence[Rows], waited: float, world: int, computed: float) -> None:
        """One optimizer step over ``micro_batches``, which took ``waited`` seconds to arrive and ``computed``
        seconds to compute; each of the ``world`` workers trained as many rows."""
        self.step += 1
        self.compute_seconds += computed
        self.batches_done += len(micro_batches)
        self.samples += sum(len(rows["id"]) for rows in micro_batches) * world
        self.audio_seconds += sum(float(sum(rows["duration_s"])) for rows in micro_batches) * world
        self.data_wait_seconds += waited

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
