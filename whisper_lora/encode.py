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
utterance is encoded over the frames the split's longest clip needs (``models.audio_context.frames_for``), one length
per split, so its rows stack into batches without an encoder mask. The eval split is always encoded at 30 s: the
trials' dev scores select the published adapter and must compare with the zero-shot and test scores, which decode
the standard input. Splits of one length are encoded in one Ray Data pass (a pass's Parquet writer cannot mix
tensor shapes).
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
from whisper_lora.data.prepared import PARQUET_WRITE_ARGS, prepared_dir, split_dir, split_files
from whisper_lora.data.sources import footers_in_read_tasks
from whisper_lora.models.audio_context import WHISPER_FRAMES, context_frames, encode_frames
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


def split_frames(config: JobConfig, language: str, split: str) -> int:
    """Log-mel frames ``split`` is encoded over: under ``train.audio_context=clip`` the train split's longest clip's
    (plus its margin, whole seconds), Whisper's 3000 for every other split and setting."""
    if split != config.data.train_split or config.train.audio_context == "full":
        return WHISPER_FRAMES
    durations = pq.read_table(split_dir(prepared_dir(config), language, split), columns=["duration_s"])
    return context_frames(durations.column("duration_s").to_pylist(), config.train.audio_context)


def _source(config: JobConfig, model: ResolvedModel, language: str, split: str) -> dict:
    """What an encoded split depends on: the model's content, the prepared split's files and the frames it is
    encoded over (named only when not Whisper's 3000: a 30-s encoding keeps the record it always had)."""
    files = split_files(split_dir(prepared_dir(config), language, split))
    source = {"model_sha256": model.sha256, "language": language, "split": split, "prepared_files": files}
    frames = split_frames(config, language, split)
    return source if frames == WHISPER_FRAMES else {**source, "frames": frames}


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
    length; returns the encoded root."""
    root = encoded_root(config, model)
    pending: dict[int, list[tuple[str, str, dict]]] = {}
    for language, split in splits:
        if not split_dir(prepared_dir(config), language, split).is_dir():
            raise FileNotFoundError(f"no prepared {language}/{split}: run `whisper-lora prepare` first")
        source = _source(config, model, language, split)
        if not _is_current(_record(root, language, split), source):
            frames = source.get("frames", WHISPER_FRAMES)
            pending.setdefault(frames, []).append((language, split, source))
    if not pending:
        return root
    started = time.perf_counter()
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plan = encode_actors(use_gpu, gpu_count(config))
    for frames, splits_at in sorted(pending.items()):
        done = [(language, split) for language, split, _ in splits_at]
        _encode_pass(config, model, done, frames, use_gpu, plan, staging)
        for language, split, source in splits_at:
            target = split_dir(root, language, split)
            _record(root, language, split).unlink(missing_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            split_dir(staging, language, split).rename(target)
            _record(root, language, split).parent.mkdir(parents=True, exist_ok=True)
            _record(root, language, split).write_text(json.dumps(source), encoding="utf-8")
        shutil.rmtree(staging, ignore_errors=True)
    names = ", ".join(
        f"{language}/{split}" + ("" if frames == WHISPER_FRAMES else f" ({frames} frames)")
        for frames, splits_at in sorted(pending.items())
        for language, split, _ in splits_at
    )
    log.info("encoded %s in %.1f s → %s", names, time.perf_counter() - started, root)
    return root


def _encode_pass(
    config: JobConfig,
    model: ResolvedModel,
    splits: list[tuple[str, str]],
    frames: int,
    use_gpu: bool,
    plan: ActorPlan,
    out: Path,
) -> None:
    """One Ray Data pass: the prepared ``splits`` (language, split) encoded over ``frames``, written under ``out``."""
    prepared = prepared_dir(config).resolve()
    with footers_in_read_tasks():
        dataset = ray.data.read_parquet(
            [str(split_dir(prepared, language, split)) for language, split in splits],
            partitioning=Partitioning("hive", base_dir=str(prepared)),
        )
    # Small blocks, so every actor gets work (a prepared split is often one file, read as one block).
    dataset.repartition(target_num_rows_per_block=ENCODE_BATCH).map_batches(
        EncodeBatch,
        fn_constructor_args=(model.path, plan.cpus_each, frames),
        batch_size=ENCODE_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        **task_options(config, use_gpu, cpus=0 if use_gpu else plan.cpus_each),
    ).write_parquet(str(out.resolve()), partition_cols=["language", "split"], **PARQUET_WRITE_ARGS)
