"""Driver side of training: plan the run, start Ray Train on the prepared splits, return where the best adapter is."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from whisper_lora.config import JobConfig
from whisper_lora.data.epochs import bucket_rows, global_batches, layout
from whisper_lora.data.prepared import prepared_dir, split_dir, split_files
from whisper_lora.encode import encode
from whisper_lora.metrics import PRIMARY
from whisper_lora.models.resolve import ResolvedModel, resolve_model
from whisper_lora.ray_runtime import ray_storage
from whisper_lora.resources import use_gpu, worker_resources
from whisper_lora.storage import open_location
from whisper_lora.train.checkpoint import ADAPTER_DIR, checkpoint_order
from whisper_lora.train.entry import train_loop_per_worker
from whisper_lora.train.plan import WorkerPlan

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What a finished run hands on: the best checkpoint and its metrics."""

    language: str
    rank: int
    best_checkpoint: str
    """Checkpoint directory; its ``adapter/`` is a plain peft directory (LoRA mode)."""
    metrics: dict
    """Metrics reported with the best checkpoint (primary, wer, cer, step, ...)."""
    final_metrics: dict
    reported: list[dict]
    """Metrics of every checkpoint Ray kept (all of them when ``checkpoints_to_keep`` is large enough)."""

    @property
    def adapter_dir(self) -> str:
        return str(Path(self.best_checkpoint) / ADAPTER_DIR)


def train_rows(config: JobConfig, language: str) -> int:
    """Usable training rows of ``language``, from the ``stats.json`` that ``prepare`` wrote."""
    stats_file = prepared_dir(config) / "stats.json"
    if not stats_file.is_file():
        raise FileNotFoundError(f"{stats_file} not found: run `whisper-lora prepare` with this config first")
    groups = json.loads(stats_file.read_text())["groups"]
    key = f"{language}/{config.data.train_split}"
    if key not in groups:
        raise ValueError(f"no prepared rows for {key}: prepared groups are {sorted(groups)}")
    return groups[key]["rows_out"]


def worker_plan(
    config: JobConfig, base_path: str, language: str, rows: int | Sequence[int], train_dir: str, eval_dir: str
) -> WorkerPlan:
    """The plan every worker follows; fails early when the data cannot fill one optimizer step per worker.
    ``rows``: the train split's rows, or its rows per length bucket (``EpochReader.bucket_rows``)."""
    train = config.train
    micro_batches = global_batches([rows] if isinstance(rows, int) else rows, train.num_workers * train.batch_size)
    rows = rows if isinstance(rows, int) else sum(rows)
    if micro_batches < train.grad_accum:
        raise ValueError(
            f"{language}: {rows} training rows cannot give each of {train.num_workers} workers "
            f"{train.grad_accum} batch(es) of {train.batch_size}; lower train.batch_size or train.num_workers"
        )
    return WorkerPlan(
        train=train,
        eval=config.eval,
        base_path=base_path,
        language=language,
        micro_batches_per_epoch=micro_batches - micro_batches % train.grad_accum,
        train_dir=train_dir,
        eval_dir=eval_dir,
        storage=config.storage,
    )


def training_data(
    config: JobConfig, base: ResolvedModel, languages: list[str], gpu: bool, test_split: bool = False
) -> Path:
    """Root of the splits training reads: the prepared log-mel, or with ``train.freeze_encoder`` the cached encoder
    output (computed here for whatever is missing). ``test_split``: the test split is encoded too, where it is
    prepared, so its zero-shot and adapter scores decode one encoder output instead of running the encoder twice
    (with a frozen encoder the adapters are the decoder's only)."""
    if not config.train.freeze_encoder:
        return prepared_dir(config).resolve()
    data = config.data
    splits = [(language, split) for language in languages for split in (data.train_split, data.eval_split)]
    if test_split:
        prepared = prepared_dir(config)
        splits += [(language, data.test_split) for language in languages
                   if split_files(split_dir(prepared, language, data.test_split))]  # fmt: skip
    return encode(config, base, list(dict.fromkeys(splits)), gpu).resolve()  # a test split may be the eval split


def build_trainer(
    config: JobConfig,
    language: str,
    run_name: str,
    base: ResolvedModel | None = None,
    callbacks: list | None = None,
    gpu: bool | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for one language and adapter shape. Its workers read the prepared (or encoded) train split
    themselves, in the seeded order of ``data.epochs`` (not through Ray Data: ``streaming_split`` hands out blocks in
    no fixed order, so a restarted worker could not skip exactly what it had trained on).
    ``base``: the model the job's driver resolved (a path every node reads); None resolves it here, which only the
    driver may do (a Tune trial runs on any node). ``callbacks``: Train callbacks, e.g. Tune's
    ``TuneReportCallback`` when a trial runs it. ``gpu``: the driver's choice (``resources.use_gpu``); None decides
    here. With GPUs the workers request them and wait for them: a cluster without any leaves the run pending."""
    base = base or resolve_model(config.model)
    gpu = use_gpu(config) if gpu is None else gpu
    data = training_data(config, base, [language], gpu)
    train_dir = str(split_dir(data, language, config.data.train_split))
    eval_dir = str(split_dir(data, language, config.data.eval_split))
    # the encoder cache's train split may be bucketed by length (encode.split_buckets): its rows are counted there
    encoded = config.train.freeze_encoder
    rows = bucket_rows(layout(open_location(train_dir, config.storage))) if encoded else train_rows(config, language)
    plan = worker_plan(config, base.path, language, rows, train_dir, eval_dir)
    cuda, resources = worker_resources(config, gpu)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=config.train.num_workers, use_gpu=cuda, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            **ray_storage(config),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep,
                checkpoint_score_attribute=PRIMARY,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # not Ray Train's INFO lines per run on the console
        ),
    )


def best_of_run(result, language: str, rank: int) -> TrainOutcome:
    """Best checkpoint by the primary metric (ties: the later step) and its metrics."""
    if result.error is not None:
        raise result.error
    checkpoint, metrics = min(result.best_checkpoints, key=lambda pair: checkpoint_order(pair[1]))
    reported = [m for _, m in result.best_checkpoints]
    return TrainOutcome(language, rank, checkpoint.path, metrics, result.metrics, reported)


def train_one_language(config: JobConfig) -> TrainOutcome:
    """Train one language (``train.language`` or the first of ``data.languages``) with the configured LoRA."""
    language = config.train_language
    run_name = f"{config.experiment}-train-{language}-r{config.train.lora.rank}"
    result = build_trainer(config, language, run_name).fit()
    outcome = best_of_run(result, language, config.train.lora.rank)
    log.info("best %s adapter: %s (%s)", language, outcome.adapter_dir, outcome.metrics.get(PRIMARY))
    return outcome
