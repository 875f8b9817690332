"""The main job: prepare → (encode) → zero-shot → Tune sweep of Train runs → select → publish with its report.

Every stage reuses what an earlier run of the same experiment left: prepared shards, the encoder cache, zero-shot
scores and the Tune experiment itself. This module wires the stages; each lives in its own package.
"""

from __future__ import annotations

import logging

from whisper_lora.config import JobConfig
from whisper_lora.manifest import BaseModelRecord, Manifest, Scores
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.prepare import ensure_prepared
from whisper_lora.publish import Upload, publish_selection
from whisper_lora.ray_runtime import init_ray
from whisper_lora.report import report_files
from whisper_lora.score import zero_shot_scores
from whisper_lora.storage import open_location
from whisper_lora.train.trainer import training_data, use_gpu
from whisper_lora.tune.select import select_best, selected_adapter
from whisper_lora.tune.sweep import outcomes_of, run_sweep

log = logging.getLogger(__name__)


def tune_languages(config: JobConfig) -> Manifest:
    """Run the whole job; returns the published manifest."""
    config = config.with_absolute_paths()
    init_ray(config.ray)
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    ensure_prepared(config)
    gpu = use_gpu(config)
    data_root = training_data(config, base, config.data.languages, gpu)
    zero_shot = {name: Scores.of(scores) for name, scores in zero_shot_scores(config, base, data_root, gpu).items()}
    train_storage = open_location(config.train.storage_path, config.storage)
    outcomes = outcomes_of(run_sweep(config, gpu), train_storage)
    for outcome in outcomes:
        if outcome.failed:
            log.warning(
                "trial %s (%s r=%d) failed: %s", outcome.trial_id, outcome.language, outcome.rank, outcome.error
            )
    uploads = []
    for language, outcome in select_best(outcomes).items():
        log.info(
            "%s: trial %s r=%d lr=%g → %.3f (zero-shot %.3f)",
            language,
            outcome.trial_id,
            outcome.rank,
            outcome.learning_rate,
            outcome.best.primary,
            zero_shot[language].primary,
        )
        selected = selected_adapter(
            outcome, zero_shot[language], config.data.eval_split, config.train.lora.target_modules, base.sha256
        )
        # Ray reports checkpoint paths inside its storage filesystem (absolute locally, bucket/key on S3)
        uploads.append(Upload(selected, train_storage.within(outcome.checkpoint)))
    return publish_selection(
        open_location(config.publish.storage, config.storage).join(config.experiment),
        BaseModelRecord(id=base.spec, sha256=base.sha256),
        uploads,
        [outcome.summary() for outcome in outcomes],
        report_files,
    )
