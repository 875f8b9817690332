"""Transcript text: the form we train on and the form we score.

Whisper's ``BasicTextNormalizer`` replaces every Unicode mark with a space, and Indic vowel signs are marks:
"पृष्ठ" would become "प ष ठ". The scoring normaliser here keeps marks, removes punctuation and symbols
(the danda "।" included), lower-cases scripts that have case and collapses whitespace.
"""

from __future__ import annotations

import re
import unicodedata

from whisper_lora.languages import Language

_WHITESPACE = re.compile(r"\s+")


def clean_transcript(text: str) -> str:
    """The training target: NFC, surrounding and repeated whitespace removed, orthography kept."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def normalize_for_scoring(text: str, language: Language) -> str:
    """The form WER/CER compare: NFC, punctuation and symbols dropped, vowel signs kept, case folded."""
    text = unicodedata.normalize("NFC", text)
    kept = (" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    text = "".join(kept)
    if language.has_case:
        text = text.casefold()
    return _WHITESPACE.sub(" ", text).strip()
