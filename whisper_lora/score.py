"""Scores of a base model, or base + adapter, on prepared splits: ``whisper-lora evaluate``, the zero-shot bar
every adapter must clear, and the test-split scores of each selected adapter beside its base model's. All load
through ``models.inference`` and score through ``evaluate.score_split`` with ``eval.normalizer``.

Zero-shot scores (eval and test split, scored before the sweep) and the adapters' test scores run as one Ray
task per language and split (a GPU each where there are GPUs) and are kept in ``<run_dir>/zero_shot.json`` and
``<run_dir>/test_scores_<split>.json``, reused while the base model, the adapter, the data, the normaliser and the
training precision are unchanged. Every score is decoded in the precision the adapters train in on the scoring
device (``train.precision.scoring_precision``), as the trials' dev evaluations are, and says so (``precision``,
``device``): the job's manifest checks that an adapter's test score and its base's agree on it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from transformers import WhisperTokenizer

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


def _cached(cache_file: Path) -> dict:
    return json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}


def _store(cache_file: Path, cached: dict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cached, indent=2, ensure_ascii=False), encoding="utf-8")


def zero_shot_scores(
    config: JobConfig, base: ResolvedModel, data_root: Path, gpu: bool, test_split: bool = False
) -> dict[str, dict[str, dict]]:
    """Scores of the base model per language and split (``{language: {split: scores}}``): the eval split, and with
    ``test_split`` the test split where ``data_root`` has it, one task per split (a whisper-base load is ~2 s, a
    zero-shot split's decoding ~50 s on a CPU core: six tasks pack two cores better than three). Kept in
    ``<run_dir>/zero_shot.json`` per language and split; whatever is not cached is computed."""
    cache_file = config.run_dir / "zero_shot.json"
    cached = _cached(cache_file)
    splits = [config.data.eval_split]
    if test_split and config.data.test_split not in splits:
        splits.append(config.data.test_split)
    limit = config.eval.max_utterances
    wanted, keys, pending = {}, {}, {}
    for language in config.data.languages:
        directories = {split: split_dir(data_root, language, split) for split in splits}
        wanted[language] = [split for split, directory in directories.items()
                            if split == config.data.eval_split or split_files(directory)]  # fmt: skip
        for split in wanted[language]:
            keys[language, split] = json.loads(json.dumps(_key(base, directories[split], config)))
            if cached.get(f"{language}/{split}", {}).get("key") != keys[language, split]:
                task = score_base.options(**task_options(config, gpu, cpus=1))
                arguments = (language, config.eval.batch_size, limit, config.eval.normalizer, config.train.precision)
                pending[language, split] = task.remote(base.path, str(directories[split]), *arguments)
    for (language, split), reference in pending.items():
        scores = ray.get(reference)
        cached[f"{language}/{split}"] = {"key": keys[language, split], "scores": scores}
        _log(language, f"{split} (zero-shot)", scores)
    if pending:
        _store(cache_file, cached)
    return {language: {split: cached[f"{language}/{split}"]["scores"] for split in wanted[language]}
            for language in config.data.languages}  # fmt: skip


@dataclass(frozen=True)
class HeldOutScores:
    """A selected adapter and its zero-shot base on the test split, scored alike (``scoring`` says how)."""

    adapter: Scores
    zero_shot: Scores
    scoring: Scoring


@ray.remote
def score_adapter(
    base_path: str, adapter: str, storage: dict, directory: str, language: str, batch_size: int, limit: int | None,
    normalizer: str, requested: str,
) -> dict:  # fmt: skip
    """Base + the adapter at ``adapter`` (any location, copied here) on one split, in the precision a run training
    at ``requested`` trains in here (as ``score_base`` scores the base model)."""
    device = inference_device()
    scoring = _scoring(requested, device)
    tokenizer = WhisperTokenizer.from_pretrained(base_path)
    source = open_location(adapter, StorageOptions(**storage))
    with tempfile.TemporaryDirectory(prefix="adapter-") as local:
        for name in ADAPTER_FILES:
            source.join(name).copy_to(open_location(str(Path(local) / name)))
        model = load_for_inference(base_path, local, device, scoring["precision"])
    return {**score_split(model, tokenizer, directory, language, batch_size, limit, normalizer=normalizer), **scoring}


def held_out_scores(
    config: JobConfig,
    base: ResolvedModel,
    data_root: Path,
    adapters: dict[str, Location],
    zero_shot: dict[str, dict[str, dict]],
    gpu: bool,
) -> dict[str, HeldOutScores]:
    """Each language's adapter (a peft directory at any location) on the test split under ``data_root`` (prepared,
    or the frozen encoder's cached output), beside its base model's score there from ``zero_shot``
    (``zero_shot_scores(..., test_split=True)``); a language without test rows there is left out (with a warning).
    Kept in ``<run_dir>/test_scores_<split>.json``, reused while adapter, data and scoring are unchanged."""
    split = config.data.test_split
    cache_file = config.run_dir / f"test_scores_{split}.json"
    cached = _cached(cache_file)
    keys, pending = {}, {}
    for language, adapter in adapters.items():
        directory = split_dir(data_root, language, split)
        if split not in zero_shot.get(language, {}):
            log.warning("%s: no %s split at %s: no test scores", language, split, directory)
            continue
        files = {name: record.sha256 for name, record in adapter_files(adapter).items()}
        keys[language] = json.loads(json.dumps({**_key(base, directory, config), "adapter": files}))
        if cached.get(language, {}).get("key") != keys[language]:
            task = score_adapter.options(**task_options(config, gpu, cpus=1))
            arguments = (str(directory), language, config.eval.batch_size, config.eval.max_utterances)
            storage = config.storage.model_dump(mode="json")
            pending[language] = task.remote(base.path, adapter.uri, storage, *arguments, config.eval.normalizer,
                                            config.train.precision)  # fmt: skip
    for language, reference in pending.items():
        cached[language] = {"key": keys[language], "scores": ray.get(reference)}
        _log(language, f"{split} (adapter)", cached[language]["scores"])
    if pending:
        _store(cache_file, cached)
    return {language: _test_scores(split, cached[language]["scores"], zero_shot[language][split])
            for language in keys}  # fmt: skip


def _test_scores(split: str, adapter: dict, zero_shot: dict) -> HeldOutScores:
    scoring = Scoring(split=split, utterances=int(adapter["utterances"]), precision=adapter["precision"],
                      device=adapter["device"])  # fmt: skip
    return HeldOutScores(Scores.of(adapter), Scores.of(zero_shot), scoring)
