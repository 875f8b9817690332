"""Measure full fine-tuning and LoRA through the same Ray Train loop: same base model, data, steps and batches.

Each mode is one fresh Train run (a new run name every time: a resumed run would not measure anything). Figures
come from the loop's own last report, which covers the whole run (evaluation is only at the end), and from the
last checkpoint's files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from whisper_lora.config import JobConfig
from whisper_lora.metrics import PRIMARY
from whisper_lora.train.checkpoint import ADAPTER_DIR, FULL_WEIGHTS
from whisper_lora.train.model import Mode
from whisper_lora.train.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """One mode's run, as the comparison reports it."""

    mode: Mode
    precision: str
    device: str
    steps: int
    batch_size: int
    workers: int
    learning_rate: float
    trainable_parameters: int
    total_parameters: int
    step_seconds: float
    """Median compute time of an optimizer step (data loading excluded)."""
    samples_per_second: float
    """Over the whole run, data loading and the first step included, evaluation excluded."""
    audio_seconds_per_second: float
    train_seconds: float
    accelerator_seconds: float
    wall_seconds: float
    """The Train run from submission to result: worker start, model load, training, evaluation, checkpoints."""
    peak_memory_bytes: int
    """CUDA max allocated on GPU; on CPU the worker process's peak RSS (Python, torch and Ray included)."""
    model_bytes: int
    """What a deployment needs beside the base model: the adapter files, or every weight for full fine-tuning."""
    checkpoint_bytes: int
    """The whole resumable checkpoint: model bytes plus optimizer state and trainer state."""
    wer: float
    cer: float
    primary: float

    def to_dict(self) -> dict:
        return asdict(self)


def _file_sizes(filesystem: pafs.FileSystem, path: str) -> dict[str, int]:
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return {info.path[len(path) :].lstrip("/"): info.size for info in infos if info.type == pafs.FileType.File}


def checkpoint_sizes(filesystem: pafs.FileSystem, path: str) -> tuple[int, int]:
    """(model bytes, checkpoint bytes) of a checkpoint directory, local or remote."""
    sizes = _file_sizes(filesystem, path)
    model = sum(size for name, size in sizes.items() if name.startswith(f"{ADAPTER_DIR}/") or name == FULL_WEIGHTS)
    return model, sum(sizes.values())


def mode_config(config: JobConfig, mode: Mode) -> JobConfig:
    """The run config of one side: ``train.mode`` set, full fine-tuning at ``cost.full_learning_rate``, one
    evaluation at the end (the measured window is then the whole run)."""
    tree = config.model_dump(mode="json")
    tree["train"].update(mode=mode, eval_each_epoch=False, eval_every_steps=None)
    if mode == "full":
        tree["train"]["learning_rate"] = config.cost.full_learning_rate
        if tree["train"]["precision"] == "int8":
            tree["train"]["precision"] = "auto"  # int8 weights cannot be updated; full runs in the 16/32-bit choice
    return JobConfig.model_validate(tree)


def measure(config: JobConfig, mode: Mode, language: str) -> Measurement:
    """Train ``language`` in ``mode`` for ``train.max_steps`` steps and measure it."""
    config = mode_config(config, mode)
    run_name = f"{config.experiment}-cost-{language}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    result = build_trainer(config, language, run_name).fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise result.error
    metrics = result.metrics
    checkpoint = result.checkpoint
    model_bytes, checkpoint_bytes = checkpoint_sizes(checkpoint.filesystem, checkpoint.path)
    measurement = Measurement(
        mode=mode,
        precision=metrics["precision"],
        device=metrics["device"],
        steps=int(metrics["step"]),
        batch_size=config.train.batch_size,
        workers=config.train.num_workers,
        learning_rate=config.train.learning_rate,
        trainable_parameters=int(metrics["trainable_parameters"]),
        total_parameters=int(metrics["total_parameters"]),
        step_seconds=metrics["step_seconds"],
        samples_per_second=metrics["samples_per_second"],
        audio_seconds_per_second=metrics["audio_seconds_per_second"],
        train_seconds=metrics["accelerator_seconds"] / config.train.num_workers,
        accelerator_seconds=metrics["accelerator_seconds"],
        wall_seconds=wall,
        peak_memory_bytes=int(metrics["peak_memory_bytes"]),
        model_bytes=model_bytes,
        checkpoint_bytes=checkpoint_bytes,
        wer=metrics["wer"],
        cer=metrics["cer"],
        primary=metrics[PRIMARY],
    )
    log.info(
        "%s: %.2f s/step, peak %.2f GiB, %s %.3f",
        mode,
        measurement.step_seconds,
        measurement.peak_memory_bytes / 2**30,
        PRIMARY,
        measurement.primary,
    )
    return measurement
