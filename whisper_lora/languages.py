"""The language registry: script, primary metric and espeak-ng voice of each language we tune for.

Any language Whisper knows can be trained; the six registered here carry the facts the product relies on:
which Unicode script their text is written in (to filter sentences and to know the script has no case),
and which error rate ranks their adapters. Dravidian languages are agglutinative: one long word carries what
English spreads over several, so a single wrong suffix makes the whole word wrong and WER overstates the
damage. CER ranks them; WER is reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

Metric = Literal["wer", "cer"]
Naming = Literal["code", "name", "fleurs"]
"""How a dataset spells a language in its paths and columns: Whisper's code (``mr``: Common Voice), Whisper's
English name (``marathi``: IndicVoices, Kathbath), or FLEURS' config name (``mr_in``)."""

SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "Devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "Tamil": ((0x0B80, 0x0BFF),),
    "Telugu": ((0x0C00, 0x0C7F),),
    "Kannada": ((0x0C80, 0x0CFF),),
    "Malayalam": ((0x0D00, 0x0D7F),),
}


@dataclass(frozen=True)
class Language:
    """What the product knows about one language."""

    code: str
    """Whisper's language code, e.g. ``"mr"``; the decoder prompt uses ``<|code|>``."""
    name: str
    """Whisper's English name, e.g. ``"marathi"``."""
    script: str | None
    """Unicode script of its text (a key of ``SCRIPT_RANGES``), ``None`` when not registered."""
    primary_metric: Metric
    """The error rate that selects adapters: ``"wer"``, or ``"cer"`` where WER is not meaningful."""
    espeak_voice: str | None
    """espeak-ng voice that speaks it (the demo corpus), ``None`` when not registered."""
    fleurs: str | None = None
    """FLEURS' config (directory) name, e.g. ``"mr_in"``; ``None`` when not registered."""

    @property
    def has_case(self) -> bool:
        """Indic scripts have no letter case; lower-casing is a no-op there but matters for Latin scripts."""
        return self.script not in SCRIPT_RANGES

    def in_script(self, char: str) -> bool:
        """True when ``char`` belongs to this language's script block(s)."""
        if self.script is None:
            raise ValueError(f"language {self.code!r} has no registered script")
        point = ord(char)
        return any(low <= point <= high for low, high in SCRIPT_RANGES[self.script])


REGISTERED: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("mr", "marathi", "Devanagari", "wer", "mr", "mr_in"),
        Language("hi", "hindi", "Devanagari", "wer", "hi", "hi_in"),
        Language("ta", "tamil", "Tamil", "cer", "ta", "ta_in"),
        Language("te", "telugu", "Telugu", "cer", "te", "te_in"),
        Language("kn", "kannada", "Kannada", "cer", "kn", "kn_in"),
        Language("ml", "malayalam", "Malayalam", "cer", "ml", "ml_in"),
    )
}


@cache
def whisper_languages() -> dict[str, str]:
    """Whisper's language codes → English names, as transformers' Whisper tokenizer lists them. Imported on first
    use: the registered languages need no transformers, and every Ray process that reads a config imports this."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES


def get_language(code: str) -> Language:
    """The registered language for ``code``, or a plain WER-ranked entry for any other Whisper language."""
    if code in REGISTERED:
        return REGISTERED[code]
    if code in whisper_languages():
        return Language(code, whisper_languages()[code], None, "wer", None)
    raise ValueError(f"unknown language code {code!r}: use one of Whisper's codes, e.g. {', '.join(REGISTERED)}")


def spelling(code: str, naming: Naming, overrides: dict[str, str] | None = None) -> str:
    """How a dataset spells ``code`` in its paths (what ``{lang}`` becomes): ``overrides`` first, then ``naming``."""
    if overrides and code in overrides:
        return overrides[code]
    language = get_language(code)
    if naming == "code":
        return code
    if naming == "name":
        return language.name
    if language.fleurs is None:
        raise ValueError(f"no FLEURS name registered for {code!r}: give it in data.source.language_map, e.g. "
                         f"{{{code}: {code}_xx}}")  # fmt: skip
    return language.fleurs


def language_lookup(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Every spelling a dataset may use for a language, case-folded → Whisper code: the codes and English names
    of all Whisper languages, the registered FLEURS names, and ``overrides`` (code → spelling) on top. A FLEURS
    row says ``"Hindi"`` where its directory says ``hi_in``: both resolve to ``hi``, whatever the path naming."""
    lookup = {name.casefold(): code for code, name in whisper_languages().items()}
    lookup |= {code.casefold(): code for code in whisper_languages()}
    lookup |= {lang.fleurs.casefold(): code for code, lang in REGISTERED.items() if lang.fleurs}
    lookup |= {spelled.casefold(): code for code, spelled in (overrides or {}).items()}
    return lookup
