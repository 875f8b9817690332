"""The bar every adapter must clear: the base model's score on each language's eval split, measured once.

One Ray task per language (a GPU each where there are GPUs); results are kept in
``<run_dir>/zero_shot_<split>.json`` and reused while the base model and the eval data are unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
import torch
from transformers import WhisperForConditionalGeneration, WhisperTokenizer

from whisper_lora.config import JobConfig
from whisper_lora.data.prepared import iter_batches, split_dir, split_files
from whisper_lora.evaluate import evaluate
from whisper_lora.models.resolve import ResolvedModel

log = logging.getLogger(__name__)


@ray.remote
def score_base(base_path: str, directory: str, language: str, batch_size: int, limit: int | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=dtype).to(device).eval()
    tokenizer = WhisperTokenizer.from_pretrained(base_path)
    return evaluate(model, tokenizer, iter_batches(directory, batch_size, limit), language)


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
        scores = cached[language]["scores"]
        log.info("zero-shot %s on %s: wer %.3f cer %.3f", language, split, scores["wer"], scores["cer"])
    if pending:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached, indent=2, ensure_ascii=False), encoding="utf-8")
    return {language: cached[language]["scores"] for language in config.data.languages}
