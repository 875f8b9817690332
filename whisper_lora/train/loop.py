"""The Ray Train worker: one plain loop, run by ``TorchTrainer`` on every worker.

Resuming is exact: a checkpoint records the optimizer step and how many micro-batches of the current epoch
were consumed, and a restarted worker group skips those before it trains again. The run always ends after
``max_steps`` optimizer steps, however often it restarts.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import ray.train
import ray.train.torch
import torch
from transformers import WhisperTokenizer, get_linear_schedule_with_warmup

from whisper_lora.data.collate import collate, model_inputs
from whisper_lora.data.prepared import iter_batches
from whisper_lora.evaluate import evaluate
from whisper_lora.train.checkpoint import load_checkpoint, save_checkpoint, unwrap
from whisper_lora.train.model import LoraSettings, Mode, count_parameters, load_for_training, target_modules
from whisper_lora.train.precision import Device, PrecisionChoice, choose_precision

log = logging.getLogger(__name__)
LOG_EVERY_STEPS = 10


@dataclass
class WorkerPlan:
    """Everything a worker needs, decided on the driver (plain values: it crosses process boundaries)."""

    base_path: str
    language: str
    micro_batches_per_epoch: int
    """Micro-batches each worker takes from its shard per epoch: equal on every worker, so DDP never waits."""
    eval_dir: str
    """Prepared eval split (a path every worker can read: local, NFS or s3://)."""
    mode: Mode = "lora"
    precision: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    freeze_encoder: bool = False
    """Adapt the decoder only; the train and eval splits then hold cached encoder output."""
    eval_every_steps: int | None = None
    eval_each_epoch: bool = True
    torch_threads: int | None = None
    eval_batch_size: int = 8
    eval_max_utterances: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> WorkerPlan:
        lora = values["lora"]
        return cls(
            **{**values, "lora": LoraSettings(**{**lora, "target_modules": target_modules(lora["target_modules"])})}
        )


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _evaluate_on_rank0(model: torch.nn.Module, tokenizer: WhisperTokenizer, plan: WorkerPlan) -> dict:
    """Score on the whole eval split, read straight from the prepared Parquet (small; no Ray Data round)."""
    inner = unwrap(model)
    inner.config.use_cache = True
    batches = iter_batches(plan.eval_dir, plan.eval_batch_size, plan.eval_max_utterances)
    scores = evaluate(inner, tokenizer, batches, plan.language, keep_samples=3)
    inner.config.use_cache = False
    return scores


@dataclass
class _Worker:
    """What one worker trains with, built once (and rebuilt on every restart of the worker group)."""

    plan: WorkerPlan
    model: torch.nn.Module
    tokenizer: WhisperTokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: PrecisionChoice
    rank: int
    world: int
    facts: dict
    """Run-constant metrics: parameter counts, language, mode, precision, device."""
    scores: dict = field(default_factory=dict)
    """The last evaluation's scores; a preemption checkpoint, taken without evaluating, carries them."""

    def checkpoint(self, progress: dict, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.scaler, progress)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _build_worker(plan: WorkerPlan) -> _Worker:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(plan.seed)
    if plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    device = ray.train.torch.get_device()
    choice = choose_precision(plan.precision, Device.current())
    if rank == 0:
        log.info("precision %s (%s); %d torch threads", choice.precision, choice.reason, torch.get_num_threads())
    model = load_for_training(
        plan.base_path, choice, device, plan.mode, plan.lora, plan.gradient_checkpointing, plan.freeze_encoder
    )
    parameters = count_parameters(model)
    facts = {
        "trainable_parameters": parameters.trainable,
        "total_parameters": parameters.total,
        "language": plan.language,
        "mode": plan.mode,
        "precision": choice.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
    }
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    return _Worker(
        plan=plan,
        model=model,
        tokenizer=WhisperTokenizer.from_pretrained(plan.base_path),
        optimizer=optimizer,
        scheduler=get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.max_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=choice.needs_loss_scaling and device.type == "cuda"),
        device=device,
        precision=choice,
        rank=rank,
        world=world,
        facts=facts,
    )


def _autocast(worker: _Worker):
    dtype = worker.precision.autocast_dtype
    return torch.autocast(worker.device.type, dtype=dtype) if dtype and worker.device.type == "cuda" else nullcontext()


def _resume(worker: _Worker) -> dict:
    """Training position: from the checkpoint a restarted worker group is handed, else the start."""
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "samples": 0, "audio_seconds": 0.0, "train_seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = load_checkpoint(directory, worker.model, worker.optimizer, worker.scheduler, worker.scaler)
        progress.update(saved)
        log.info(
            "rank %d resumed at step %d (epoch %d, batch %d)",
            worker.rank,
            progress["step"],
            progress["epoch"],
            progress["batches_done"],
        )
    progress.setdefault("data_wait_seconds", 0.0)
    return progress


def train_loop_per_worker(config: dict) -> None:
    """Train ``plan.max_steps`` optimizer steps, evaluating and checkpointing at epoch ends (and every N steps);
    when Ray reports that a node of this worker group is being preempted, checkpoint at once (no evaluation)."""
    plan = WorkerPlan.from_dict(config)
    logging.getLogger("whisper_lora").setLevel(logging.INFO)  # Ray's worker handlers take INFO; the root is WARNING
    worker = _build_worker(plan)
    model, optimizer, scaler = worker.model, worker.optimizer, worker.scaler
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast(worker)
    progress = _resume(worker)
    shard = ray.train.get_dataset_shard("train")
    model.train()
    window = {"losses": [], "step_seconds": []}  # since the last report; step_seconds: compute only
    saved_for_preemption = False
    while progress["step"] < plan.max_steps:
        started = waiting = time.perf_counter()
        batches = shard.iter_batches(batch_size=plan.batch_size, drop_last=True)
        index = -1
        step_compute = 0.0
        for index, rows in enumerate(batches):
            if index >= plan.micro_batches_per_epoch:
                break
            if index < progress["batches_done"]:
                waiting = time.perf_counter()
                continue
            computing = time.perf_counter()
            progress["data_wait_seconds"] += computing - waiting
            batch = model_inputs(collate(rows), worker.device)
            with autocast:
                loss = model(**batch).loss / plan.grad_accum
            scaler.scale(loss).backward()
            loss_value = loss.item() * plan.grad_accum
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"{plan.language}: loss is {loss_value} at step {progress['step'] + 1}: the run diverged "
                    f"(learning rate {plan.learning_rate:g}; lower train.learning_rate or raise warmup_steps)"
                )
            window["losses"].append(loss_value)
            progress["batches_done"] = index + 1
            progress["samples"] += len(rows["id"]) * worker.world
            progress["audio_seconds"] += float(sum(rows["duration_s"])) * worker.world
            if progress["batches_done"] % plan.grad_accum:
                step_compute += time.perf_counter() - computing
                waiting = time.perf_counter()
                continue
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, plan.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            worker.scheduler.step()
            progress["step"] += 1
            window["step_seconds"].append(step_compute + time.perf_counter() - computing)
            step_compute = 0.0
            if worker.rank == 0 and progress["step"] % LOG_EVERY_STEPS == 0:
                log.info("step %d/%d loss %.4f lr %.2e", progress["step"], plan.max_steps, loss_value,
                         worker.scheduler.get_last_lr()[0])  # fmt: skip
            epoch_end = progress["batches_done"] + plan.grad_accum > plan.micro_batches_per_epoch
            due = plan.eval_every_steps is not None and progress["step"] % plan.eval_every_steps == 0
            last = progress["step"] >= plan.max_steps
            if epoch_end:
                progress["epoch"] += 1
                progress["batches_done"] = 0
            scoring = due or (epoch_end and plan.eval_each_epoch) or last
            # a collective: every rank asks after the same steps (those not followed by an evaluation)
            preempted = not scoring and ray.train.get_preemption_info() is not None
            if scoring or (preempted and not saved_for_preemption):
                progress["train_seconds"] += time.perf_counter() - started
                _report(worker, progress, window, scoring)
                saved_for_preemption = saved_for_preemption or preempted
                started = time.perf_counter()
                window = {"losses": [], "step_seconds": []}
            if last or epoch_end:
                break
            waiting = time.perf_counter()
        else:
            if index < 0:
                raise RuntimeError(f"rank {worker.rank}: the train shard yielded no batch of {plan.batch_size}")
            progress["epoch"] += 1  # the shard ran out before the planned micro-batches: start the next epoch
            progress["batches_done"] = 0


def _report(worker: _Worker, progress: dict, window: dict, scoring: bool) -> None:
    """Report the same metrics from every worker; rank 0 evaluates (unless this is a preemption checkpoint) and
    checkpoints. ``samples_per_second`` counts everything since the start (data included, evaluation not);
    ``step_seconds`` is the median compute time of an optimizer step since the last report, and
    ``data_wait_seconds`` how long batches kept the loop waiting."""
    losses, step_seconds = window["losses"], window["step_seconds"]
    metrics = {
        "step": progress["step"],
        "epoch": progress["epoch"],
        "loss": sum(losses) / len(losses) if losses else math.nan,
        "learning_rate": worker.scheduler.get_last_lr()[0],
        "samples_per_second": progress["samples"] / max(progress["train_seconds"], 1e-9),
        "audio_seconds_per_second": progress["audio_seconds"] / max(progress["train_seconds"], 1e-9),
        "step_seconds": statistics.median(step_seconds) if step_seconds else math.nan,
        "data_wait_seconds": progress["data_wait_seconds"],
        "accelerator_seconds": progress["train_seconds"] * worker.world,
        "peak_memory_bytes": _peak_memory_bytes(worker.device),
        "checkpoint_reason": "evaluation" if scoring else "preemption",
        **worker.facts,
    }
    if worker.rank != 0:
        ray.train.report(metrics)
        return
    if scoring:
        scores = _evaluate_on_rank0(worker.model, worker.tokenizer, worker.plan)
        worker.scores = {key: scores[key] for key in ("wer", "cer", "raw_wer", "primary", "utterances")}
        worker.scores["eval_seconds"] = scores["seconds"]
        worker.model.train()
    else:
        log.warning("node preemption announced: checkpointing at step %d before it goes", progress["step"])
    # a preemption checkpoint carries the last evaluation's scores (so Ray's keep-the-best policy keeps it beside
    # that evaluated one), or +inf before any evaluation; selection never picks it (``tune.select``)
    metrics.update(worker.scores or {"wer": math.inf, "cer": math.inf, "raw_wer": math.inf, "primary": math.inf})
    worker.checkpoint(progress, metrics)
