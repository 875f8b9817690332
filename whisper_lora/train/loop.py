"""The Ray Train worker: one plain loop, run by ``TorchTrainer`` on every worker.

Resuming is exact: every epoch's row order is a function of the seed and the epoch (``data.epochs``), a checkpoint
records the optimizer step, how many micro-batches of the current epoch were consumed and every worker's random
generators, and a restarted worker group skips those micro-batches and draws the same dropout masks. The run always
ends after ``max_steps`` optimizer steps, however often it restarts.

The step and everything it needs live in ``train.step`` and work without Ray; this module adds what Ray brings:
the worker group's device and DDP, reports (training metrics every ``train.log_every_steps`` steps, evaluations
with a checkpoint), checkpoints handed to Ray and preemption notices. Every report carries the attempt's clock
(``train.timing``) as it stood when the report's figures were taken. No report follows the last checkpoint: one
sent after it was, once in three runs, never delivered to Tune and its trial never finished (Ray 2.60), so the last
checkpoint's own save is counted in the trial's teardown (``tune.select.trial_time``).
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from typing import TypeVar

import ray.train
import ray.train.torch
import torch

from whisper_lora.data.epochs import EpochReader, node_cache_bytes, worker_batches
from whisper_lora.evaluate import score_split
from whisper_lora.metrics import PRIMARY
from whisper_lora.storage import open_location
from whisper_lora.train.checkpoint import save_checkpoint, save_rng_states, unwrap
from whisper_lora.train.plan import Progress, Rows, WorkerPlan
from whisper_lora.train.step import StepResult, Worker, build_worker, restore, should_evaluate, train_step
from whisper_lora.train.timing import AttemptClock, figures

log = logging.getLogger(__name__)
T = TypeVar("T")


def _ray_worker(plan: WorkerPlan) -> Worker:
    """This Train worker's ``Worker``: on the device Ray assigned it, its model in DDP across the group."""
    context = ray.train.get_context()
    worker = build_worker(plan, ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size())
    if worker.world > 1:
        worker.model = ray.train.torch.prepare_model(worker.model, move_to_device=False)
    return worker


def _timed(items: Iterable[T]) -> Iterator[tuple[T, float]]:
    """Each item with the seconds it took to get."""
    iterator = iter(items)
    while True:
        asked = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - asked


def train_reader(plan: WorkerPlan, device: torch.device) -> EpochReader:
    """This worker's reader of the train split, its cache within this worker's share of the node's memory."""
    cache = node_cache_bytes(plan.train.data_cache_mib * 2**20, _workers_on_node(plan, device))
    return EpochReader(open_location(plan.train_dir, plan.storage), cache)


def _workers_on_node(plan: WorkerPlan, device: torch.device) -> int:
    """Training workers this node may hold at once, this trial's and others' side by side: one per GPU, or its CPUs
    over ``train.cpus_per_worker``; at least this run's own workers here."""
    node = ray.get_runtime_context().get_node_id()
    resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node), {})
    room = resources.get("GPU", 0) if device.type == "cuda" else resources.get("CPU", 0) / plan.train.cpus_per_worker
    return max(int(room), ray.train.get_context().get_local_world_size(), 1)


def epoch_groups(
    reader: EpochReader, plan: WorkerPlan, rank: int, world: int, epoch: int, skip: int = 0
) -> Iterator[tuple[list[Rows], float]]:
    """Epoch ``epoch`` of this worker's rows as optimizer steps: groups of ``train.grad_accum`` micro-batches, each
    with the seconds the loop waited for them. The first ``skip`` micro-batches (trained on before a restart) are
    left out unread."""
    train = plan.train
    order = reader.order(train.seed, epoch, train.shuffle_window, together=world * train.batch_size)
    indices = worker_batches(order, rank, world, train.batch_size, plan.micro_batches_per_epoch)
    group: list[Rows] = []
    waited = 0.0
    for rows, seconds in _timed(reader.batches(indices, skip)):
        group.append(rows)
        waited += seconds
        if len(group) == train.grad_accum:
            yield group, waited
            group, waited = [], 0.0


def resume(worker: Worker) -> Progress:
    """Training position: from the checkpoint a restarted worker group is handed, else the start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as directory:
        progress = restore(worker, directory)
    log.info("rank %d resumed at step %d (epoch %d, batch %d)", worker.rank, progress.step, progress.epoch,
             progress.batches_done)  # fmt: skip
    return progress


def train_loop_per_worker(config: dict) -> None:
    """Train ``train.max_steps`` optimizer steps, evaluating and checkpointing at epoch ends (and every N steps);
    when Ray reports that a node of this worker group is being preempted, checkpoint at once (no evaluation)."""
    clock = AttemptClock()
    plan = WorkerPlan.model_validate(config)
    logging.getLogger("whisper_lora").setLevel(logging.INFO)  # Ray's worker handlers take INFO; the root is WARNING
    worker = _ray_worker(plan)
    progress = resume(worker)
    clock.stamp_model(progress)
    reader = train_reader(plan, worker.device)
    clock.stamp_data()
    since_report: list[StepResult] = []
    since_log = _Window(progress)
    saved_for_preemption = False
    while progress.step < plan.train.max_steps:
        for micro_batches, waited in epoch_groups(
            reader, plan, worker.rank, worker.world, progress.epoch, progress.batches_done
        ):
            result = train_step(worker, micro_batches)
            since_report.append(result)
            progress.count(micro_batches, waited, worker.world, result.seconds)
            since_log.steps.append(result)
            epoch_end = progress.batches_done >= plan.micro_batches_per_epoch
            if epoch_end:
                progress.next_epoch()
            if progress.step % plan.train.log_every_steps == 0:
                with clock.phase("reporting"):
                    _report_training(worker, progress, since_log, clock)
                since_log = _Window(progress)
            evaluating = should_evaluate(plan.train, progress.step, epoch_end)
            with clock.phase("reporting"):  # a collective: every rank asks after the same steps (not evaluated)
                preempted = not evaluating and ray.train.get_preemption_info() is not None
            if evaluating or (preempted and not saved_for_preemption):
                _report(worker, progress, since_report, evaluating, clock)
                saved_for_preemption = saved_for_preemption or preempted
                since_report = []
            if epoch_end or progress.step >= plan.train.max_steps:
                break


class _Window:
    """The steps since the last training report, and where ``Progress`` stood when it began: the window's figures
    are differences (``Progress.count`` is the one place steps are counted)."""

    def __init__(self, progress: Progress) -> None:
        self.steps: list[StepResult] = []
        self.start = replace(progress)


def _report_training(worker: Worker, progress: Progress, window: _Window, clock: AttemptClock) -> None:
    """The training curve: a report without checkpoint and without the primary metric (selection, keep-the-best
    and early stopping only see evaluations), from every rank (a report is a collective). Its figures cover the
    steps since the previous training report (``timing.figures``)."""
    metrics = {
        "report_kind": "train",
        "node_id": ray.get_runtime_context().get_node_id(),  # Tune keeps rank 0's: where the trial ran (tune.select)
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": statistics.fmean(step.loss for step in window.steps),
        "learning_rate": worker.scheduler.get_last_lr()[0],
        "grad_norm": statistics.fmean(step.grad_norm for step in window.steps),
        **figures(progress, worker.world, since=window.start),
        **clock.metrics(progress),
    }
    if worker.rank == 0:  # the console shows the trial's report (console.TrialProgress); the worker log keeps this
        log.debug("step %d/%d loss %.4f grad norm %.3f lr %.2e", progress.step, worker.plan.train.max_steps,
                 metrics["loss"], metrics["grad_norm"], metrics["learning_rate"])  # fmt: skip
    ray.train.report(metrics)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _evaluate(worker: Worker) -> dict:
    """Score on the whole eval split, read straight from the prepared Parquet (small; no Ray Data round): every
    rank decodes its shard and the edit counts are summed across the group, so every rank gets the same scores."""
    plan, inner = worker.plan, unwrap(worker.model)
    inner.config.use_cache = True
    with torch.random.fork_rng(devices=[worker.device] if worker.device.type == "cuda" else []):
        scores = score_split(
            inner,
            worker.tokenizer,
            plan.eval_dir,
            plan.language,
            plan.eval.batch_size,
            plan.eval.max_utterances,
            3,
            plan.eval.normalizer,
            worker.rank,
            worker.world,
        )  # in a forked generator: an evaluation leaves the dropout stream as it found it
    inner.config.use_cache = False
    worker.model.train()
    return scores


def _report(worker: Worker, progress: Progress, steps: list[StepResult], evaluating: bool, clock: AttemptClock) -> None:
    """Report the same metrics from every worker; all evaluate, each its shard of the eval split
    (unless this is a preemption checkpoint), and rank 0 checkpoints the adapter. The training figures cover every
    step so far (``timing.figures``: step time, samples/s and accelerator-seconds from the same compute and data-wait
    sums); ``loss`` is the mean of the steps since the last such report (``steps``)."""
    metrics = {
        "report_kind": "evaluation" if evaluating else "preemption",
        "node_id": ray.get_runtime_context().get_node_id(),
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": statistics.fmean(step.loss for step in steps),
        "learning_rate": worker.scheduler.get_last_lr()[0],
        **figures(progress, worker.world),
        "peak_memory_bytes": _peak_memory_bytes(worker.device),
        "checkpoint_reason": "evaluation" if evaluating else "preemption",
        **worker.facts,
    }
    if evaluating:  # a collective: every rank decodes its shard of the eval split
        with clock.phase("evaluation"):
            scores = _evaluate(worker)
        worker.scores = {key: scores[key] for key in ("wer", "cer", "raw_wer", PRIMARY, "utterances", "normalizer")}
        worker.scores["eval_seconds"] = scores["seconds"]
    elif worker.rank == 0:
        log.warning("node preemption announced: checkpointing at step %d before it goes", progress.step)
    # a preemption checkpoint carries the last evaluation's scores (so Ray's keep-the-best policy keeps it beside
    # that evaluated one), or +inf before any evaluation; selection never picks it (``tune.select``)
    metrics.update(worker.scores or {"wer": math.inf, "cer": math.inf, "raw_wer": math.inf, PRIMARY: math.inf})
    with clock.phase("checkpoint"):
        _checkpoint(worker, progress, metrics | clock.metrics(progress))


def _checkpoint(worker: Worker, progress: Progress, metrics: dict) -> None:
    """Every rank hands Ray its generator states; rank 0 also the adapter (or weights), optimizer and position."""
    with tempfile.TemporaryDirectory() as directory:
        save_rng_states(directory, worker.rank)
        if worker.rank == 0:
            save_checkpoint(
                directory, worker.model, worker.optimizer, worker.scheduler, worker.scaler, asdict(progress)
            )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
