"""Real sentences in each language's script, taken from translation catalogs that PyPI packages ship.

Web frameworks and dashboards translate their user-facing messages into Hindi, Marathi, Tamil, Telugu, Kannada
and Malayalam, and their wheels carry the gettext catalogs (``<module>/.../locale/<lang>/LC_MESSAGES/*.po``).
``CATALOG_PACKAGES`` lists the permissively licensed ones the demo reads; the ``demo`` extra installs them.
OpenStack's Horizon dashboard is there for Tamil and Kannada: Django and Sphinx give those two 36 and 50
sentences, Horizon (translated by India's OpenStack language teams) about 375 and 390 more.

A ``msgstr`` qualifies as a sentence when every letter is in the language's script, it holds no Latin letters,
digits or placeholders, and it has 3 to 20 words. Agglutinative languages lose most two-word messages this way
("this month", "last name"): they are UI labels, not sentences. Two messages that differ only in punctuation are
one sentence, so a split never hears a sentence that another split already has.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from whisper_lora.languages import Language
from whisper_lora.text import clean_transcript


@dataclass(frozen=True)
class CatalogPackage:
    distribution: str
    """The PyPI distribution (what ``pip install`` takes)."""
    modules: tuple[str, ...]
    """Import packages whose ``locale/`` folders hold the catalogs (found without importing them)."""
    license: str
    """SPDX identifier, written into the corpus README."""


CATALOG_PACKAGES = (
    CatalogPackage("django", ("django",), "BSD-3-Clause"),
    CatalogPackage("sphinx", ("sphinx",), "BSD-2-Clause"),
    CatalogPackage("horizon", ("horizon", "openstack_dashboard"), "Apache-2.0"),
    CatalogPackage("django-contrib-comments", ("django_comments",), "BSD-3-Clause"),
    CatalogPackage("wtforms", ("wtforms",), "BSD-3-Clause"),
)
LICENSES = {package.distribution: package.license for package in CATALOG_PACKAGES}
MIN_WORDS, MAX_WORDS = 3, 20
_PLACEHOLDER = re.compile(r"[%{}<>_&\\/|@#=\[\]()\"'`*~^$]")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_LOCALE_SUFFIX = re.compile(r"[_@-]")


@dataclass(frozen=True)
class Sentence:
    text: str
    catalog: str
    """Which catalog file it came from, relative to its module's parent (``django/conf/locale/hi/...``)."""
    package: str
    """The distribution in ``CATALOG_PACKAGES`` that ships the catalog."""


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


def word_count(text: str) -> int:
    """Whitespace-separated tokens that hold a letter (a lone dash or full stop is no word)."""
    return sum(any(unicodedata.category(char)[0] == "L" for char in token) for token in text.split())


def is_sentence(text: str, language: Language) -> bool:
    """A clean sentence of ``language``: its script only, no placeholders or markup, 3 to 20 words."""
    if _PLACEHOLDER.search(text) or "\\" in text:
        return False
    for char in text:
        if unicodedata.category(char)[0] in "LMN" and not language.in_script(char):
            return False
    return MIN_WORDS <= word_count(text) <= MAX_WORDS


def spoken_form(text: str) -> str:
    """What a listener hears: the words without punctuation, so "X." and "X" are one sentence."""
    return " ".join("".join(char for char in text if unicodedata.category(char)[0] != "P").split())


def locale_language(locale: str) -> str:
    """``hi``, ``hi_IN``, ``ta-IN`` and ``sr@latin`` name the languages ``hi``, ``hi``, ``ta`` and ``sr``."""
    return _LOCALE_SUFFIX.split(locale, maxsplit=1)[0].lower()


def _module_root(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


@functools.cache
def _catalogs(root: Path) -> tuple[tuple[str, Path], ...]:
    """(language, path) of every ``.po`` catalog under ``root``, in path order; walked once per module."""
    found = []
    for path in sorted(root.rglob("LC_MESSAGES/*.po")):
        locale_dir = path.parent.parent
        if locale_dir.parent.name == "locale":
            found.append((locale_language(locale_dir.name), path))
    return tuple(found)


def installed_packages() -> list[CatalogPackage]:
    """The catalog packages importable here (all of their modules found)."""
    return [package for package in CATALOG_PACKAGES if all(map(_module_root, package.modules))]


def catalog_sentences(language: Language) -> list[Sentence]:
    """Unique sentences of ``language`` from every installed catalog package, in a stable order."""
    seen: set[str] = set()
    found: list[Sentence] = []
    for package in installed_packages():
        for module in package.modules:
            root = _module_root(module)
            for code, path in _catalogs(root):
                if code != language.code:
                    continue
                for message in po_messages(path):
                    text = clean_transcript(message.replace("\\n", " "))
                    if spoken_form(text) not in seen and is_sentence(text, language):
                        seen.add(spoken_form(text))
                        found.append(Sentence(text, str(path.relative_to(root.parent)), package.distribution))
    return found
