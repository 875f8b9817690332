"""Transcript text: the form we train on and the form we score.

Whisper's ``BasicTextNormalizer`` replaces every Unicode mark with a space, and Indic vowel signs are marks:
"पृष्ठ" would become "प ष ठ". The scoring normaliser here keeps marks, removes punctuation and symbols
(the danda "।" included), lower-cases scripts that have case and collapses whitespace.

Zero-width joiners are not word boundaries. ZWNJ (U+200C) and ZWJ (U+200D) only choose how a conjunct is drawn
(Kannada, Telugu and Hindi text carries them, typed or not, in the same word), so they are removed, never turned
into spaces (which would split one word into two errors). Where a joiner *encodes a letter* it becomes that
letter's own code point first: Malayalam consonant + virama + ZWJ is the pre-Unicode-5.1 spelling of a chillu
("അവന്‍" = "അവൻ", "he"; without the joiner "അവന്" is another word, "to him"), and Devanagari RA + virama + ZWJ is
the eyelash RA that Marathi also writes as RRA + virama ("कर्‍हाड" = "कऱ्हाड"; "दर्या" with a reph stays another word).

``indic`` scoring first applies the script normaliser of the ``whisper-normalizer`` package (derived from the
Indic NLP Library: nukta and two-part vowel forms, chillus, joiners, digits spelled out; Marathi gets the
Devanagari one, whose number words are Hindi's), then the steps above, so scores compare with results reported
after that package; ``basic`` is ours alone.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from functools import cache
from typing import Literal

from whisper_lora.languages import Language

Normalizer = Literal["basic", "indic"]
NORMALIZERS: tuple[Normalizer, ...] = ("basic", "indic")
ZWNJ, ZWJ = "\u200c", "\u200d"
_VIRAMA_ZWJ = {
    # Malayalam chillus, atomic since Unicode 5.1: ണ ന ര ല ള ക + ് + ZWJ
    "\u0d23\u0d4d\u200d": "\u0d7a",
    "\u0d28\u0d4d\u200d": "\u0d7b",
    "\u0d30\u0d4d\u200d": "\u0d7c",
    "\u0d32\u0d4d\u200d": "\u0d7d",
    "\u0d33\u0d4d\u200d": "\u0d7e",
    "\u0d15\u0d4d\u200d": "\u0d7f",
    # Devanagari eyelash RA: र + ् + ZWJ → ऱ + ्
    "\u0930\u094d\u200d": "\u0931\u094d",
}
_LETTER_JOINERS = re.compile("|".join(_VIRAMA_ZWJ))
_INVISIBLE = dict.fromkeys(map(ord, f"{ZWNJ}{ZWJ}\u00ad\u2060\ufeff"))
"""Removed outright: the joiners, soft hyphen, word joiner, byte-order mark."""
_WHITESPACE = re.compile(r"\s+")
_DIGIT = re.compile(r"\d")
log = logging.getLogger(__name__)
_INDIC_CLASSES = {
    "hi": "HindiNormalizer",
    "mr": "DevanagariNormalizer",
    "ne": "DevanagariNormalizer",
    "sa": "DevanagariNormalizer",
    "bn": "BengaliNormalizer",
    "as": "BengaliNormalizer",
    "pa": "PunjabiNormalizer",
    "gu": "GujaratiNormalizer",
    "ta": "TamilNormalizer",
    "te": "TeluguNormalizer",
    "kn": "KannadaNormalizer",
    "ml": "MalayalamNormalizer",
}
INDIC_LANGUAGES = frozenset(_INDIC_CLASSES)
"""Languages the ``indic`` normaliser has a script normaliser for."""


def clean_transcript(text: str) -> str:
    """The training target: NFC, surrounding and repeated whitespace removed, orthography kept."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


@cache
def indic_normalizer(code: str) -> Callable[[str], str]:
    """``whisper-normalizer``'s script normaliser for language ``code`` (``ValueError`` when it has none)."""
    if code not in _INDIC_CLASSES:
        raise ValueError(
            f"the indic normaliser has no script normaliser for {code!r} (it has {', '.join(sorted(INDIC_LANGUAGES))})"
        )
    from whisper_normalizer import indic

    return getattr(indic, _INDIC_CLASSES[code])(lang=code)


def _indic(text: str, code: str) -> str:
    """The package's script normaliser, made total: its number spelling takes ASCII digits only (native digits
    "१२" are given as "12") and fails on some forms ("12.5" in Hindi, "1,000" in Kannada): then each word is
    normalised alone and one that still fails is kept as written (logged once per word)."""
    normalize = indic_normalizer(code)
    text = _DIGIT.sub(lambda match: str(unicodedata.decimal(match.group())), text)
    try:
        return normalize(text)
    except (KeyError, ValueError, IndexError):
        return " ".join(_word(normalize, word, code) for word in text.split())


def _word(normalize: Callable[[str], str], word: str, code: str) -> str:
    try:
        return normalize(word)
    except (KeyError, ValueError, IndexError):
        _unspelled(word, code)
        return word


@cache
def _unspelled(word: str, code: str) -> None:
    log.warning("whisper-normalizer (%s) cannot normalise %r: scored as written", code, word)


def normalize_for_scoring(text: str, language: Language, normalizer: Normalizer = "basic") -> str:
    """The form WER/CER compare: NFC, joiners resolved, punctuation and symbols dropped, vowel signs kept, case
    folded; with ``normalizer="indic"``, after the language's ``whisper-normalizer`` script normaliser."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {normalizer!r}: use one of {', '.join(NORMALIZERS)}")
    text = unicodedata.normalize("NFC", text)
    if normalizer == "indic":
        text = unicodedata.normalize("NFC", _indic(text, language.code))
    text = _LETTER_JOINERS.sub(lambda match: _VIRAMA_ZWJ[match.group()], text).translate(_INVISIBLE)
    kept = (" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    text = "".join(kept)
    if language.has_case:
        text = text.casefold()
    return _WHITESPACE.sub(" ", text).strip()
