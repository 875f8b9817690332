"""Error rates: WER and CER on normalised text, plus raw orthographic WER, all from ``jiwer``'s edit-distance
counts (which sum across shards of a split)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import jiwer

from whisper_lora.languages import Language
from whisper_lora.text import Normalizer, clean_transcript, normalize_for_scoring

PRIMARY = "primary"
"""Key of the language's primary error rate (WER, or CER where the registry says so) in every score mapping and
Ray report: what checkpoints are kept by, trials stopped by and adapters selected by."""


@dataclass(frozen=True)
class ErrorCounts:
    """The edit-distance sums every rate is a ratio of. They add up: counts of disjoint sets of utterances (one per
    evaluating worker) summed are the counts of their union, so sharded scoring gives the rates of one scorer."""

    word_errors: int = 0
    """Substitutions, deletions and insertions of words (text normalised)."""
    words: int = 0
    """Words in the normalised references."""
    char_errors: int = 0
    chars: int = 0
    """Characters in the normalised references, spaces between words included (as ``jiwer.cer`` counts them)."""
    raw_word_errors: int = 0
    """Word errors of the orthographic (unnormalised) text."""
    raw_words: int = 0
    utterances: int = 0
    """Pairs scored: those whose reference has text left after normalisation."""

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def error_counts(
    references: Sequence[str], hypotheses: Sequence[str], language: Language, normalizer: Normalizer = "basic"
) -> ErrorCounts:
    """Edit-distance counts of ``hypotheses`` against ``references`` (see ``error_rates``); zero for no pairs.

    Pairs whose reference normalises to nothing are left out of the normalised counts (they have no words to
    miss); ``utterances`` counts the pairs scored.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [
        (normalize_for_scoring(ref, language, normalizer), normalize_for_scoring(hyp, language, normalizer))
        for ref, hyp in zip(references, hypotheses, strict=True)
    ]
    pairs = [(ref, hyp) for ref, hyp in pairs if ref]
    raw = [(clean_transcript(r), clean_transcript(h)) for r, h in zip(references, hypotheses, strict=True)]
    raw = [(r, h) for r, h in raw if r]
    if not pairs:
        return ErrorCounts()
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    words, chars = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
    raw_words = jiwer.process_words([r for r, _ in raw], [h for _, h in raw])  # a normalised text has a raw one
    return ErrorCounts(
        word_errors=_errors(words),
        words=_reference_length(words),
        char_errors=_errors(chars),
        chars=_reference_length(chars),
        raw_word_errors=_errors(raw_words),
        raw_words=_reference_length(raw_words),
        utterances=len(pairs),
    )


def _errors(output: jiwer.WordOutput | jiwer.CharacterOutput) -> int:
    return output.substitutions + output.deletions + output.insertions


def _reference_length(output: jiwer.WordOutput | jiwer.CharacterOutput) -> int:
    return output.substitutions + output.deletions + output.hits


def rates_of(counts: ErrorCounts, language: Language) -> dict[str, float]:
    """Corpus-level ``wer``, ``cer``, ``raw_wer``, ``utterances`` and ``primary`` for ``language`` from ``counts``."""
    if not counts.utterances:
        raise ValueError("no reference has any text left after normalisation")
    rates = {
        "wer": counts.word_errors / counts.words,
        "cer": counts.char_errors / counts.chars,
        "raw_wer": counts.raw_word_errors / counts.raw_words,
        "utterances": float(counts.utterances),
    }
    rates[PRIMARY] = rates[language.primary_metric]
    return rates


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], language: Language, normalizer: Normalizer = "basic"
) -> dict[str, float]:
    """Corpus-level ``wer``, ``cer`` (text normalised by ``normalizer``: ``text.normalize_for_scoring``), ``raw_wer``
    (orthographic) and ``primary`` for ``language``: ``rates_of(error_counts(...))``, as ``jiwer.wer`` and
    ``jiwer.cer`` give them over the same pairs."""
    return rates_of(error_counts(references, hypotheses, language, normalizer), language)
