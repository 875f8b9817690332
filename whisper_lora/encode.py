"""Frozen-encoder cache: Whisper's encoder output for every prepared utterance, computed once and shared.

With ``train.freeze_encoder`` the adapters sit in the decoder only, so an utterance's encoder output never
changes during training. Running the encoder is most of a step (whisper-base on CPU: 0.8 s of a 1.4 s
decoder-only step per utterance), and a tuning sweep would run it again for every trial and epoch. Here it runs
once per language and split (Ray Data, one model per actor, a GPU each where there are GPUs) and every trial reads
the result: ``<run_dir>/encoded/<model sha12>/language=<code>/split=<name>/*.parquet`` with
``encoder_hidden_states`` (positions × d_model, float16) in place of ``input_features``. A record per split
(``sources/``) names the prepared files and model it came from, and the frames it was encoded over when not
Whisper's 3000; anything stale or partial is encoded again.

Positions are 1500 (Whisper's 30-s window) except for the train split under ``train.audio_context=clip``: there every
utterance is encoded over the frames of its length bucket (``models.audio_context.length_buckets``: whole seconds,
neighbouring lengths merged until a bucket holds enough rows), one file per bucket (``frames<N>-…parquet``), and
training deals each global micro-batch from one bucket (``data.epochs.bucketed``), so its rows stack without an
encoder mask. The demo's clips average 3 s and reach 10-16 s: one length per split (the longest clip's) spent 2-3x
the encoder frames. The eval split is always encoded at 30 s: the trials' dev scores select the published adapter
and must compare with the zero-shot and test scores, which decode the standard input. Rows of one length are
encoded in one Ray Data pass (a pass's Parquet writer cannot mix tensor shapes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data.datasource import Partitioning
from ray.data.extensions import ArrowTensorArray

from whisper_lora.config import JobConfig
from whisper_lora.data.collate import stack_features
from whisper_lora.data.prepared import PARQUET_WRITE_ARGS, bucket_file_name, prepared_dir, split_dir, split_files
from whisper_lora.data.sources import footers_in_read_tasks
from whisper_lora.models import audio_context
from whisper_lora.models.audio_context import WHISPER_FRAMES, encode_frames, frames_for, length_buckets
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.resources import gpu_count, task_options

log = logging.getLogger(__name__)
ENCODE_BATCH = 8
CPU_THREADS_PER_ACTOR = 1


def encoded_root(config: JobConfig, model: ResolvedModel) -> Path:
    return config.run_dir / "encoded" / model.sha256[:12]


class EncodeBatch:
    """Ray Data actor: holds one encoder (fp16 on a GPU, fp32 on CPU) and encodes prepared batches over ``frames``
    log-mel frames (``frames / 2`` positions; Whisper's 30-s window by default)."""

    def __init__(self, model_path: str, threads: int, frames: int = WHISPER_FRAMES) -> None:
        from transformers import WhisperForConditionalGeneration  # in the actor: the trials import this module too

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = WhisperForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
        self.encoder = model.get_encoder().to(self.device).eval()
        self.dtype = dtype
        self.frames = frames

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        features = stack_features(batch["input_features"], self.frames).to(self.device, self.dtype)
        hidden = encode_frames(self.encoder, features).to(torch.float16).cpu().numpy()
        columns = {
            "id": pa.array([str(value) for value in batch["id"]], pa.string()),
            "language": pa.array([str(value) for value in batch["language"]], pa.string()),
            "split": pa.array([str(value) for value in batch["split"]], pa.string()),
            "sentence": pa.array([str(value) for value in batch["sentence"]], pa.string()),
            "duration_s": pa.array(batch["duration_s"], pa.float32()),
            "label_ids": pa.array([np.asarray(ids).tolist() for ids in batch["label_ids"]], pa.list_(pa.int32())),
            "encoder_hidden_states": ArrowTensorArray.from_numpy(hidden),
        }
        return pa.table(columns)


def split_buckets(config: JobConfig, language: str, split: str) -> list[int]:
    """Log-mel frames of the length buckets ``split`` is encoded over: under ``train.audio_context=clip`` the train
    split's ``length_buckets``, Whisper's 3000 (one bucket) for every other split and setting."""
    if split != config.data.train_split or config.train.audio_context == "full":
        return [WHISPER_FRAMES]
    durations = pq.read_table(split_dir(prepared_dir(config), language, split), columns=["duration_s"])
    return length_buckets(durations.column("duration_s").to_pylist(), audio_context.BUCKET_MIN_ROWS)


def _source(config: JobConfig, model: ResolvedModel, language: str, split: str) -> dict:
    """What an encoded split depends on: the model's content, the prepared split's files and the frames of its
    length buckets (named only when not Whisper's 3000: a 30-s encoding keeps the record it always had)."""
    files = split_files(split_dir(prepared_dir(config), language, split))
    source = {"model_sha256": model.sha256, "language": language, "split": split, "prepared_files": files}
    buckets = split_buckets(config, language, split)
    return source if buckets == [WHISPER_FRAMES] else {**source, "frames": buckets}


def _record(root: Path, language: str, split: str) -> Path:
    """Where an encoded split's provenance is kept (outside the split: its directory holds only Parquet)."""
    return root / "sources" / f"{language}.{split}.json"


def _is_current(record: Path, source: dict) -> bool:
    return record.is_file() and json.loads(record.read_text(encoding="utf-8")) == json.loads(json.dumps(source))


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus_each: int


def encode_actors(use_gpu: bool, gpus: int = 0) -> ActorPlan:
    """One actor per GPU the cluster holds now (``gpus``; at least one, which waits for a GPU node). On CPU, one
    single-threaded actor per real core (on 2 cores, 184 whisper-base utterances took 191 s with two 1-thread
    actors and 212 s with one 2-thread actor)."""
    resources = ray.cluster_resources()
    if use_gpu:
        return ActorPlan(max(1, gpus), 1)
    cores = max(1, min(os.cpu_count() or 1, int(resources.get("CPU", 1)) - 1))
    threads = min(cores, CPU_THREADS_PER_ACTOR)
    return ActorPlan(max(1, cores // threads), threads)


def encode(config: JobConfig, model: ResolvedModel, splits: Iterable[tuple[str, str]], use_gpu: bool) -> Path:
    """Encode every prepared (language, split) of ``splits`` not already current, one Ray Data pass per encoder
    length (a split's rows of one length bucket, or all of them); returns the encoded root."""
    root = encoded_root(config, model)
    stale: dict[tuple[str, str], dict] = {}
    passes: dict[int, list[Rows]] = {}
    for language, split in splits:
        if not split_dir(prepared_dir(config), language, split).is_dir():
            raise FileNotFoundError(f"no prepared {language}/{split}: run `whisper-lora prepare` first")
        source = _source(config, model, language, split)
        if not _is_current(_record(root, language, split), source):
            stale[language, split] = source
            buckets = source.get("frames", [WHISPER_FRAMES])
            for shorter, frames in zip([0, *buckets[:-1]], buckets, strict=True):
                longest = frames if frames < buckets[-1] else WHISPER_FRAMES  # the last bucket takes any longer clip
                passes.setdefault(frames, []).append(Rows(language, split, shorter, longest))
    if not stale:
        return root
    started = time.perf_counter()
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plan = encode_actors(use_gpu, gpu_count(config))
    for frames, rows in sorted(passes.items()):
        _encode_pass(config, model, rows, frames, use_gpu, plan, staging / str(frames))
    for (language, split), source in stale.items():
        target = split_dir(root, language, split)
        _record(root, language, split).unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        bucketed = "frames" in source
        for frames in source.get("frames", [WHISPER_FRAMES]):
            for file in sorted(split_dir(staging / str(frames), language, split).glob("*.parquet")):
                file.rename(target / (bucket_file_name(frames, file.name) if bucketed else file.name))
        _record(root, language, split).parent.mkdir(parents=True, exist_ok=True)
        _record(root, language, split).write_text(json.dumps(source), encoding="utf-8")
    shutil.rmtree(staging, ignore_errors=True)
    names = ", ".join(
        f"{language}/{split}" + (f" (frames {source['frames']})" if "frames" in source else "")
        for (language, split), source in stale.items()
    )
    log.info("encoded %s in %.1f s → %s", names, time.perf_counter() - started, root)
    return root


@dataclass(frozen=True)
class Rows:
    """The rows of a prepared split whose clips need more than ``shorter`` and at most ``longest`` frames."""

    language: str
    split: str
    shorter: int
    longest: int


def _in_pass(rows: list[Rows]):
    """Ray Data batch filter: the rows of a pass (by language, split and the frames each clip needs)."""
    ranges = {(r.language, r.split): (r.shorter, r.longest) for r in rows}

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        needed = np.array([frames_for([duration]) for duration in batch["duration_s"]])
        bounds = np.array([ranges[str(language), str(split)] for language, split in
                           zip(batch["language"], batch["split"], strict=True)]).reshape(-1, 2)  # fmt: skip
        mask = (needed > bounds[:, 0]) & (needed <= bounds[:, 1])
        return {name: column[mask] for name, column in batch.items()}

    return keep


def _encode_pass(
    config: JobConfig,
    model: ResolvedModel,
    rows: list[Rows],
    frames: int,
    use_gpu: bool,
    plan: ActorPlan,
    out: Path,
) -> None:
    """One Ray Data pass: the prepared ``rows`` encoded over ``frames``, written under ``out``."""
    prepared = prepared_dir(config).resolve()
    splits = list(dict.fromkeys((r.language, r.split) for r in rows))
    with footers_in_read_tasks():
        dataset = ray.data.read_parquet(
            [str(split_dir(prepared, language, split)) for language, split in splits],
            partitioning=Partitioning("hive", base_dir=str(prepared)),
        )
    if any(r.shorter > 0 or r.longest < WHISPER_FRAMES for r in rows):
        dataset = dataset.map_batches(_in_pass(rows), batch_format="numpy", batch_size=None)
    # Small blocks, so every actor gets work (a prepared split is often one file, read as one block).
    dataset.repartition(target_num_rows_per_block=ENCODE_BATCH).map_batches(
        EncodeBatch,
        fn_constructor_args=(model.path, plan.cpus_each, frames),
        batch_size=ENCODE_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        **task_options(config, use_gpu, cpus=0 if use_gpu else plan.cpus_each),
    ).write_parquet(str(out.resolve()), partition_cols=["language", "split"], **PARQUET_WRITE_ARGS)
