"""Greedy transcription with the language and task forced, scored with WER/CER.

Forcing ``<|lang|><|transcribe|>`` matters: a model adapted to Marathi otherwise often detects Hindi (or Urdu)
and answers in the wrong script. Generation is capped at twice the longest reference's token count (plus a
margin): a model stuck in a repetition loop is already wrong, and the cap keeps evaluation time bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from transformers import PreTrainedModel, WhisperTokenizer
from transformers.modeling_outputs import BaseModelOutput

from whisper_lora.data.collate import encoder_input
from whisper_lora.data.prepared import iter_batches
from whisper_lora.languages import get_language
from whisper_lora.metrics import error_rates
from whisper_lora.text import Normalizer

GENERATION_MARGIN = 8
PROMPT_TOKENS = 4
"""<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>: counted in ``max_length``."""


@torch.no_grad()
def greedy_transcripts(
    model: PreTrainedModel,
    tokenizer: WhisperTokenizer,
    inputs: dict[str, torch.Tensor],
    language: str,
    max_new_tokens: int = 128,
) -> list[str]:
    """Greedy transcripts of a batch in ``language``; ``inputs`` as ``collate.encoder_input`` gives them
    (log-mel features, or the cached output of a frozen encoder)."""
    parameter = next(model.parameters())
    device = parameter.device
    dtype = parameter.dtype if parameter.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if "encoder_hidden_states" in inputs:
        hidden = inputs["encoder_hidden_states"].to(device, dtype)
        encoder = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
    else:
        encoder = {"input_features": inputs["input_features"].to(device, dtype)}
    tokens = model.generate(
        **encoder,
        language=language,
        task="transcribe",
        num_beams=1,
        do_sample=False,
        max_length=min(model.config.max_target_positions, max_new_tokens + PROMPT_TOKENS),
    )
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def evaluate(
    model: PreTrainedModel,
    tokenizer: WhisperTokenizer,
    batches: Iterable[dict[str, np.ndarray]],
    language: str,
    keep_samples: int = 5,
    normalizer: Normalizer = "basic",
) -> dict:
    """Error rates of ``model`` over prepared or encoded batches (``label_ids``, ``sentence`` and the encoder input).

    Returns ``wer``, ``cer``, ``raw_wer``, ``primary``, ``utterances``, ``normalizer`` (the text normaliser the
    rates were computed after), ``seconds`` and a few ``samples``.
    """
    was_training = model.training
    model.eval()
    references: list[str] = []
    hypotheses: list[str] = []
    started = time.perf_counter()
    for batch in batches:
        longest = max(len(ids) for ids in batch["label_ids"])
        limit = 2 * longest + GENERATION_MARGIN
        hypotheses += greedy_transcripts(model, tokenizer, encoder_input(batch), language, limit)
        references += [str(sentence) for sentence in batch["sentence"]]
    model.train(was_training)
    rates: dict = error_rates(references, hypotheses, get_language(language), normalizer)
    rates["normalizer"] = normalizer
    rates["seconds"] = round(time.perf_counter() - started, 2)
    rates["samples"] = [
        {"reference": r, "hypothesis": h}
        for r, h in zip(references[:keep_samples], hypotheses[:keep_samples], strict=True)
    ]
    return rates


def score_split(
    model: PreTrainedModel,
    tokenizer: WhisperTokenizer,
    directory: str,
    language: str,
    batch_size: int,
    limit: int | None = None,
    keep_samples: int = 5,
    normalizer: Normalizer = "basic",
) -> dict:
    """``evaluate`` over a prepared (or encoded) split directory, in ``id`` order, at most ``limit`` utterances:
    the one scorer of training evaluation, zero-shot and test scores and ``whisper-lora evaluate``."""
    batches = iter_batches(directory, batch_size, limit)
    return evaluate(model, tokenizer, batches, language, keep_samples, normalizer)
