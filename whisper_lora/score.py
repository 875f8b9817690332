"""Scores of a base model, or base + adapter, on prepared splits: ``whisper-lora evaluate`` and the zero-shot
bar every adapter must clear. Both load through ``models.inference`` and score through ``evaluate.score_split``.

Zero-shot scores run as one Ray task per language (a GPU each where there are GPUs) and are kept in
``<run_dir>/zero_shot_<split>.json``, reused while the base model and the eval data are unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
from transformers import WhisperTokenizer

from whisper_lora.config import JobConfig
from whisper_lora.data.prepared import prepared_dir, split_dir, split_files
from whisper_lora.evaluate import score_split
from whisper_lora.models.inference import load_for_inference
from whisper_lora.models.resolve import ResolvedModel, resolve_base_model

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


def score(config: JobConfig, split: str | None = None, adapter: str | None = None) -> dict:
    """Scores per language on ``split`` (default: the test split); with ``adapter``, only its language.
    Written to ``<run_dir>/scores_<split>_<zero-shot or adapter>.json``."""
    split = split or config.data.test_split
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    model = load_for_inference(base.path, adapter)
    tokenizer = WhisperTokenizer.from_pretrained(base.path)
    languages = config.data.languages if adapter is None else [config.train_language]
    scores = {"model": base.spec, "model_sha256": base.sha256, "adapter": adapter, "split": split, "languages": {}}
    for language in languages:
        directory = str(split_dir(prepared_dir(config), language, split))
        result = score_split(model, tokenizer, directory, language, config.eval.batch_size, config.eval.max_utterances)
        scores["languages"][language] = result
        _log(language, split, result)
    what = "zero-shot" if adapter is None else Path(adapter).parent.name
    out = config.run_dir / f"scores_{split}_{what}.json"
    out.write_text(json.dumps(scores, indent=2, ensure_ascii=False), encoding="utf-8")
    return scores


@ray.remote
def score_base(base_path: str, directory: str, language: str, batch_size: int, limit: int | None) -> dict:
    model = load_for_inference(base_path)
    return score_split(model, WhisperTokenizer.from_pretrained(base_path), directory, language, batch_size, limit)


def _key(base: ResolvedModel, directory: Path, limit: int | None) -> dict:
    return {"model_sha256": base.sha256, "files": split_files(directory), "max_utterances": limit}


def zero_shot_scores(config: JobConfig, base: ResolvedModel, data_root: Path, gpu: bool) -> dict[str, dict]:
    """Scores of the base model per language on the eval split (computed for whatever is not cached)."""
    split = config.data.eval_split
    cache_file = config.run_dir / f"zero_shot_{split}.json"
    cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    limit = config.eval.max_utterances
    pending = {}
    for language in config.data.languages:
        directory = split_dir(data_root, language, split)
        key = json.loads(json.dumps(_key(base, directory, limit)))
        if cached.get(language, {}).get("key") != key:
            task = score_base.options(num_gpus=1 if gpu else 0, num_cpus=1)
            pending[language] = (key, task.remote(base.path, str(directory), language, config.eval.batch_size, limit))
    for language, (key, reference) in pending.items():
        cached[language] = {"key": key, "scores": ray.get(reference)}
        _log(language, f"{split} (zero-shot)", cached[language]["scores"])
    if pending:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached, indent=2, ensure_ascii=False), encoding="utf-8")
    return {language: cached[language]["scores"] for language in config.data.languages}
