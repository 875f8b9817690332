"""Error rates: WER and CER on normalised text, plus raw orthographic WER, all from ``jiwer``."""

from __future__ import annotations

from collections.abc import Sequence

import jiwer

from whisper_lora.languages import Language
from whisper_lora.text import Normalizer, clean_transcript, normalize_for_scoring

PRIMARY = "primary"
"""Key of the language's primary error rate (WER, or CER where the registry says so) in every score mapping and
Ray report: what checkpoints are kept by, trials stopped by and adapters selected by."""


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], language: Language, normalizer: Normalizer = "basic"
) -> dict[str, float]:
    """Corpus-level ``wer``, ``cer`` (text normalised by ``normalizer``: ``text.normalize_for_scoring``), ``raw_wer``
    (orthographic) and ``primary`` for ``language``.

    Pairs whose reference normalises to nothing are left out of the normalised rates (they have no words to
    miss); ``utterances`` counts the pairs scored.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [
        (normalize_for_scoring(ref, language, normalizer), normalize_for_scoring(hyp, language, normalizer))
        for ref, hyp in zip(references, hypotheses, strict=True)
    ]
    pairs = [(ref, hyp) for ref, hyp in pairs if ref]
    if not pairs:
        raise ValueError("no reference has any text left after normalisation")
    refs, hyps = zip(*pairs, strict=True)
    raw = [(clean_transcript(r), clean_transcript(h)) for r, h in zip(references, hypotheses, strict=True)]
    raw = [(r, h) for r, h in raw if r]
    rates = {
        "wer": jiwer.wer(list(refs), list(hyps)),
        "cer": jiwer.cer(list(refs), list(hyps)),
        "raw_wer": jiwer.wer([r for r, _ in raw], [h for _, h in raw]),
        "utterances": float(len(pairs)),
    }
    rates[PRIMARY] = rates[language.primary_metric]
    return rates
