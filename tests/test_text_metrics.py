import pytest
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from whisper_lora.languages import get_language
from whisper_lora.metrics import error_rates
from whisper_lora.text import normalize_for_scoring

HINDI = get_language("hi")
REFERENCE = "यह पृष्ठ संख्या पूर्णांक नहीं है।"
VOWEL_SIGN_ERROR = "यह पष्ठ संख्या पूर्णांक नहीं है"  # पृष्ठ without its vowel sign ृ


def test_normaliser_keeps_vowel_signs_and_drops_danda():
    assert normalize_for_scoring(REFERENCE, HINDI) == "यह पृष्ठ संख्या पूर्णांक नहीं है"


def test_vowel_sign_difference_is_an_error():
    rates = error_rates([REFERENCE], [VOWEL_SIGN_ERROR], HINDI)
    assert rates["wer"] == pytest.approx(1 / 6)
    assert rates["cer"] > 0


def test_whispers_basic_normaliser_breaks_words_where_ours_does_not():
    assert len(BasicTextNormalizer()(REFERENCE).split()) == 13
    assert len(normalize_for_scoring(REFERENCE, HINDI).split()) == 6


def test_punctuation_and_case_do_not_count_but_raw_wer_sees_them():
    english = get_language("en")
    rates = error_rates(["Hello, World!"], ["hello world"], english)
    assert rates["wer"] == 0 and rates["cer"] == 0
    assert rates["raw_wer"] == 1.0


def test_primary_metric_follows_the_registry():
    assert error_rates(["அது ஒரு"], ["அது ஒரு"], get_language("ta"))["primary"] == 0
    assert get_language("ta").primary_metric == "cer" and HINDI.primary_metric == "wer"
    assert {get_language(c).primary_metric for c in ("te", "kn", "ml")} == {"cer"}


def test_empty_hypothesis_is_all_deletions_and_empty_references_are_rejected():
    assert error_rates(["एक दो तीन"], [""], HINDI)["wer"] == 1.0
    with pytest.raises(ValueError, match="no reference"):
        error_rates(["।।"], ["x"], HINDI)
