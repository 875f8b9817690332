"""Scores of a base model, or base + adapter, on prepared splits: ``whisper-lora evaluate``, the zero-shot bar
every adapter must clear, and the test-split scores of each selected adapter beside its base model's. All load
through ``models.inference`` and score through ``evaluate.score_split`` with ``eval.normalizer``.

Zero-shot and test scores run as one Ray task per language (a GPU each where there are GPUs) and are kept in
``<run_dir>/zero_shot_<split>.json`` and ``<run_dir>/test_scores_<split>.json``, reused while the base model, the
adapter, the data, the normaliser and the training precision are unchanged. Every score is decoded in the
precision the adapters train in on the scoring device (``train.precision.scoring_precision``), as the trials'
dev evaluations are, and says so (``precision``, ``device``); an adapter and its base are scored in the same task.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from transformers import PreTrainedModel, WhisperTokenizer

from whisper_lora.config import ConfigError, JobConfig
from whisper_lora.data.prepared import prepared_dir, split_dir, split_files
from whisper_lora.evaluate import score_split
from whisper_lora.manifest import ADAPTER_FILES, Scores, Scoring, adapter_files
from whisper_lora.models.inference import inference_device, load_for_inference
from whisper_lora.models.resolve import ResolvedModel, resolve_model
from whisper_lora.resources import task_options
from whisper_lora.storage import Location, StorageOptions, open_location
from whisper_lora.train.precision import Device, Precision, device_label, scoring_precision

log = logging.getLogger(__name__)


def _log(language: str, split: str, scores: dict) -> None:
    log.info(
        "%s on %s: wer %.3f cer %.3f (%d utterances)",
        language,
        split,
        scores["wer"],
        scores["cer"],
        scores["utterances"],
    )


def _scoring(requested: str, device: torch.device) -> dict:
    """``precision`` and ``device`` of scores decoded on ``device`` for a run training at ``requested``."""
    precision = scoring_precision(requested, Device.of(device)).precision
    return {"precision": precision, "device": device_label(device)}


def score(
    config: JobConfig,
    split: str | None = None,
    adapter: str | None = None,
    device: torch.device | None = None,
    precision: Precision | None = None,
) -> dict:
    """Scores per language on ``split`` (default: the test split); with ``adapter``, only its language. On
    ``device`` (default: a GPU when there is one) in ``precision`` (default: the run's, ``scoring_precision`` of
    ``train.precision`` there). Written to ``<run_dir>/scores_<split>_<zero-shot or adapter>.json``."""
    split = split or config.data.test_split
    base = resolve_model(config.model)
    device = device or inference_device()
    try:
        scoring = _scoring(precision or config.train.precision, device)
    except ValueError as exc:
        raise ConfigError(f"precision on {device}: {exc}") from None
    model = load_for_inference(base.path, adapter, device, scoring["precision"])
    tokenizer = WhisperTokenizer.from_pretrained(base.path)
    languages = config.data.languages if adapter is None else [config.train_language]
    scores = {
        "model": base.spec,
        "model_sha256": base.sha256,
        "adapter": adapter,
        "split": split,
        "normalizer": config.eval.normalizer,
        **scoring,
        "languages": {},
    }
    for language in languages:
        directory = str(split_dir(prepared_dir(config), language, split))
        result = score_split(
            model, tokenizer, directory, language, config.eval.batch_size, config.eval.max_utterances,
            normalizer=config.eval.normalizer,
        )  # fmt: skip
        scores["languages"][language] = {**result, **scoring}
        _log(language, split, result)
    what = "zero-shot" if adapter is None else Path(adapter).parent.name
    out = config.run_dir / f"scores_{split}_{what}.json"
    out.write_text(json.dumps(scores, indent=2, ensure_ascii=False), encoding="utf-8")
    return scores


@ray.remote
def score_base(
    base_path: str, directory: str, language: str, batch_size: int, limit: int | None, normalizer: str,
    requested: str,
) -> dict:  # fmt: skip
    """The base model on one split, in the precision a run training at ``requested`` trains in here."""
    scoring = _scoring(requested, inference_device())
    model = load_for_inference(base_path, None, inference_device(), scoring["precision"])
    tokenizer = WhisperTokenizer.from_pretrained(base_path)
    return {**score_split(model, tokenizer, directory, language, batch_size, limit, normalizer=normalizer), **scoring}


def _key(base: ResolvedModel, directory: Path, config: JobConfig) -> dict:
    limit = config.eval.max_utterances
    files = split_files(directory)
    return {"model_sha256": base.sha256, "files": files, "max_utterances": limit, "normalizer": config.eval.normalizer,
            "precision": config.train.precision}  # fmt: skip


def zero_shot_scores(config: JobConfig, base: ResolvedModel, data_root: Path, gpu: bool) -> dict[str, dict]:
    """Scores of the base model per language on the eval split (computed for whatever is not cached)."""
    split = config.data.eval_split
    cache_file = config.run_dir / f"zero_shot_{split}.json"
    cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    limit = config.eval.max_utterances
    pending = {}
    for language in config.data.languages:
        directory = split_dir(data_root, language, split)
        key = json.loads(json.dumps(_key(base, directory, config)))
        if cached.get(language, {}).get("key") != key:
            task = score_base.options(**task_options(config, gpu, cpus=1))
            arguments = (str(directory), language, config.eval.batch_size, limit, config.eval.normalizer)
            pending[language] = (key, task.remote(base.path, *arguments, config.train.precision))
    for language, (key, reference) in pending.items():
        cached[language] = {"key": key, "scores": ray.get(reference)}
        _log(language, f"{split} (zero-shot)", cached[language]["scores"])
    if pending:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached, indent=2, ensure_ascii=False), encoding="utf-8")
    return {language: cached[language]["scores"] for language in config.data.languages}


@dataclass(frozen=True)
class HeldOutScores:
    """A selected adapter and its zero-shot base on the test split, scored alike (``scoring`` says how)."""

    adapter: Scores
    zero_shot: Scores
    scoring: Scoring


@ray.remote
def score_with_and_without(
    base_path: str, adapter: str, storage: dict, directory: str, language: str, batch_size: int, limit: int | None,
    normalizer: str, requested: str,
) -> dict:  # fmt: skip
    """The base model, then base + the adapter at ``adapter`` (any location, copied here), on one split: one
    device, one loader, the precision a run training at ``requested`` trains in here."""
    device = inference_device()
    scoring = _scoring(requested, device)
    tokenizer = WhisperTokenizer.from_pretrained(base_path)

    def scores(model: PreTrainedModel) -> dict:
        return {**score_split(model, tokenizer, directory, language, batch_size, limit, normalizer=normalizer),
                **scoring}  # fmt: skip

    zero_shot = scores(load_for_inference(base_path, None, device, scoring["precision"]))
    source = open_location(adapter, StorageOptions(**storage))
    with tempfile.TemporaryDirectory(prefix="adapter-") as local:
        for name in ADAPTER_FILES:
            source.join(name).copy_to(open_location(str(Path(local) / name)))
        model = load_for_inference(base_path, local, device, scoring["precision"])
    return {"adapter": scores(model), "zero_shot": zero_shot, **scoring}


def held_out_scores(
    config: JobConfig, base: ResolvedModel, data_root: Path, adapters: dict[str, Location], gpu: bool
) -> dict[str, HeldOutScores]:
    """Each language's adapter (a peft directory at any location) and the base model on the test split under
    ``data_root`` (prepared, or the frozen encoder's cached output); a language without test rows there is left out
    (with a warning)."""
    split = config.data.test_split
    cache_file = config.run_dir / f"test_scores_{split}.json"
    cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    keys, pending = {}, {}
    for language, adapter in adapters.items():
        directory = split_dir(data_root, language, split)
        if not split_files(directory):
            log.warning("%s: no %s split at %s: no test scores", language, split, directory)
            continue
        files = {name: record.sha256 for name, record in adapter_files(adapter).items()}
        keys[language] = json.loads(json.dumps({**_key(base, directory, config), "adapter": files}))
        if cached.get(language, {}).get("key") != keys[language]:
            task = score_with_and_without.options(**task_options(config, gpu, cpus=1))
            arguments = (str(directory), language, config.eval.batch_size, config.eval.max_utterances)
            storage = config.storage.model_dump(mode="json")
            pending[language] = task.remote(base.path, adapter.uri, storage, *arguments, config.eval.normalizer,
                                            config.train.precision)  # fmt: skip
    for language, reference in pending.items():
        cached[language] = {"key": keys[language], "scores": ray.get(reference)}
        _log(language, f"{split} (adapter)", cached[language]["scores"]["adapter"])
        _log(language, f"{split} (zero-shot)", cached[language]["scores"]["zero_shot"])
    if pending:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached, indent=2, ensure_ascii=False), encoding="utf-8")
    return {language: _test_scores(split, cached[language]["scores"]) for language in keys}


def _test_scores(split: str, result: dict) -> HeldOutScores:
    adapter = result["adapter"]
    scoring = Scoring(split=split, utterances=int(adapter["utterances"]), precision=result["precision"],
                      device=result["device"])  # fmt: skip
    return HeldOutScores(Scores.of(adapter), Scores.of(result["zero_shot"]), scoring)
