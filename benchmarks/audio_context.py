"""Padding as a measured choice: decoder LoRA trained on the frozen encoder's 30-s output against its output over only
the frames the clips need (``train.audio_context=clip``), at equal steps, scored under standard 30-s inference.

    .venv/bin/python benchmarks/audio_context.py --config ray_jobs/configs/demo.yaml --language hi --steps 80 \
        --threads 2 --json audio_context.json

Needs prepared data (``make demo`` or ``whisper-lora prepare``). No Ray: the product's ``EncodeBatch`` encodes each
split in this process, once at Whisper's 3000 frames and once at the split's clip frames (``frames_for``: the
longest clip + 0.5 s, whole seconds), into Parquet laid out as ``encode`` writes it; ``build_worker`` and
``train_step`` train over the epochs ``data.epochs`` orders (as ``benchmarks/train_step.py`` does), the same seed,
plan and rows for both runs:

- (a) ``full``: trained on 30-s encoder output (the standard);
- (b) ``clip``: trained on clip-frame encoder output of the train split.

Every model (the zero-shot base, a, b) is scored on dev and test by the product's scorer (``evaluate.score_split``:
greedy, language forced, the config's normaliser) from the cached encoder output at 30 s (what the trials' dev
evaluation reads: fp16 hidden states of the standard input) and at clip frames. Timings: seconds per utterance to
encode (30 s vs clip), median seconds per optimizer step, and decoding seconds per utterance (from cached encoder
output, so decoding alone; add the encode figure for end-to-end inference). The decoder LoRA is the config's
(``train.lora.*``, ``train.freeze_encoder`` must be true); ``--rank`` sets the rank (16, the demo sweep's larger).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from whisper_lora.config import JobConfig, load_config
from whisper_lora.data.epochs import EpochReader
from whisper_lora.data.prepared import PARQUET_WRITE_ARGS, iter_batches, prepared_dir, split_dir
from whisper_lora.encode import ENCODE_BATCH, EncodeBatch
from whisper_lora.evaluate import score_split
from whisper_lora.models.audio_context import WHISPER_FRAMES, frames_for
from whisper_lora.models.resolve import resolve_model
from whisper_lora.storage import open_location
from whisper_lora.train.loop import epoch_groups
from whisper_lora.train.step import build_worker, train_step
from whisper_lora.train.trainer import worker_plan

CONTEXTS = ("full", "clip")


def split_durations(prepared: Path, language: str, split: str) -> list[float]:
    return pq.read_table(split_dir(prepared, language, split), columns=["duration_s"]).column("duration_s").to_pylist()


def encode_split(encoder: EncodeBatch, source: Path, out: Path, language: str, split: str, frames: int) -> dict:
    """``source`` (a prepared split) encoded over ``frames`` into ``out`` (one Parquet file, as ``encode`` lays a
    split out); the seconds the encoder took (reading and writing excluded)."""
    encoder.frames = frames
    tables, seconds = [], 0.0
    for rows in iter_batches(source, ENCODE_BATCH):
        count = len(rows["id"])
        started = time.perf_counter()
        tables.append(encoder({**rows, "language": np.full(count, language), "split": np.full(count, split)}))
        seconds += time.perf_counter() - started
    out.mkdir(parents=True)
    table = pa.concat_tables(tables).drop_columns(["language", "split"])
    pq.write_table(table, out / "part-0.parquet", use_dictionary=PARQUET_WRITE_ARGS["use_dictionary"])
    utterances = table.num_rows
    return {"split": split, "frames": frames, "utterances": utterances, "seconds_per_utterance": seconds / utterances}


def scores_of(model: torch.nn.Module, tokenizer, directory: Path, language: str, config: JobConfig) -> dict:
    """The product's scorer as training evaluation calls it (cache on, generators untouched)."""
    model.config.use_cache = True
    with torch.random.fork_rng(devices=[]):
        scores = score_split(model, tokenizer, str(directory), language, config.eval.batch_size,
                             config.eval.max_utterances, 2, config.eval.normalizer)  # fmt: skip
    model.config.use_cache = False
    return {
        "wer": scores["wer"],
        "cer": scores["cer"],
        "primary": scores["primary"],
        "utterances": scores["utterances"],
        "decode_seconds_per_utterance": scores["seconds"] / max(1, scores["utterances"]),
        "samples": scores["samples"],
    }


def score_all(model, tokenizer, encoded: dict, language: str, config: JobConfig, splits: list[str], name: str) -> list:
    """``model`` on every eval split under both inference contexts."""
    model.eval()
    rows = []
    for split in splits:
        for context in CONTEXTS:
            scores = scores_of(model, tokenizer, encoded[context] / split, language, config)
            rows.append({"model": name, "split": split, "inference": context, **scores})
            print(f"  {name:9} {split:5} {context:4}: wer {scores['wer']:.3f} cer {scores['cer']:.3f}", flush=True)
    return rows


def train(config: JobConfig, base_path: str, language: str, train_dir: Path, dev_dir: Path, steps: int):
    """``steps`` optimizer steps of the product's ``train_step`` over the epochs of ``train_dir``; the worker and the
    compute seconds of every step."""
    reader = EpochReader(open_location(str(train_dir)), config.train.data_cache_mib * 2**20)
    plan = worker_plan(config, base_path, language, reader.bucket_rows, str(train_dir), str(dev_dir))
    worker = build_worker(plan, torch.device("cpu"))
    results, epoch = [], 0
    while len(results) < steps:
        for micro_batches, _ in epoch_groups(reader, plan, 0, 1, epoch):
            results.append(train_step(worker, micro_batches))
            if len(results) == steps:
                break
        epoch += 1
    return worker, results


def run(config: JobConfig, language: str, steps: int, threads: int, splits: list[str], work: Path) -> dict:
    torch.set_num_threads(threads)
    base = resolve_model(config.model)
    prepared = prepared_dir(config)
    train_split = config.data.train_split
    frames = {split: frames_for(split_durations(prepared, language, split)) for split in [train_split, *splits]}
    print(f"clip frames: {frames}", flush=True)
    encoder = EncodeBatch(base.path, threads)
    encoded = {context: work / context for context in CONTEXTS}
    encoding = []
    for split in [train_split, *splits]:
        for context in CONTEXTS:
            at = WHISPER_FRAMES if context == "full" else frames[split]
            figure = encode_split(encoder, split_dir(prepared, language, split), encoded[context] / split, language,
                                  split, at)  # fmt: skip
            encoding.append({"context": context, **figure})
            print(f"  encode {split:5} {context:4} ({at} frames): {figure['seconds_per_utterance']:.3f} s/utt",
                  flush=True)  # fmt: skip
    del encoder
    dev = encoded["full"] / config.data.eval_split
    scores: list[dict] = []
    training = []
    zero_shot = None
    for context in CONTEXTS:
        worker, results = train(config, base.path, language, encoded[context] / train_split, dev, steps)
        tokenizer = worker.tokenizer
        if zero_shot is None:  # the base model: the adapter's weights start at zero (lora_B)
            with worker.model.disable_adapter():
                zero_shot = score_all(worker.model, tokenizer, encoded, language, config, splits, "zero-shot")
            scores += zero_shot
        seconds = [result.seconds for result in results]
        training.append(
            {
                "trained_on": context,
                "frames": WHISPER_FRAMES if context == "full" else frames[train_split],
                "steps": len(results),
                "step_seconds_median": statistics.median(seconds),
                "train_seconds": sum(seconds),
                "final_loss": statistics.fmean(result.loss for result in results[-5:]),
            }
        )
        print(f"  trained on {context}: {training[-1]}", flush=True)
        scores += score_all(worker.model, tokenizer, encoded, language, config, splits, f"trained-{context}")
        del worker
    return {
        "language": language,
        "base": base.spec,
        "threads": threads,
        "steps": steps,
        "batch_size": config.train.batch_size,
        "lora": config.train.lora.model_dump(mode="json"),
        "learning_rate": config.train.learning_rate,
        "clip_frames": frames,
        "encoding": encoding,
        "training": training,
        "scores": scores,
        "load_average": os.getloadavg(),
    }


def table(result: dict) -> str:
    lines = ["encode          frames  s/utterance"]
    lines += [
        f"{e['split']:6} {e['context']:5}   {e['frames']:5}  {e['seconds_per_utterance']:.3f}"
        for e in result["encoding"]
    ]
    lines += ["", "trained on  frames  steps  step s (median)  final loss"]
    lines += [
        f"{t['trained_on']:10}  {t['frames']:5}  {t['steps']:5}  {t['step_seconds_median']:15.3f}  "
        f"{t['final_loss']:.3f}"
        for t in result["training"]
    ]
    lines += ["", "model          split  inference   WER     CER     decode s/utterance"]
    lines += [
        f"{s['model']:14} {s['split']:6} {s['inference']:9} {s['wer']:6.3f}  {s['cer']:6.3f}  "
        f"{s['decode_seconds_per_utterance']:.3f}"
        for s in result["scores"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ray_jobs/configs/demo.yaml")
    parser.add_argument("--language", default="hi")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--splits", default=None, help="eval splits, comma-separated (default: the eval and test split)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for whisper-lora")
    args = parser.parse_args(argv)
    config = load_config(
        args.config,
        [
            f"train.language={args.language}",
            f"train.batch_size={args.batch_size}",
            f"train.max_steps={args.steps}",
            f"train.lora.rank={args.rank}",
            f"train.torch_threads={args.threads}",
            "train.num_workers=1",
            "train.precision=fp32",
            *args.overrides,
        ],
    )
    if not config.train.freeze_encoder:
        parser.error("the benchmark compares cached encoder outputs: train.freeze_encoder must be true")
    splits = args.splits.split(",") if args.splits else [config.data.eval_split, config.data.test_split]
    with tempfile.TemporaryDirectory(prefix="audio-context-") as work:
        result = run(config, args.language, args.steps, args.threads, splits, Path(work))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
