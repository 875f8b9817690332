"""Which rows each Train worker trains on, epoch by epoch: a seeded order every worker computes on its own.

Ray Data's ``streaming_split`` hands blocks to whichever worker asks first, so a restarted worker cannot know
which rows it had consumed, and every epoch saw the rows in the order they were written. Here an epoch's order is
a pure function of ``(seed, epoch)`` and the split's Parquet layout (files by name, their row groups): the row
groups are cut into chunks of ``CHUNK_ROWS`` rows, the chunks are permuted, rows are shuffled within windows of
``window`` rows, and the order is dealt out in global micro-batches of ``world × batch_size`` rows, worker ``r``
taking the ``r``-th slice of each. Every worker trains on as many rows, each row at most once per epoch, and a
resumed worker recomputes the same order and skips the micro-batches it already trained on without reading them.

A length-bucketed split (``data.prepared.file_bucket``: the frozen-encoder cache's train split under
``train.audio_context=clip``) holds rows whose encoder output has different lengths, one length per file. Its order
is regrouped so that every global micro-batch holds rows of one bucket (``bucketed``): a group is dealt when the
shuffled order brings its last row, and each bucket's remainder short of a global micro-batch sits the epoch out
(different rows each epoch). ``global_batches`` counts what an epoch then deals.

Chunks and windows keep reads local: a window touches a bounded set of row groups, which the reader keeps in a
cache while they fit (``cache_bytes``; a small low-resource split stays whole in memory after the first epoch).
The cache is never larger than the worker's share of its node's memory (``node_cache_bytes``): trials side by side
on one node each hold a cache, and a configured size that suits a GPU node would swap a smaller one.
The next micro-batch is read in a background thread while the current one trains.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from whisper_lora.data.prepared import FEATURE_COLUMNS, file_bucket, rows_of
from whisper_lora.storage import Location

CHUNK_ROWS = 16
"""Rows that stay neighbours before the window shuffle: small enough to mix a split of a few hundred rows well,
large enough that a window reads each row group it touches for many of its rows."""
CACHE_SHARE = 0.5
"""Of a worker's equal share of its node's available memory, the part its row-group cache may take: the rest is
for its model, activations and optimizer, which grow after the cache is sized."""
log = logging.getLogger(__name__)


def node_cache_bytes(requested: int, workers_on_node: int, available: int | None = None) -> int:
    """The row-group cache one worker keeps: ``requested`` (``train.data_cache_mib``), capped at ``CACHE_SHARE`` of
    the node's ``available`` memory (default: what the OS reports now) divided among the ``workers_on_node``
    training workers there. Logged when capped."""
    available = psutil.virtual_memory().available if available is None else available
    share = int(CACHE_SHARE * available / max(workers_on_node, 1))
    if requested > share:
        log.info("row-group cache capped at %d MiB (of %d MiB configured): %d MiB available on this node for %d "
                 "worker(s)", share >> 20, requested >> 20, available >> 20, workers_on_node)  # fmt: skip
        return share
    return requested


@dataclass(frozen=True)
class RowGroup:
    file: Location
    index: int
    rows: int
    bytes: int
    """Uncompressed size: what it takes in the reader's cache."""
    bucket: int = 0
    """Length bucket of its file (encoder frames; 0: the split is not bucketed)."""


def layout(split: Location) -> list[RowGroup]:
    """The split's row groups in a fixed order: Parquet files by name, then row-group index."""
    groups = []
    for file in (f for f in split.files() if f.name.endswith(".parquet")):
        with file.open() as handle:
            metadata = pq.ParquetFile(handle).metadata
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            groups.append(RowGroup(file, index, group.num_rows, group.total_byte_size, file_bucket(file.name)))
    if not groups:
        raise FileNotFoundError(f"no Parquet rows in {split.uri}: run `whisper-lora prepare` first")
    return groups


def bucket_rows(groups: Sequence[RowGroup]) -> list[int]:
    """Rows per length bucket of a split's ``layout``, shortest bucket first."""
    counts: dict[int, int] = {}
    for group in groups:
        counts[group.bucket] = counts.get(group.bucket, 0) + group.rows
    return [counts[bucket] for bucket in sorted(counts)]


def epoch_order(group_rows: Sequence[int], seed: int, epoch: int, window: int) -> np.ndarray:
    """Every row index of the split (numbered through the row groups in ``layout`` order), in the order of
    ``epoch``: chunks of ``CHUNK_ROWS`` permuted, then rows shuffled within windows of ``window`` rows."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(group_rows)[:-1]]).astype(np.int64)
    chunks = [
        np.arange(start + offset, start + min(offset + CHUNK_ROWS, rows))
        for start, rows in zip(starts, group_rows, strict=True)
        for offset in range(0, rows, CHUNK_ROWS)
    ]
    order = np.concatenate([chunks[i] for i in rng.permutation(len(chunks))]) if chunks else np.empty(0, np.int64)
    for begin in range(0, len(order), window):
        order[begin : begin + window] = rng.permutation(order[begin : begin + window])
    return order


def bucketed(order: np.ndarray, buckets: np.ndarray, together: int) -> np.ndarray:
    """``order`` regrouped so that each run of ``together`` rows shares a bucket (``buckets[row]``): every bucket's
    rows in their order, cut into groups, each group placed where the order reaches its last row; a bucket's
    remainder short of a group is left out. With one bucket this is ``order`` without its incomplete tail."""
    pending: dict[int, list[int]] = {}
    groups = []
    for row in order.tolist():
        group = pending.setdefault(int(buckets[row]), [])
        group.append(row)
        if len(group) == together:
            groups.append(group[:])
            group.clear()
    return np.asarray([row for group in groups for row in group], dtype=np.int64)


def global_batches(bucket_rows: Sequence[int], together: int) -> int:
    """Global micro-batches of ``together`` rows an epoch deals from buckets of ``bucket_rows`` rows each."""
    return sum(rows // together for rows in bucket_rows)


def worker_batches(order: np.ndarray, rank: int, world: int, batch_size: int, micro_batches: int) -> np.ndarray:
    """Row indices of worker ``rank``'s micro-batches in an epoch: (micro_batches, batch_size). Global micro-batch
    ``k`` is ``order[k·world·batch_size : (k+1)·world·batch_size]``; the worker takes its slice of each."""
    needed = micro_batches * world * batch_size
    if len(order) < needed:
        raise ValueError(
            f"the split has {len(order)} rows: {world} worker(s) × {micro_batches} batch(es) of {batch_size} "
            f"need {needed}"
        )
    return order[:needed].reshape(micro_batches, world, batch_size)[:, rank, :]


class EpochReader:
    """One worker's view of a prepared (or encoded) split: ``batches(...)`` yields its micro-batches of an epoch as
    the columns ``collate`` takes, in the order of ``epoch_order``."""

    def __init__(self, split: Location, cache_bytes: int) -> None:
        self.split = split
        self.groups = layout(split)
        self.cache_bytes = cache_bytes
        with self.groups[0].file.open() as handle:
            names = pq.read_schema(handle).names
        self.feature = next((name for name in FEATURE_COLUMNS if name in names), None)
        if self.feature is None:
            raise ValueError(f"{split.uri} has none of the feature columns {FEATURE_COLUMNS}")
        self.columns = ["id", "duration_s", "label_ids", self.feature]
        self._starts = np.concatenate([[0], np.cumsum([g.rows for g in self.groups])]).astype(np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return int(self._starts[-1])

    @property
    def bucket_rows(self) -> list[int]:
        """Rows per length bucket (one count for an unbucketed split)."""
        return bucket_rows(self.groups)

    def order(self, seed: int, epoch: int, window: int, together: int = 1) -> np.ndarray:
        """``epoch_order``; in a bucketed split, regrouped so that each run of ``together`` rows (one global
        micro-batch) shares a bucket (``bucketed``)."""
        order = epoch_order([g.rows for g in self.groups], seed, epoch, window)
        if len({group.bucket for group in self.groups}) == 1:
            return order
        buckets = np.repeat([group.bucket for group in self.groups], [group.rows for group in self.groups])
        return bucketed(order, buckets, together)

    def batches(self, indices: np.ndarray, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The micro-batches ``indices`` (from ``worker_batches``), the first ``skip`` left out unread; the next one
        is read while the caller trains on the current one."""
        pending = list(indices[skip:])
        if not pending:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-reader") as pool:
            upcoming = pool.submit(self.read, pending[0])
            for following in [*pending[1:], None]:
                batch = upcoming.result()
                if following is not None:
                    upcoming = pool.submit(self.read, following)
                yield batch

    def read(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows with these split-wide indices, in this order."""
        rows = np.asarray(rows, dtype=np.int64)
        group_of = np.searchsorted(self._starts, rows, side="right") - 1
        pieces, positions = [], np.empty(len(rows), dtype=np.int64)
        offset = 0
        for group in dict.fromkeys(group_of.tolist()):
            mine = np.flatnonzero(group_of == group)
            pieces.append(self._group(group).take(pa.array(rows[mine] - self._starts[group])))
            positions[mine] = np.arange(offset, offset + len(mine))
            offset += len(mine)
        table = pa.concat_tables(pieces).take(pa.array(positions))
        return rows_of(table, self.feature)

    def _group(self, index: int) -> pa.Table:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        table = self._load(self.groups[index])
        with self._lock:
            self._cache[index] = table
            self._cached_bytes += table.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
        return table

    def _load(self, group: RowGroup) -> pa.Table:
        with group.file.open() as handle:
            return pq.ParquetFile(handle).read_row_group(group.index, columns=self.columns)
