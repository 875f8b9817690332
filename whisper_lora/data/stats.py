"""Counts of what the pipeline read, kept and dropped (by reason), per language and split.

Map tasks report each batch to one ``StatsCollector`` actor, keyed by the batch's row ids, so a task Ray
retries is counted once. The driver reads the totals after the dataset has been consumed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import ray


@dataclass
class GroupStats:
    """Totals of one (language, split)."""

    rows_in: int = 0
    rows_out: int = 0
    audio_seconds_in: float = 0.0
    audio_seconds_out: float = 0.0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, other: GroupStats, keep_examples: int = 5) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.audio_seconds_in += other.audio_seconds_in
        self.audio_seconds_out += other.audio_seconds_out
        self.dropped.update(other.dropped)
        for reason, ids in other.dropped_examples.items():
            examples = self.dropped_examples.setdefault(reason, [])
            examples.extend(ids[: keep_examples - len(examples)])

    def to_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "audio_seconds_in": round(self.audio_seconds_in, 3),
            "audio_seconds_out": round(self.audio_seconds_out, 3),
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_examples": self.dropped_examples,
        }


BatchStats = dict[tuple[str, str], GroupStats]


def batch_key(ids: Iterable[str]) -> str:
    """A stable name for one batch of rows: the same rows give the same key on a retry."""
    digest = hashlib.sha1()
    for row_id in ids:
        digest.update(row_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def summarize(per_batch: Iterable[BatchStats]) -> dict:
    """Totals per ``language/split`` and overall, as written to ``stats.json``."""
    groups: dict[str, GroupStats] = {}
    for stats in per_batch:
        for (language, split), group in stats.items():
            groups.setdefault(f"{language}/{split}", GroupStats()).add(group)
    total = GroupStats()
    for group in groups.values():
        total.add(group)
    return {"total": total.to_dict(), "groups": {name: groups[name].to_dict() for name in sorted(groups)}}


@ray.remote(num_cpus=0)
class StatsCollector:
    """Holds every batch's counts by batch key; a repeated key (a retried task) replaces, never adds."""

    def __init__(self) -> None:
        self._batches: dict[str, BatchStats] = {}

    def add(self, key: str, stats: BatchStats) -> None:
        self._batches[key] = stats

    def summary(self) -> dict:
        return summarize(self._batches.values())
