"""Frozen-encoder cache: Whisper's encoder output for every prepared utterance, computed once and shared.

With ``train.freeze_encoder`` the adapters sit in the decoder only, so an utterance's encoder output never
changes during training. Running the encoder is most of a step (whisper-base on CPU: 0.8 s of a 1.4 s
decoder-only step per utterance), and a tuning sweep would run it again for every trial and epoch. Here it runs
once per language and split (Ray Data, one model per actor, a GPU each where there are GPUs) and every trial reads
the result: ``<run_dir>/encoded/<model sha12>/language=<code>/split=<name>/*.parquet`` with
``encoder_hidden_states`` (1500 × d_model, float16) in place of ``input_features``. A record per split (``sources/``)
names the prepared files and model it came from; anything stale or partial is encoded again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data.datasource import Partitioning
from ray.data.extensions import ArrowTensorArray
from transformers import WhisperForConditionalGeneration

from whisper_lora.config import JobConfig
from whisper_lora.data.collate import stack_features
from whisper_lora.data.prepared import PARQUET_WRITE_ARGS, prepared_dir, split_dir, split_files
from whisper_lora.data.sources import footers_in_read_tasks
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.resources import gpu_count, task_options

log = logging.getLogger(__name__)
ENCODE_BATCH = 8
CPU_THREADS_PER_ACTOR = 1


def encoded_root(config: JobConfig, model: ResolvedModel) -> Path:
    return config.run_dir / "encoded" / model.sha256[:12]


class EncodeBatch:
    """Ray Data actor: holds one encoder (fp16 on a GPU, fp32 on CPU) and encodes prepared batches."""

    def __init__(self, model_path: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = WhisperForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
        self.encoder = model.get_encoder().to(self.device).eval()
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        features = stack_features(batch["input_features"]).to(self.device, self.dtype)
        hidden = self.encoder(features).last_hidden_state.to(torch.float16).cpu().numpy()
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


def _source(config: JobConfig, model: ResolvedModel, language: str, split: str) -> dict:
    """What an encoded split depends on: the model's content and the prepared split's files."""
    files = split_files(split_dir(prepared_dir(config), language, split))
    return {"model_sha256": model.sha256, "language": language, "split": split, "prepared_files": files}


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


def encode(config: JobConfig, model: ResolvedModel, languages: list[str], splits: list[str], use_gpu: bool) -> Path:
    """Encode every (language, split) not already current; returns the encoded root."""
    root = encoded_root(config, model)
    pending = []
    for language in languages:
        for split in splits:
            if not split_dir(prepared_dir(config), language, split).is_dir():
                raise FileNotFoundError(f"no prepared {language}/{split}: run `whisper-lora prepare` first")
            source = _source(config, model, language, split)
            if not _is_current(_record(root, language, split), source):
                pending.append((language, split, source))
    if not pending:
        return root
    started = time.perf_counter()
    prepared = prepared_dir(config).resolve()
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with footers_in_read_tasks():
        dataset = ray.data.read_parquet(
            [str(split_dir(prepared, language, split)) for language, split, _ in pending],
            partitioning=Partitioning("hive", base_dir=str(prepared)),
        )
    plan = encode_actors(use_gpu, gpu_count(config))
    # Small blocks, so every actor gets work (a prepared split is often one file, read as one block).
    dataset.repartition(target_num_rows_per_block=ENCODE_BATCH).map_batches(
        EncodeBatch,
        fn_constructor_args=(model.path, plan.cpus_each),
        batch_size=ENCODE_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        **task_options(config, use_gpu, cpus=0 if use_gpu else plan.cpus_each),
    ).write_parquet(str(staging.resolve()), partition_cols=["language", "split"], **PARQUET_WRITE_ARGS)
    for language, split, source in pending:
        target = split_dir(root, language, split)
        _record(root, language, split).unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        split_dir(staging, language, split).rename(target)
        _record(root, language, split).parent.mkdir(parents=True, exist_ok=True)
        _record(root, language, split).write_text(json.dumps(source), encoding="utf-8")
    shutil.rmtree(staging, ignore_errors=True)
    names = ", ".join(f"{language}/{split}" for language, split, _ in pending)
    log.info("encoded %s in %.1f s → %s", names, time.perf_counter() - started, root)
    return root
