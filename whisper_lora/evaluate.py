"""Greedy transcription with the language and task forced, scored with WER/CER, on one process or sharded across
the workers of a process group.

Forcing ``<|lang|><|transcribe|>`` matters: a model adapted to Marathi otherwise often detects Hindi (or Urdu)
and answers in the wrong script. Each utterance's generation is capped at twice its reference's token count (plus a
margin): a model stuck in a repetition loop is already wrong, and the cap keeps evaluation time bounded. The cap is
the utterance's own, not its batch's, so a transcript does not depend on which rows share its batch: sharded
scoring gives the transcripts of one scorer (up to floating-point differences between batch shapes).

Sharded, every worker decodes a contiguous shard of the split and the edit-distance counts (``metrics.ErrorCounts``)
are summed with an ``all_reduce`` over the process group Ray Train set up (gloo on CPU, nccl on GPU): every worker
gets the rates of the whole split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList, WhisperTokenizer
from transformers.modeling_outputs import BaseModelOutput

from whisper_lora.data.collate import encoder_input
from whisper_lora.data.prepared import iter_batches
from whisper_lora.languages import get_language
from whisper_lora.metrics import ErrorCounts, error_counts, rates_of
from whisper_lora.text import Normalizer

GENERATION_MARGIN = 8
PROMPT_TOKENS = 4
"""<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>: they take decoder positions too."""


class RowCaps(StoppingCriteria):
    """Each row is finished at its own cap of new tokens. ``generate`` keeps decoding a batch until every row is
    finished, so without this one row stuck in a repetition loop holds the whole batch to the largest cap (on the
    demo's zero-shot Marathi dev split: 2176 row-steps in id-order batches of 8, 1112 with it)."""

    def __init__(self, caps: Sequence[int], prompt_tokens: int) -> None:
        self.limits = torch.tensor([cap + prompt_tokens for cap in caps])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] >= self.limits).to(input_ids.device)


@torch.no_grad()
def greedy_transcripts(
    model: PreTrainedModel,
    tokenizer: WhisperTokenizer,
    inputs: dict[str, torch.Tensor],
    language: str,
    max_new_tokens: int | Sequence[int] = 128,
) -> list[str]:
    """Greedy transcripts of a batch in ``language``; ``inputs`` as ``collate.encoder_input`` gives them
    (log-mel features, or the cached output of a frozen encoder). ``max_new_tokens``: one cap for the batch or one
    per row (greedy decoding is causal, so a row cut at its cap is what decoding it alone with that cap gives)."""
    parameter = next(model.parameters())
    device = parameter.device
    dtype = parameter.dtype if parameter.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if "encoder_hidden_states" in inputs:
        hidden = inputs["encoder_hidden_states"].to(device, dtype)
        rows = len(hidden)
        encoder = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
    else:
        features = inputs["input_features"].to(device, dtype)
        rows = len(features)
        encoder = {"input_features": features}
    caps = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    tokens = model.generate(
        **encoder,
        language=language,
        task="transcribe",
        num_beams=1,
        do_sample=False,
        max_length=min(model.config.max_target_positions - PROMPT_TOKENS, max(caps)),
        stopping_criteria=StoppingCriteriaList([RowCaps(caps, PROMPT_TOKENS)]),
    )  # new tokens only: Whisper's generate adds the prompt to max_length and strips it from the output
    cut = [row[:cap] for row, cap in zip(tokens.tolist(), caps, strict=True)]
    return [text.strip() for text in tokenizer.batch_decode(cut, skip_special_tokens=True)]


def evaluate(
    model: PreTrainedModel,
    tokenizer: WhisperTokenizer,
    batches: Iterable[dict[str, np.ndarray]],
    language: str,
    keep_samples: int = 5,
    normalizer: Normalizer = "basic",
    summed: bool = False,
) -> dict:
    """Error rates of ``model`` over prepared or encoded batches (``label_ids``, ``sentence`` and the encoder input);
    ``summed``: these batches are this worker's shard, and the counts of every worker of the default process group
    are summed (every worker must call this, and gets the same rates).

    Returns ``wer``, ``cer``, ``raw_wer``, ``primary``, ``utterances``, ``normalizer`` (the text normaliser the
    rates were computed after), ``seconds`` (the slowest worker's) and a few ``samples`` (this worker's).
    """
    was_training = model.training
    model.eval()
    references: list[str] = []
    hypotheses: list[str] = []
    started = time.perf_counter()
    for batch in batches:
        caps = [2 * len(ids) + GENERATION_MARGIN for ids in batch["label_ids"]]
        hypotheses += greedy_transcripts(model, tokenizer, encoder_input(batch), language, caps)
        references += [str(sentence) for sentence in batch["sentence"]]
    model.train(was_training)
    counts = error_counts(references, hypotheses, get_language(language), normalizer)
    seconds = time.perf_counter() - started
    if summed:
        counts, seconds = sum_over_workers(counts, seconds)
    rates: dict = rates_of(counts, get_language(language))
    rates["normalizer"] = normalizer
    rates["seconds"] = round(seconds, 2)
    rates["samples"] = [
        {"reference": r, "hypothesis": h}
        for r, h in zip(references[:keep_samples], hypotheses[:keep_samples], strict=True)
    ]
    return rates


def sum_over_workers(counts: ErrorCounts, seconds: float) -> tuple[ErrorCounts, float]:
    """``counts`` summed over the workers of the default process group, and the longest ``seconds``: two
    ``all_reduce`` calls, on the GPU under nccl (it reduces CUDA tensors only), on the CPU under gloo."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor(dataclasses.astuple(counts), dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    longest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return ErrorCounts(*(int(value) for value in values.tolist())), float(longest.item())


def score_split(
    model: PreTrainedModel,
    tokenizer: WhisperTokenizer,
    directory: str,
    language: str,
    batch_size: int,
    limit: int | None = None,
    keep_samples: int = 5,
    normalizer: Normalizer = "basic",
    rank: int = 0,
    world: int = 1,
) -> dict:
    """``evaluate`` over a prepared (or encoded) split directory, in ``id`` order, at most ``limit`` utterances:
    the one scorer of training evaluation, zero-shot and test scores and ``whisper-lora evaluate``. With ``world``
    > 1, worker ``rank`` of the default process group decodes its contiguous shard of those utterances and every
    worker gets the scores of all of them (each must call this)."""
    batches = iter_batches(directory, batch_size, limit, rank, world)
    return evaluate(model, tokenizer, batches, language, keep_samples, normalizer, summed=world > 1)
