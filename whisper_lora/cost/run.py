"""The cost job: prepare → zero-shot score → full and LoRA measured through the same Train loop → parameter
accounting for every size → projection to the target workload → ``<run_dir>/cost/cost.{md,csv,json,png}``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
from transformers import WhisperConfig

from whisper_lora.config import JobConfig
from whisper_lora.cost.measure import Measurement, measure
from whisper_lora.cost.parameters import ParameterBudget, parameter_budget
from whisper_lora.cost.project import assumptions, project_instance, workload
from whisper_lora.cost.report import write_cost_report
from whisper_lora.data.prepared import split_dir
from whisper_lora.languages import get_language
from whisper_lora.models.resolve import resolve_model
from whisper_lora.models.sizes import SIZES, size_of
from whisper_lora.prepare import ensure_prepared
from whisper_lora.ray_runtime import init_ray
from whisper_lora.score import zero_shot_scores
from whisper_lora.train.trainer import training_data, use_gpu

log = logging.getLogger(__name__)


def mean_label_tokens(directory: Path) -> float:
    """Mean label length (prompt, text and end tokens) of a prepared split."""
    lengths = pq.read_table(directory, columns=["label_ids"]).column("label_ids").combine_chunks().value_lengths()
    return float(lengths.to_numpy().mean())


def _names(target_modules: list[str] | str) -> str:
    return target_modules if isinstance(target_modules, str) else ", ".join(target_modules)


def budget_row(budget: ParameterBudget) -> dict:
    return {
        "base": budget.base,
        "lora_trainable": budget.trainable,
        "lora_total": budget.total,
        "trainable_fraction": budget.trainable_fraction,
        "adapter_fp32_bytes": budget.adapter_bytes(),
        "full_fp16_bytes": 2 * budget.base,
    }


def compare_cost(config: JobConfig) -> dict:
    """Run the comparison for ``train.language`` (or the first language); returns what ``cost.json`` holds."""
    config = config.with_absolute_paths()
    language = config.train_language
    single = config.model_copy(update={"data": config.data.model_copy(update={"languages": [language]})})
    init_ray(config.ray)
    base = resolve_model(config.model)
    ensure_prepared(config)
    gpu = use_gpu(config)
    data_root = training_data(config, base, [language], gpu)
    before = zero_shot_scores(single, base, data_root, gpu)[language][config.data.eval_split]
    measured: dict[str, Measurement] = {mode: measure(config, mode, language) for mode in ("full", "lora")}
    full, lora = measured["full"], measured["lora"]
    tokens = mean_label_tokens(split_dir(data_root, language, config.data.train_split))
    settings = config.train.lora
    budgets = {size: parameter_budget(size, settings) for size in SIZES}
    work = workload(config.cost, full, tokens)
    ratio = lora.step_seconds / full.step_seconds
    measured_on = f"{full.device} ({config.train.num_workers} worker(s), batch {config.train.batch_size})"
    target = config.cost.target_size
    projections = [
        row
        for instance in config.cost.instances
        for row in project_instance(
            config.cost,
            instance,
            parameter_budget(target),
            budgets[target],
            work,
            ratio,
            config.train.gradient_checkpointing,
        )
    ]
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {
            "spec": base.spec,
            "sha256": base.sha256,
            "size": size_of(WhisperConfig.from_pretrained(base.path)),
        },
        "language": language,
        "eval_split": config.data.eval_split,
        "metric": get_language(language).primary_metric,
        "zero_shot": {key: before[key] for key in ("wer", "cer", "primary")},
        "lora": {
            "rank": settings.rank,
            "alpha": settings.resolved_alpha,
            "target_modules": _names(settings.target_modules),
        },
        "measured": {mode: m.to_dict() for mode, m in measured.items()},
        "ratios_lora_over_full": {
            key: getattr(lora, key) / getattr(full, key)
            for key in ("step_seconds", "peak_memory_bytes", "checkpoint_bytes", "model_bytes", "trainable_parameters")
        },
        "parameters": {size: budget_row(budget) for size, budget in budgets.items()},
        "projection": {
            "target_size": target,
            "assumptions": assumptions(config.cost, work, ratio, measured_on, config.train.gradient_checkpointing),
            "rows": [row.to_dict() for row in projections],
        },
    }
    paths = write_cost_report(config.run_dir / "cost", result)
    log.info("cost comparison written: %s", ", ".join(str(path) for path in paths))
    return result
