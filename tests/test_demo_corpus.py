import csv
import shutil

import pytest

from whisper_lora.demo.corpus import VOICE_VARIANTS, allocate, build_corpus, parse_per_split
from whisper_lora.demo.sentences import catalog_sentences, is_sentence, po_messages
from whisper_lora.languages import get_language


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
        ("%(name)s का मान गलत है", False),
        ("यह Django का पृष्ठ", False),
        ("यह पृष्ठ 404 नहीं", False),
        ("இது ஒரு தமிழ் வாக்கியம்", False),
    ],
)
def test_sentence_filter_keeps_only_clean_script_sentences(text, ok):
    assert is_sentence(text, get_language("hi")) is ok


def test_catalogs_give_sentences_for_every_registered_language():
    for code in ("mr", "hi", "ta", "te", "kn", "ml"):
        sentences = catalog_sentences(get_language(code))
        assert len(sentences) >= 30, code
        assert all(is_sentence(s.text, get_language(code)) for s in sentences)


def test_allocation_is_disjoint_and_scales_down():
    import random

    sentences = catalog_sentences(get_language("ta"))
    allocated = allocate(sentences, parse_per_split("train=60,dev=16,test=16"), random.Random(0))
    texts = [{s.text for s in chosen} for chosen in allocated.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(map(len, texts)) <= len(sentences)
    assert len(allocated["train"]) > len(allocated["test"]) > 0


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
    assert "BSD-3-Clause" in (tmp_path / "README.md").read_text()
