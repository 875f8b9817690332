"""The streaming feature pipeline: source rows → decoded 16 kHz audio → log-mel + label ids, bad rows counted.

``featurize`` returns a lazy ``ray.data.Dataset``; nothing runs until it is consumed (written by ``prepare``,
or streamed into Ray Train). Drop counts arrive in the ``StatsCollector`` as the batches are processed.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowVariableShapedTensorArray

from whisper_lora.config import DataConfig
from whisper_lora.data.features import Example, Featurizer, Limits, RowDropped, cached_featurizer
from whisper_lora.data.sources import read_source
from whisper_lora.data.stats import BatchStats, GroupStats, batch_key
from whisper_lora.storage import StorageOptions, open_location

log = logging.getLogger(__name__)

KEEP_DROPPED_EXAMPLES = 5
"""Row ids kept per drop reason and batch, so ``stats.json`` shows which files to look at."""


def limits_of(data: DataConfig) -> Limits:
    return Limits(data.min_duration_s, data.max_duration_s, data.max_label_tokens)


def _row_example(featurizer: Featurizer, batch: dict[str, np.ndarray], i: int, storage: StorageOptions) -> Example:
    """Row ``i``'s model inputs, or ``RowDropped``: the source's verdict first, then the featurizer's. Any other
    failure is this one row's, counted as ``bad_row``: a hostile row must not fail the task and stop ``prepare``."""
    if reason := batch["drop_reason"][i]:
        raise RowDropped(str(reason))
    try:
        audio = batch["audio_bytes"][i] or open_location(str(batch["audio_path"][i] or ""), storage)
        return featurizer.example(audio, str(batch["sentence"][i] or ""), str(batch["language"][i]))
    except RowDropped:
        raise
    except Exception as exc:
        log.warning("row %s dropped (bad_row): %s: %s", batch["id"][i], type(exc).__name__, exc)
        raise RowDropped("bad_row") from exc


def featurize_batch(
    batch: dict[str, np.ndarray],
    model_dir: str,
    limits: Limits,
    collector: ray.actor.ActorHandle,
    storage: StorageOptions,
) -> pa.Table:
    """Model inputs for the usable rows of ``batch``; every other row is counted under its drop reason."""
    featurizer = cached_featurizer(model_dir, limits)
    stats: BatchStats = {}
    kept: dict[str, list] = {name: [] for name in ("id", "language", "split", "sentence", "duration_s", "label_ids")}
    features = []
    for i, row_id in enumerate(batch["id"]):
        language, split = str(batch["language"][i]), str(batch["split"][i])
        group = stats.setdefault((language, split), GroupStats())
        group.rows_in += 1
        try:
            example = _row_example(featurizer, batch, i, storage)
        except RowDropped as dropped:
            group.audio_seconds_in += dropped.duration_s
            group.dropped[dropped.reason] += 1
            examples = group.dropped_examples.setdefault(dropped.reason, [])
            if len(examples) < KEEP_DROPPED_EXAMPLES:
                examples.append(str(row_id))
            continue
        group.rows_out += 1
        group.audio_seconds_in += example.duration_s
        group.audio_seconds_out += example.duration_s
        for name, value in (
            ("id", str(row_id)),
            ("language", language),
            ("split", split),
            ("sentence", example.sentence),
            ("duration_s", example.duration_s),
            ("label_ids", example.label_ids),
        ):
            kept[name].append(value)
        features.append(example.input_features)
    rows = zip(batch["language"], batch["split"], batch["id"], strict=True)
    ray.get(collector.add.remote(batch_key(f"{lang}/{split}/{row_id}" for lang, split, row_id in rows), stats))
    return pa.table(
        {
            "id": pa.array(kept["id"], pa.string()),
            "language": pa.array(kept["language"], pa.string()),
            "split": pa.array(kept["split"], pa.string()),
            "sentence": pa.array(kept["sentence"], pa.string()),
            "duration_s": pa.array(kept["duration_s"], pa.float32()),
            "label_ids": pa.array([ids.tolist() for ids in kept["label_ids"]], pa.list_(pa.int32())),
            "input_features": _tensor_column(features, featurizer.extractor.feature_size),
        }
    )


def _tensor_column(features: list[np.ndarray], n_mels: int) -> pa.Array:
    """Variable-length (mels × frames) tensors; an empty batch still gets the column's type."""
    if not features:
        empty = np.empty(1, dtype=object)
        empty[0] = np.zeros((n_mels, 1), dtype=np.float32)
        return ArrowVariableShapedTensorArray.from_numpy(empty)[:0]
    column = np.empty(len(features), dtype=object)
    column[:] = features
    return ArrowVariableShapedTensorArray.from_numpy(column)


def featurize(
    data: DataConfig,
    model_dir: str,
    splits: list[str],
    collector: ray.actor.ActorHandle,
    storage: StorageOptions | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of model inputs for ``splits`` of every configured language; audio referenced by path
    is read through ``storage`` (local, NFS or ``s3://``)."""
    storage = storage or StorageOptions()
    return read_source(data, splits, storage).map_batches(
        featurize_batch,
        batch_size=data.batch_size,
        batch_format="numpy",
        fn_kwargs={"model_dir": model_dir, "limits": limits_of(data), "collector": collector, "storage": storage},
    )
