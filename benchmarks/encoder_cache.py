"""The frozen-encoder cache against a plain encoder loop on the same clips: is the cache's machinery (Ray Data
actors, Parquet read and write, float16 hidden states) within 10% of just running ``model.model.encoder``?

    .venv/bin/python benchmarks/encoder_cache.py --config ray_jobs/configs/demo.yaml --splits dev,test \
        --json encoder_cache.json

Needs prepared data (``make demo`` or ``whisper-lora prepare``). Both sides encode the prepared rows of the
configured languages' ``--splits`` at Whisper's 3000 frames, on the cores the job's actors use
(``encode.encode_actors``):

- (a) ``cache``: the product's ``encode.encode`` into a fresh encoded root (a temporary run directory whose
  ``prepared`` links to the real one), timed from the call to its return on a Ray that is already up: actor start,
  model load per actor, reading, encoding, float16 conversion and writing Parquet.
- (b) ``plain``: in this process, the same model loaded once, ``model.model.encoder`` over batches of
  ``encode.ENCODE_BATCH`` with as many torch threads as the actors have cores together; the outputs are kept as
  float16 arrays and dropped (nothing written). The model load is timed apart and not counted.

The two are run alternately ``--repeats`` times; utterances per second of each run and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from whisper_lora.config import JobConfig, load_config
from whisper_lora.data.collate import stack_features
from whisper_lora.data.prepared import iter_batches, prepared_dir, split_dir
from whisper_lora.encode import ENCODE_BATCH, encode, encode_actors
from whisper_lora.models.resolve import resolve_model
from whisper_lora.ray_runtime import init_ray


def splits_of(config: JobConfig, splits: list[str]) -> list[tuple[str, str]]:
    return [(language, split) for language in config.data.languages for split in splits]


def rows_of(config: JobConfig, splits: list[tuple[str, str]]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for language, split in splits
               for f in sorted(split_dir(prepared_dir(config), language, split).glob("*.parquet")))  # fmt: skip


def cache_run(config: JobConfig, splits: list[tuple[str, str]], base) -> float:
    """Seconds ``encode.encode`` takes for ``splits`` into a fresh run directory sharing the prepared data."""
    with tempfile.TemporaryDirectory(prefix="encoder-cache-") as scratch:
        fresh = config.model_copy(update={"output_dir": Path(scratch)})
        prepared_dir(fresh).parent.mkdir(parents=True)
        prepared_dir(fresh).symlink_to(prepared_dir(config).resolve(), target_is_directory=True)
        started = time.perf_counter()
        encode(fresh, base, splits, use_gpu=False)
        return time.perf_counter() - started


@torch.no_grad()
def plain_run(encoder: torch.nn.Module, config: JobConfig, splits: list[tuple[str, str]]) -> float:
    """Seconds of a plain forward loop over the same rows (reading the prepared log-mel included)."""
    started = time.perf_counter()
    for language, split in splits:
        for batch in iter_batches(split_dir(prepared_dir(config), language, split), ENCODE_BATCH):
            encoder(stack_features(batch["input_features"])).last_hidden_state.to(torch.float16).numpy()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--splits", default="dev,test", help="comma-separated prepared splits to encode")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides).with_absolute_paths()
    splits = splits_of(config, args.splits.split(","))
    rows = rows_of(config, splits)
    init_ray(config.ray)
    try:
        base = resolve_model(config.model)
        plan = encode_actors(use_gpu=False)
        threads = plan.actors * plan.cpus_each
        torch.set_num_threads(threads)
        loading = time.perf_counter()
        from transformers import WhisperForConditionalGeneration

        encoder = WhisperForConditionalGeneration.from_pretrained(base.path).model.encoder.eval()
        load_seconds = time.perf_counter() - loading
        runs: dict[str, list[float]] = {"cache": [], "plain": []}
        for _ in range(args.repeats):
            runs["cache"].append(cache_run(config, splits, base))
            runs["plain"].append(plain_run(encoder, config, splits))
    finally:
        ray.shutdown()
    median = {name: statistics.median(seconds) for name, seconds in runs.items()}
    result = {
        "model": base.spec,
        "splits": [f"{language}/{split}" for language, split in splits],
        "utterances": rows,
        "actors": plan.actors,
        "threads_per_actor": plan.cpus_each,
        "plain_threads": threads,
        "plain_model_load_seconds": round(load_seconds, 2),
        "seconds": {name: [round(s, 2) for s in seconds] for name, seconds in runs.items()},
        "utterances_per_second": {name: round(rows / seconds, 3) for name, seconds in median.items()},
        "cache_over_plain": round(median["cache"] / median["plain"], 3),
    }
    print(f"{rows} utterances ({', '.join(result['splits'])}) at 3000 frames, {plan.actors} actor(s) × "
          f"{plan.cpus_each} thread(s) vs one loop × {threads} thread(s)")  # fmt: skip
    for name in ("cache", "plain"):
        print(f"  {name:5}  {result['utterances_per_second'][name]:.3f} utt/s  runs {result['seconds'][name]} s")
    print(f"  cache / plain time: {result['cache_over_plain']:.3f} (within 10%: {result['cache_over_plain'] <= 1.1})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
