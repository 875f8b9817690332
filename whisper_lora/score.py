"""``whisper-lora evaluate``: WER/CER per language on a prepared split, of the base model (zero-shot, the bar
every adapter must clear) or of base + a peft adapter. Written to ``<run_dir>/scores_<split>_<what>.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperTokenizer

from whisper_lora.config import JobConfig
from whisper_lora.data.prepared import iter_batches, prepared_dir, split_dir
from whisper_lora.evaluate import evaluate
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.train.model import load_adapter

log = logging.getLogger(__name__)


def score(config: JobConfig, split: str | None = None, adapter: str | None = None) -> dict:
    """Scores per language on ``split`` (default: the test split); with ``adapter``, only its language."""
    split = split or config.data.test_split
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    if adapter is None:
        model = WhisperForConditionalGeneration.from_pretrained(base.path, dtype=torch.float32).eval()
        languages = config.data.languages
    else:
        model = load_adapter(base.path, adapter)
        languages = [config.train_language]
    tokenizer = WhisperTokenizer.from_pretrained(base.path)
    scores = {"model": base.spec, "model_sha256": base.sha256, "adapter": adapter, "split": split, "languages": {}}
    for language in languages:
        batches = iter_batches(
            split_dir(prepared_dir(config), language, split), config.eval.batch_size, config.eval.max_utterances
        )
        result = evaluate(model, tokenizer, batches, language)
        scores["languages"][language] = result
        log.info(
            "%s on %s: wer %.3f cer %.3f (%d utterances)",
            language,
            split,
            result["wer"],
            result["cer"],
            result["utterances"],
        )
    what = "zero-shot" if adapter is None else Path(adapter).parent.name
    out = config.run_dir / f"scores_{split}_{what}.json"
    out.write_text(json.dumps(scores, indent=2, ensure_ascii=False), encoding="utf-8")
    return scores
