import csv
import random
import shutil

import pytest

from whisper_lora.demo import sentences as catalog
from whisper_lora.demo.corpus import DEFAULT_PER_SPLIT, VOICE_VARIANTS, allocate, build_corpus, parse_per_split
from whisper_lora.demo.sentences import (
    CATALOG_PACKAGES,
    CatalogPackage,
    Sentence,
    catalog_sentences,
    installed_packages,
    is_sentence,
    locale_language,
    po_messages,
    spoken_form,
)
from whisper_lora.languages import get_language

LANGUAGES = ("mr", "hi", "ta", "te", "kn", "ml")
DEFAULT_AT_LEAST = {
    "mr": {"train": 400, "dev": 20, "test": 20},
    "hi": {"train": 400, "dev": 20, "test": 20},
    "ta": {"train": 380, "dev": 20, "test": 20},
    "kn": {"train": 390, "dev": 20, "test": 20},
    "ml": {"train": 100, "dev": 17, "test": 17},
    "te": {"train": 50, "dev": 8, "test": 8},
}
"""Clips per split that ``DEFAULT_PER_SPLIT`` gets from the demo extra's catalogs: Tamil and Kannada (~430
sentences) train on what dev and test leave, Malayalam (~140) and Telugu (~67) keep an eighth each for dev and
test; no light, permissively licensed package found adds many Telugu sentences."""


@pytest.fixture(scope="module")
def demo_catalogs():
    missing = [package.distribution for package in CATALOG_PACKAGES if package not in installed_packages()]
    if missing:
        pytest.skip(f"catalog packages not installed: {', '.join(missing)} (pip install -e '.[demo]')")
    return {code: catalog_sentences(get_language(code)) for code in LANGUAGES}


def test_po_parser_joins_continuation_lines_and_plurals(tmp_path):
    po = tmp_path / "x.po"
    po.write_text(
        'msgid ""\nmsgstr ""\n"Header: 1\\n"\n\nmsgid "a"\nmsgstr "एक दो"\n" तीन चार"\n\n'
        'msgid "b"\nmsgid_plural "bs"\nmsgstr[0] "पहला रूप यहाँ"\nmsgstr[1] "दूसरा रूप यहाँ"\n'
    )
    assert list(po_messages(po)) == ["Header: 1\\n", "एक दो तीन चार", "पहला रूप यहाँ", "दूसरा रूप यहाँ"]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("यह पृष्ठ संख्या पूर्णांक नहीं है", True),
        ("दो शब्द", False),
        ("कोसिसे - ओकोली", False),
        ("%(name)s का मान गलत है", False),
        ("यह Django का पृष्ठ", False),
        ("यह पृष्ठ 404 नहीं", False),
        ("இது ஒரு தமிழ் வாக்கியம்", False),
    ],
)
def test_sentence_filter_keeps_only_clean_script_sentences(text, ok):
    assert is_sentence(text, get_language("hi")) is ok


def test_locale_folders_name_their_language():
    assert [locale_language(name) for name in ("ta", "ta_IN", "te-IN", "sr@latin", "mai")] == [
        "ta",
        "ta",
        "te",
        "sr",
        "mai",
    ]
    assert spoken_form("பயனரை உருவாக்க முடியவில்லை.") == spoken_form("பயனரை  உருவாக்க முடியவில்லை")


def test_catalogs_are_found_under_any_locale_spelling_and_deduplicated_by_sound(tmp_path, monkeypatch):
    def write(relative: str, *messages: str) -> None:
        path = tmp_path / "fakepkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f'msgid "m{i}"\nmsgstr "{text}"\n\n' for i, text in enumerate(messages)))

    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    write("locale/ta_IN/LC_MESSAGES/django.po", "பயனரை உருவாக்க முடியவில்லை.", "இந்த மாதம்", "காப்பு மீட்க முடியவில்லை")
    write("dashboard/locale/ta/LC_MESSAGES/djangojs.po", "பயனரை உருவாக்க முடியவில்லை", "குழுவை உருவாக்க முடியவில்லை")
    write("locale/hi/LC_MESSAGES/django.po", "यह पृष्ठ संख्या पूर्णांक नहीं है")
    write("docs/ta/LC_MESSAGES/notes.po", "இது ஒரு தமிழ் வாக்கியம் அல்ல")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(catalog, "CATALOG_PACKAGES", (CatalogPackage("fake-pkg", ("fakepkg",), "MIT"),))

    found = catalog_sentences(get_language("ta"))
    assert [(s.text, s.catalog, s.package) for s in found] == [
        ("பயனரை உருவாக்க முடியவில்லை", "fakepkg/dashboard/locale/ta/LC_MESSAGES/djangojs.po", "fake-pkg"),
        ("குழுவை உருவாக்க முடியவில்லை", "fakepkg/dashboard/locale/ta/LC_MESSAGES/djangojs.po", "fake-pkg"),
        ("காப்பு மீட்க முடியவில்லை", "fakepkg/locale/ta_IN/LC_MESSAGES/django.po", "fake-pkg"),
    ]


def test_every_catalog_package_is_installed_and_contributes(demo_catalogs):
    used = {sentence.package for sentences in demo_catalogs.values() for sentence in sentences}
    assert used == {package.distribution for package in CATALOG_PACKAGES}
    for code, sentences in demo_catalogs.items():
        assert all(is_sentence(s.text, get_language(code)) for s in sentences), code
        assert len({spoken_form(s.text) for s in sentences}) == len(sentences), code


def test_default_corpus_has_over_100_training_sentences_per_language(demo_catalogs):
    wanted = parse_per_split(DEFAULT_PER_SPLIT)
    for code, sentences in demo_catalogs.items():
        allocated = allocate(sentences, wanted, random.Random(0))
        counts = {split: len(chosen) for split, chosen in allocated.items()}
        assert all(counts[split] >= DEFAULT_AT_LEAST[code][split] for split in wanted), (code, counts)
        heard = [{spoken_form(s.text) for s in chosen} for chosen in allocated.values()]
        assert sum(map(len, heard)) == len(set().union(*heard)), f"{code}: a sentence is in two splits"


def test_allocation_is_disjoint_and_scales_down():
    sentences = [Sentence(f"वाक्य संख्या {i} यहाँ", "x.po", "x") for i in range(46)]
    allocated = allocate(sentences, parse_per_split("train=60,dev=16,test=16"), random.Random(0))
    texts = [{s.text for s in chosen} for chosen in allocated.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert [len(chosen) for chosen in texts] == [36, 5, 5]  # dev and test first, an eighth each; train the rest
    plenty = allocate([Sentence(f"वाक्य {i} यहाँ है", "x.po", "x") for i in range(500)],
                      parse_per_split("train=400,dev=20,test=20"), random.Random(0))  # fmt: skip
    assert [len(chosen) for chosen in plenty.values()] == [400, 20, 20]


@pytest.mark.slow
def test_corpus_is_a_common_voice_release_with_disjoint_text_and_voices(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    summary = build_corpus(tmp_path, ["hi", "ta"], "train=4,dev=2,test=2")
    assert summary["clips"]["hi"] == {"train": 4, "dev": 2, "test": 2}
    for code in ("hi", "ta"):
        splits = {}
        for split in ("train", "dev", "test"):
            with open(tmp_path / code / f"{split}.tsv", encoding="utf-8") as handle:
                splits[split] = list(csv.DictReader(handle, delimiter="\t"))
            assert all((tmp_path / code / "clips" / row["path"]).stat().st_size > 1000 for row in splits[split])
            assert {row["client_id"].split("+")[1] for row in splits[split]} <= set(VOICE_VARIANTS[split])
        texts = {split: {row["sentence"] for row in rows} for split, rows in splits.items()}
        assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["dev"])
    with open(tmp_path / "sources.tsv", encoding="utf-8") as handle:
        used = {row["package"] for row in csv.DictReader(handle, delimiter="\t")}
    readme = (tmp_path / "README.md").read_text()
    assert all(f"- {package} (" in readme for package in used)
    assert sum(line.startswith("- ") for line in readme.splitlines()) == len(used)
