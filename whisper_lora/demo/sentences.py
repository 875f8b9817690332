"""Real sentences in each language's script, taken from translation catalogs that PyPI packages ship.

Django (BSD-3-Clause) and Sphinx (BSD-2-Clause) translate their user-facing messages into Hindi, Marathi,
Tamil, Telugu, Kannada and Malayalam. A ``msgstr`` qualifies as a sentence when every letter is in the
language's script, it holds no Latin letters, digits or placeholders, and it has 3 to 20 words.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from whisper_lora.languages import Language
from whisper_lora.text import clean_transcript

CATALOG_PACKAGES = {"django": "BSD-3-Clause", "sphinx": "BSD-2-Clause"}
MIN_WORDS, MAX_WORDS = 3, 20
_PLACEHOLDER = re.compile(r"[%{}<>_&\\/|@#=\[\]()\"'`*~^$]")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sentence:
    text: str
    catalog: str
    """Which catalog file it came from, relative to its package (``django/conf/locale/hi/...``)."""
    package: str


def po_messages(path: Path) -> Iterator[str]:
    """Every non-empty ``msgstr`` (plural forms included) of a gettext ``.po`` file."""
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("msgstr"):
            if current:
                yield "".join(current)
            current = _QUOTED.findall(line)
        elif line.startswith('"') and current is not None:
            current.extend(_QUOTED.findall(line))
        else:
            if current:
                yield "".join(current)
            current = None
    if current:
        yield "".join(current)


def is_sentence(text: str, language: Language) -> bool:
    """A clean sentence of ``language``: its script only, no placeholders or markup, 3 to 20 words."""
    if _PLACEHOLDER.search(text) or "\\" in text:
        return False
    for char in text:
        category = unicodedata.category(char)
        if category[0] in "LM" and not language.in_script(char):
            return False
        if category[0] == "N" and not language.in_script(char):
            return False
    return MIN_WORDS <= len(text.split()) <= MAX_WORDS


def _package_root(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def catalog_sentences(language: Language) -> list[Sentence]:
    """Unique sentences of ``language`` from every installed catalog package, in a stable order."""
    seen: set[str] = set()
    found: list[Sentence] = []
    for package in CATALOG_PACKAGES:
        root = _package_root(package)
        if root is None:
            continue
        for path in sorted(root.rglob(f"locale/{language.code}/LC_MESSAGES/*.po")):
            for message in po_messages(path):
                text = clean_transcript(message.replace("\\n", " "))
                if text not in seen and is_sentence(text, language):
                    seen.add(text)
                    found.append(Sentence(text, str(path.relative_to(root.parent)), package))
    return found
