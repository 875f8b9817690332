"""One optimizer step and what it needs, without Ray: the worker a plan (``train.plan``) builds (model, optimizer,
schedule on a device), the step itself, when to evaluate, and restoring the position a checkpoint stores.
``train.loop`` runs these under Ray Train; tests and ``benchmarks/train_step.py`` call them directly, so what is
tested and timed is the product's own step.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import WhisperTokenizer, get_linear_schedule_with_warmup

from whisper_lora.config import TrainConfig
from whisper_lora.data.collate import collate, model_inputs
from whisper_lora.models.audio_context import context_frames, run_short_encoder
from whisper_lora.train.checkpoint import load_checkpoint, load_rng_states
from whisper_lora.train.model import count_parameters, load_for_training
from whisper_lora.train.plan import Progress, Rows, WorkerPlan
from whisper_lora.train.precision import Device, PrecisionChoice, choose_precision, device_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean loss of the step's micro-batches."""
    grad_norm: float
    """Gradient norm before clipping."""
    seconds: float
    """Compute time of the step: collating, forward, backward and the optimizer (waiting for data is not in it)."""


@dataclass
class Worker:
    """What one worker trains with, built once (and rebuilt on every restart of the worker group)."""

    plan: WorkerPlan
    model: torch.nn.Module
    """In DDP when the worker group has several workers."""
    trainable: list[torch.nn.Parameter]
    tokenizer: WhisperTokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: PrecisionChoice
    rank: int
    world: int
    facts: dict
    """Run-constant metrics: parameter counts, language, mode, precision, device. Every report carries them, so an
    evaluation's scores name the precision and device they were decoded in (``manifest.Scores``)."""
    scores: dict = field(default_factory=dict)
    """The last evaluation's scores; a preemption checkpoint, taken without evaluating, carries them."""

    def autocast(self) -> AbstractContextManager:
        """Mixed-precision compute on GPU as the precision choice asks; nothing on CPU."""
        dtype = self.precision.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype and self.device.type == "cuda" else nullcontext()


def build_worker(plan: WorkerPlan, device: torch.device, rank: int = 0, world: int = 1) -> Worker:
    """The model (in train mode), optimizer and schedule of ``plan`` on ``device``, seeded by ``train.seed``: what
    every Train worker builds, and what tests and benchmarks build without Ray. New adapter weights are the same on
    every rank; the dropout stream after them is the rank's own (``seed``, ``rank``)."""
    train = plan.train
    torch.manual_seed(train.seed)
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    choice = choose_precision(train.precision, Device.of(device))
    if rank == 0:
        log.info("precision %s (%s); %d torch threads", choice.precision, choice.reason, torch.get_num_threads())
    model = load_for_training(
        plan.base_path, choice, device, train.mode, train.lora, train.gradient_checkpointing, train.freeze_encoder
    )
    model.train()  # from_pretrained leaves eval mode: no dropout, and transformers then skips checkpointing
    torch.manual_seed(int(np.random.SeedSequence([train.seed, rank]).generate_state(1)[0]))
    parameters = count_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    return Worker(
        plan=plan,
        model=model,
        trainable=trainable,
        tokenizer=WhisperTokenizer.from_pretrained(plan.base_path),
        optimizer=optimizer,
        scheduler=get_linear_schedule_with_warmup(optimizer, train.warmup_steps, train.max_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=choice.needs_loss_scaling and device.type == "cuda"),
        device=device,
        precision=choice,
        rank=rank,
        world=world,
        facts={
            "trainable_parameters": parameters.trainable,
            "total_parameters": parameters.total,
            "language": plan.language,
            "mode": train.mode,
            "precision": choice.precision,
            "device": device_label(device),
        },
    )


def train_step(worker: Worker, micro_batches: Sequence[Rows]) -> StepResult:
    """One optimizer step over ``micro_batches`` (``train.grad_accum`` of them in the loop): each one's loss is
    divided by their number, so the step follows their mean gradient (under DDP reduced across workers once, after
    the last micro-batch); then clipping, the optimizer, the schedule.
    A loss that is not finite raises ``FloatingPointError``: the run diverged, and every later step would be NaN."""
    train = worker.plan.train
    started = time.perf_counter()
    losses = []
    for index, rows in enumerate(micro_batches):
        with _reduced_if(worker.model, index == len(micro_batches) - 1):
            with worker.autocast():
                batch = collate(rows, frames=context_frames(rows["duration_s"], train.audio_context))
                loss = worker.model(**run_short_encoder(worker.model, model_inputs(batch, worker.device))).loss
            worker.scaler.scale(loss / len(micro_batches)).backward()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            step = worker.scheduler.last_epoch + 1  # the schedule counts optimizer steps
            raise FloatingPointError(
                f"{worker.plan.language}: loss is {losses[-1]} at step {step}: the run diverged "
                f"(learning rate {train.learning_rate:g}; lower train.learning_rate or raise warmup_steps)"
            )
    worker.scaler.unscale_(worker.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(worker.trainable, train.max_grad_norm)
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.optimizer.zero_grad(set_to_none=True)
    worker.scheduler.step()
    return StepResult(statistics.fmean(losses), grad_norm.item(), time.perf_counter() - started)


def _reduced_if(model: torch.nn.Module, last: bool) -> AbstractContextManager:
    """DDP all-reduces gradients in every backward; accumulating micro-batches only need it after the last one."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return nullcontext()


def should_evaluate(train: TrainConfig, step: int, epoch_end: bool) -> bool:
    """Whether optimizer step ``step`` is followed by an evaluation (and a checkpoint): every
    ``eval_every_steps``, at epoch ends with ``eval_each_epoch``, and after the last step."""
    due = train.eval_every_steps is not None and step % train.eval_every_steps == 0
    return due or (epoch_end and train.eval_each_epoch) or step >= train.max_steps


def restore(worker: Worker, directory: str) -> Progress:
    """Load a checkpoint written by ``train.loop`` into ``worker`` (its generators too); returns where it stood."""
    saved = load_checkpoint(directory, worker.model, worker.optimizer, worker.scheduler, worker.scaler)
    if not load_rng_states(directory, worker.rank):
        log.warning("rank %d: the checkpoint holds no generator state: dropout is not replayed", worker.rank)
    if "train_seconds" in saved:  # before compute was summed apart: it held compute, data wait and reports
        saved["compute_seconds"] = saved.pop("train_seconds") - saved.get("data_wait_seconds", 0.0)
    return Progress(**saved)
