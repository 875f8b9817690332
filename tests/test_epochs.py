"""The train split's order, epoch by epoch: seeded, different every epoch, dealt out equally, and skipped exactly
on resume; read through the storage layer (local here; the same reader takes s3://)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pytest

from tests.builders import write_split
from whisper_lora.data.epochs import (
    CACHE_SHARE,
    CHUNK_ROWS,
    EpochReader,
    bucketed,
    epoch_order,
    global_batches,
    layout,
    node_cache_bytes,
    worker_batches,
)
from whisper_lora.storage import open_location


def _reader(tmp_path: Path, files: list[int], cache_bytes: int = 2**30) -> EpochReader:
    return EpochReader(open_location(str(write_split(tmp_path / "split", files))), cache_bytes)


def test_an_epoch_visits_every_row_once_in_an_order_of_its_own_that_repeats_per_seed():
    rows = [40, 7, 40]
    first, again = epoch_order(rows, seed=0, epoch=0, window=32), epoch_order(rows, seed=0, epoch=0, window=32)
    second, other_seed = epoch_order(rows, seed=0, epoch=1, window=32), epoch_order(rows, seed=1, epoch=0, window=32)
    assert sorted(first) == list(range(87))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second) and not np.array_equal(first, other_seed)
    assert not np.array_equal(first, np.arange(87))  # shuffled, not the written order
    # rows far apart in the files meet in one window: chunks are permuted before the window shuffle
    assert len({int(index) // CHUNK_ROWS for index in first[:32]}) > 1


def test_workers_take_equal_disjoint_slices_of_every_global_micro_batch():
    order = epoch_order([25], seed=3, epoch=0, window=25)
    mine = [worker_batches(order, rank, world=2, batch_size=3, micro_batches=4) for rank in range(2)]
    assert all(batches.shape == (4, 3) for batches in mine)
    assert not set(mine[0].ravel()) & set(mine[1].ravel())
    assert np.array_equal(np.concatenate([mine[0][0], mine[1][0]]), order[:6])  # global micro-batch 0
    with pytest.raises(ValueError, match=r"the split has 25 rows: 2 worker\(s\) × 5 batch\(es\) of 3 need 30"):
        worker_batches(order, 0, world=2, batch_size=3, micro_batches=5)


def test_a_bucketed_order_deals_each_global_micro_batch_from_one_bucket_and_keeps_the_shuffle():
    buckets = np.array([200] * 13 + [300] * 9 + [1000] * 5)
    order = epoch_order([27], seed=5, epoch=0, window=27)
    dealt = bucketed(order, buckets, together=4)
    groups = dealt.reshape(-1, 4)
    assert len(groups) == global_batches([13, 9, 5], 4) == 3 + 2 + 1
    assert all(len(set(buckets[group])) == 1 for group in groups)
    assert len(set(dealt)) == len(dealt)  # a row at most once; each bucket's remainder (1, 1, 1) sits out
    # a group is dealt where the order reaches its last row, and keeps its rows' relative order
    positions = {int(row): at for at, row in enumerate(order)}
    assert [max(positions[int(r)] for r in group) for group in groups] == sorted(
        max(positions[int(r)] for r in group) for group in groups
    )
    assert np.array_equal(bucketed(order, np.zeros(27, int), 4), order[:24])  # one bucket: the order itself


def test_the_reader_returns_the_rows_of_the_order_with_their_columns(tmp_path):
    reader = _reader(tmp_path, [10, 13])
    assert reader.rows == 23 and [g.rows for g in layout(reader.split)] == [8, 2, 8, 5]
    rows = reader.read([17, 2, 9])
    assert list(rows["id"]) == ["r017", "r002", "r009"]
    assert [int(ids[2]) for ids in rows["label_ids"]] == [237, 222, 229]
    assert [float(features[0, 0]) for features in rows["input_features"]] == [17.0, 2.0, 9.0]
    assert list(rows["duration_s"]) == [1.5, 1.5, 1.5]


def test_a_resumed_epoch_skips_exactly_the_batches_trained_and_reads_none_of_them(tmp_path):
    reader = _reader(tmp_path, [30], cache_bytes=0)
    indices = worker_batches(reader.order(0, 2, 1024), rank=1, world=2, batch_size=2, micro_batches=6)
    whole = [list(rows["id"]) for rows in reader.batches(indices)]
    read = []
    original = reader.read
    reader.read = lambda rows: read.append(list(rows)) or original(rows)
    resumed = [list(rows["id"]) for rows in reader.batches(indices, skip=4)]
    assert resumed == whole[4:]
    assert read == [list(batch) for batch in indices[4:]]


def test_the_cache_keeps_row_groups_while_they_fit(tmp_path):
    loads = {}
    for cache_bytes in (2**30, 0):
        reader = _reader(tmp_path / str(cache_bytes), [16, 16])  # 4 row groups of 8
        reader.cache_bytes = cache_bytes
        load, loaded = reader._load, []
        reader._load = lambda group, load=load, loaded=loaded: loaded.append(group) or load(group)
        for epoch in range(3):
            list(reader.batches(worker_batches(reader.order(0, epoch, 64), 0, 1, 4, 8)))
        loads[cache_bytes] = len(loaded)
    assert loads[2**30] == 4  # each row group read once in three epochs
    assert loads[0] > 12  # without a cache, every batch reads again what it needs


def test_the_cache_is_capped_at_the_workers_share_of_the_nodes_memory():
    gib = 2**30
    assert node_cache_bytes(4 * gib, workers_on_node=2, available=24 * gib) == 4 * gib  # fits: as configured
    with recorded("whisper_lora.data.epochs") as records:  # its own handler: other tests' logging setups vary
        capped = node_cache_bytes(4 * gib, workers_on_node=8, available=24 * gib)
    assert capped == int(CACHE_SHARE * 24 * gib / 8) < 4 * gib
    assert any("row-group cache capped at 1536 MiB (of 4096 MiB configured)" in r.getMessage() for r in records)
    assert node_cache_bytes(0, workers_on_node=1, available=gib) == 0
    assert 0 < node_cache_bytes(2**50, workers_on_node=1) < 2**50  # this machine's memory, read when not given


@contextlib.contextmanager
def recorded(name: str):
    """The INFO records of logger ``name`` while the block runs."""
    logger, records = logging.getLogger(name), []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
