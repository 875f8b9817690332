"""``whisper-lora prepare``: run the feature pipeline once and write Parquet shards plus ``stats.json``.

Prepared shards are what training reads: decoding and log-mel are paid once per corpus, not once per trial.
Layout: ``<run_dir>/prepared/language=<code>/split=<name>/*.parquet`` (Hive partitions).
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import ray

from whisper_lora.config import JobConfig
from whisper_lora.data.pipeline import featurize
from whisper_lora.data.prepared import PARQUET_WRITE_ARGS, prepared_dir
from whisper_lora.data.sources import source_fingerprint
from whisper_lora.data.stats import StatsCollector
from whisper_lora.models.resolve import resolve_model
from whisper_lora.ray_runtime import init_ray

log = logging.getLogger(__name__)


def prepare(config: JobConfig, fingerprint: str | None = None) -> dict:
    """Featurize train/eval/test splits of every configured language; returns what ``stats.json`` holds.
    ``fingerprint``: the source's, when the caller has just listed it (``ensure_prepared``)."""
    model = resolve_model(config.model)
    init_ray(config.ray)
    splits = _splits(config)
    out = prepared_dir(config)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # taken before reading: an edit made while this runs prepares again next time
    fingerprint = fingerprint or source_fingerprint(config.data, splits, config.storage)
    collector = StatsCollector.remote()
    started = time.perf_counter()
    dataset = featurize(config.data, model.path, splits, collector, config.storage)
    dataset.write_parquet(str(staging.resolve()), partition_cols=["language", "split"], **PARQUET_WRITE_ARGS)
    elapsed = time.perf_counter() - started
    stats = ray.get(collector.summary.remote())
    stats["wall_seconds"] = round(elapsed, 2)
    stats["audio_seconds_per_second"] = round(stats["total"]["audio_seconds_in"] / elapsed, 2)
    stats["model"] = {"path": model.path, "spec": model.spec, "sha256": model.sha256}
    stats["data"] = config.data.model_dump(mode="json")
    stats["source_fingerprint"] = fingerprint
    (staging / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info(
        "prepared %d of %d rows in %.1f s → %s", stats["total"]["rows_out"], stats["total"]["rows_in"], elapsed, out
    )
    return stats


def _splits(config: JobConfig) -> list[str]:
    return list(dict.fromkeys([config.data.train_split, config.data.eval_split, config.data.test_split]))


def ensure_prepared(config: JobConfig) -> dict:
    """The prepared stats, running ``prepare`` first unless the same data config, source files (``stats.json``'s
    ``source_fingerprint``) and model prepared them."""
    stats_file = prepared_dir(config) / "stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        model = resolve_model(config.model)
        same = stats.get("data") == config.data.model_dump(mode="json") and stats["model"]["sha256"] == model.sha256
        if same:
            fingerprint = source_fingerprint(config.data, _splits(config), config.storage)
            if stats.get("source_fingerprint") == fingerprint:
                log.info("reusing prepared data in %s", stats_file.parent)
                return stats
            log.info("the source files changed since %s was prepared: preparing again", stats_file.parent)
            return prepare(config, fingerprint)
    return prepare(config)
