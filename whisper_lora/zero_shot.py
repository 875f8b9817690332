"""``whisper-lora zero-shot``: the base model's WER/CER per language on prepared data, forced language token.

This is the bar every adapter must clear; the result is written to ``<run_dir>/zero_shot_<split>.json``.
"""

from __future__ import annotations

import json
import logging

import torch
from transformers import WhisperForConditionalGeneration, WhisperTokenizer

from whisper_lora.config import RunConfig
from whisper_lora.data.prepared import iter_batches, split_dir
from whisper_lora.evaluate import evaluate
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.prepare import prepared_dir

log = logging.getLogger(__name__)


def zero_shot(config: RunConfig, split: str | None = None) -> dict:
    """Scores per language of the unadapted base model on ``split`` (default: the test split)."""
    split = split or config.data.test_split
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(base.path, dtype=torch.float32).eval()
    tokenizer = WhisperTokenizer.from_pretrained(base.path)
    scores = {"model": base.spec, "model_sha256": base.sha256, "split": split, "languages": {}}
    for language in config.data.languages:
        batches = iter_batches(
            split_dir(prepared_dir(config), language, split), config.eval.batch_size, config.eval.max_utterances
        )
        scores["languages"][language] = evaluate(model, tokenizer, batches, language)
        log.info(
            "%s zero-shot on %s: %s",
            language,
            split,
            {k: v for k, v in scores["languages"][language].items() if k in ("wer", "cer", "utterances")},
        )
    out = config.run_dir / f"zero_shot_{split}.json"
    out.write_text(json.dumps(scores, indent=2, ensure_ascii=False), encoding="utf-8")
    return scores
