"""The main job: prepare → (encode) → zero-shot → Tune sweep of Train runs → select → test-split scores → publish
with its report and the resolved config.

Every stage reuses what an earlier run of the same experiment left: prepared shards, the encoder cache, zero-shot
and test scores and the Tune experiment itself. This module wires the stages; each lives in its own package.
"""

from __future__ import annotations

import hashlib
import logging

import yaml

from whisper_lora.config import JobConfig
from whisper_lora.manifest import AttachedFile, BaseModelRecord, Manifest, Scores
from whisper_lora.models.resolve import resolve_model
from whisper_lora.prepare import ensure_prepared
from whisper_lora.publish import Upload, publish_selection
from whisper_lora.ray_runtime import init_ray
from whisper_lora.report import report_files
from whisper_lora.resources import use_gpu
from whisper_lora.score import held_out_scores, zero_shot_scores
from whisper_lora.storage import open_location
from whisper_lora.train.checkpoint import ADAPTER_DIR
from whisper_lora.train.trainer import training_data
from whisper_lora.tune.select import select_best, selected_adapter
from whisper_lora.tune.sweep import outcomes_of, prepare_state, run_sweep, sweep_name
from whisper_lora.tune.tracking import link_published

log = logging.getLogger(__name__)


def resolved_config(config: JobConfig) -> tuple[AttachedFile, bytes]:
    """The run config as it ran (every default filled in, paths absolute) as YAML that ``--config`` reads back,
    and its record: ``configs/<sha12>.yaml``, named by content so runs publishing to one experiment keep theirs."""
    data = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True).encode("utf-8")
    return AttachedFile.of(f"configs/{hashlib.sha256(data).hexdigest()[:12]}.yaml", data), data


def tune_languages(config: JobConfig) -> Manifest:
    """Run the whole job; returns the published manifest."""
    config = config.with_absolute_paths()
    config_record, config_yaml = resolved_config(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.yaml").write_bytes(config_yaml)
    prepare_state(config, sweep_name(config))  # a mirror that does not verify stops the job now, not after prepare
    init_ray(config.ray)
    base = resolve_model(config.model)  # once, here: every node gets this path (under model.cache_dir)
    ensure_prepared(config)
    gpu = use_gpu(config)
    data_root = training_data(config, base, config.data.languages, gpu, test_split=True)
    base_scores = zero_shot_scores(config, base, data_root, gpu, test_split=True)
    zero_shot = {name: Scores.of(scores[config.data.eval_split]) for name, scores in base_scores.items()}
    train_storage = open_location(config.train.storage_path, config.storage)
    outcomes = outcomes_of(run_sweep(config, gpu, base), train_storage)
    for outcome in outcomes:
        if outcome.failed:
            log.warning(
                "trial %s (%s r=%d) failed: %s", outcome.trial_id, outcome.language, outcome.rank, outcome.error
            )
    winners = select_best(outcomes)
    # Ray reports checkpoint paths inside its storage filesystem (absolute locally, bucket/key on S3)
    checkpoints = {language: train_storage.within(outcome.checkpoint) for language, outcome in winners.items()}
    adapters = {language: checkpoint.join(ADAPTER_DIR) for language, checkpoint in checkpoints.items()}
    tested = held_out_scores(config, base, data_root, adapters, base_scores, gpu)
    uploads = []
    for language, outcome in winners.items():
        log.info(
            "%s: trial %s r=%d lr=%g → %.3f (zero-shot %.3f) on %s",
            language,
            outcome.trial_id,
            outcome.rank,
            outcome.learning_rate,
            outcome.best.primary,
            zero_shot[language].primary,
            config.data.eval_split,
        )
        if outcome.best.normalizer != config.eval.normalizer:
            log.warning("%s: the trial's evaluation used the %s normaliser, eval.normalizer is %s",
                        language, outcome.best.normalizer, config.eval.normalizer)  # fmt: skip
        selected = selected_adapter(
            outcome, zero_shot[language], config.data.eval_split, config.train.lora.target_modules, base.sha256,
            tested.get(language), config_record,
        )  # fmt: skip
        uploads.append(Upload(selected, checkpoints[language]))
    published = publish_selection(
        open_location(config.publish.storage, config.storage).join(config.experiment),
        BaseModelRecord(id=base.spec, sha256=base.sha256, revision=base.revision),
        uploads,
        [outcome.summary() for outcome in outcomes],
        lambda manifest: {**report_files(manifest), config_record.name: config_yaml},
    )
    link_published(config, sweep_name(config), published)  # the MLflow run of each adapter's trial
    return published
