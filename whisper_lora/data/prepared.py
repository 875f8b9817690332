"""Reading what ``prepare`` wrote: ``<prepared>/language=<code>/split=<name>/*.parquet``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray.data  # noqa: F401  (registers Ray's tensor extension type, so input_features read as tensors)

from whisper_lora.config import JobConfig

COLUMNS = ["id", "sentence", "duration_s", "label_ids"]
FEATURE_COLUMNS = ("input_features", "encoder_hidden_states")
"""Model input of a split: log-mel (prepared) or the frozen encoder's output (encoded)."""


PARQUET_WRITE_ARGS = {"use_dictionary": False, "min_rows_per_file": 256}
"""How prepared and encoded splits are written. Dictionary encoding of the float tensors makes reading 5x slower
for no gain (the values do not repeat); few larger files keep each trial's read of a split to a few tasks."""


BUCKET_FILE = re.compile(r"^frames(\d+)-")
"""Files of a length-bucketed split (the frozen-encoder cache's train split under ``train.audio_context=clip``) are
named ``frames<N>-…parquet``: every row in one holds encoder output over ``N`` log-mel frames."""


def bucket_file_name(frames: int, name: str) -> str:
    return f"frames{frames}-{name}"


def file_bucket(name: str) -> int:
    """Frames of the length bucket a split file holds (``bucket_file_name``); 0 for a file of an unbucketed split."""
    match = BUCKET_FILE.match(name)
    return int(match.group(1)) if match else 0


def prepared_dir(config: JobConfig) -> Path:
    """Root of what ``prepare`` wrote for this run: ``<run_dir>/prepared``."""
    return config.run_dir / "prepared"


def split_dir(prepared: str | Path, language: str, split: str) -> Path:
    """Where one language's split lives."""
    return Path(prepared) / f"language={language}" / f"split={split}"


def split_files(directory: str | Path) -> list[tuple[str, int]]:
    """(name, bytes) of a split's Parquet files: what caches keyed on a split compare."""
    return sorted((path.name, path.stat().st_size) for path in Path(directory).glob("*.parquet"))


def iter_batches(
    path: str | Path, batch_size: int, limit: int | None = None, rank: int = 0, world: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a prepared (or encoded) split, read in this process (evaluation, benchmarks), in ``id`` order:
    scores then do not depend on how the split was written. Of the first ``limit`` rows, shard ``rank`` of
    ``world`` contiguous shards (sizes differ by at most one row; a shard may be empty)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no prepared data at {path}: run `whisper-lora prepare` first")
    dataset = pads.dataset(str(path), format="parquet")
    feature = next(name for name in FEATURE_COLUMNS if name in dataset.schema.names)
    ids = dataset.to_table(columns=["id"]).column("id").to_pylist()
    order = sorted(range(len(ids)), key=ids.__getitem__)[:limit]
    order = order[len(order) * rank // world : len(order) * (rank + 1) // world]
    for start in range(0, len(order), batch_size):
        yield rows_of(dataset.take(order[start : start + batch_size], columns=[*COLUMNS, feature]), feature)


def rows_of(table: pa.Table, feature: str) -> dict[str, np.ndarray]:
    """A table of split rows as the columns ``collate`` takes (the ones ``table`` has: ``sentence`` is optional)."""
    rows = {
        "id": np.asarray(table.column("id").to_pylist()),
        "duration_s": table.column("duration_s").to_numpy(),
        "label_ids": [np.asarray(ids, dtype=np.int64) for ids in table.column("label_ids").to_pylist()],
        feature: table.column(feature).combine_chunks().to_numpy(),
    }
    if "sentence" in table.column_names:
        rows["sentence"] = np.asarray(table.column("sentence").to_pylist())
    return rows
