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


# --- zero-width joiners: part of a word, never a boundary ---------------------------------------------------------

ZWNJ, ZWJ = "\u200c", "\u200d"


@pytest.mark.parametrize(
    ("code", "with_joiner", "without"),
    [
        ("kn", f"ಸಾಫ್ಟ್{ZWNJ}ವೇರ್ ಕನ್ನಡದಲ್ಲಿ ಲಭ್ಯವಿದೆ", "ಸಾಫ್ಟ್ವೇರ್ ಕನ್ನಡದಲ್ಲಿ ಲಭ್ಯವಿದೆ"),  # software (ZWNJ: no conjunct)
        ("te", f"ఈ సాఫ్ట్{ZWNJ}వేర్ తెలుగులో ఉంది", "ఈ సాఫ్ట్వేర్ తెలుగులో ఉంది"),
        ("hi", f"यह विद्{ZWNJ}या का मंदिर है", "यह विद्या का मंदिर है"),
        ("hi", f"क्{ZWJ}या यह सही है", "क्या यह सही है"),  # ZWJ: half form
    ],
    ids=["kn-zwnj", "te-zwnj", "hi-zwnj", "hi-zwj"],
)
def test_a_joiner_inside_a_word_costs_no_error(code, with_joiner, without):
    language = get_language(code)
    assert normalize_for_scoring(with_joiner, language).split() == without.split()
    for hypothesis, reference in ((with_joiner, without), (without, with_joiner)):
        rates = error_rates([reference], [hypothesis], language)
        assert rates["wer"] == 0 and rates["cer"] == 0


def test_marathi_eyelash_ra_written_with_zwj_is_the_same_word_as_with_rra():
    marathi = get_language("mr")
    with_zwj = f"कर्{ZWJ}हाड शहराची तर्{ZWJ}हा वेगळी आहे"  # Karad; manner: RA + virama + ZWJ (pre-4.0 spelling)
    with_rra = "कऱ्हाड शहराची तऱ्हा वेगळी आहे"  # RRA + virama: how Marathi text is written today
    assert normalize_for_scoring(with_zwj, marathi) == with_rra
    assert error_rates([with_rra], [with_zwj], marathi)["wer"] == 0
    assert error_rates([with_zwj], [with_rra], marathi)["wer"] == 0
    # the eyelash is a letter, not a rendering choice: दऱ्या (valleys) and दर्या (sea, reph) stay two words
    assert error_rates([f"दर्{ZWJ}या"], ["दर्या"], marathi)["wer"] == 1


def test_malayalam_chillu_written_with_zwj_is_the_atomic_chillu():
    malayalam = get_language("ml")
    legacy = f"അവന്{ZWJ} വന്നു, അവള്{ZWJ} പോയി"  # he came, she went: consonant + virama + ZWJ (before Unicode 5.1)
    atomic = "അവൻ വന്നു അവൾ പോയി"
    assert normalize_for_scoring(legacy, malayalam) == atomic
    rates = error_rates([atomic], [legacy], malayalam)
    assert rates["wer"] == 0 and rates["cer"] == 0
    assert error_rates(["അവൻ"], ["അവന്"], malayalam)["wer"] == 1  # അവന് ("to him") is another word


def test_invisible_format_characters_are_removed_and_other_controls_separate_words():
    assert normalize_for_scoring("नम\u00adस्ते\ufeff दुनिया\u2060", HINDI) == "नमस्ते दुनिया"
    assert normalize_for_scoring("एक\u200bदो\tतीन", HINDI) == "एक दो तीन"  # zero-width space: a word boundary


# --- the indic normaliser (whisper-normalizer) ---------------------------------------------------------------------


def test_indic_normaliser_spells_digits_native_or_ascii_and_basic_does_not():
    reference, hypothesis = "कमरे में बारह लोग हैं", "कमरे में 12 लोग हैं।"
    assert error_rates([reference], [hypothesis], HINDI, "indic")["wer"] == 0
    assert error_rates([reference], ["कमरे में १२ लोग हैं"], HINDI, "indic")["wer"] == 0  # Devanagari digits
    assert error_rates([reference], [hypothesis], HINDI)["wer"] == pytest.approx(1 / 5)


def test_indic_normaliser_resolves_chillus_and_joiners_and_drops_punctuation():
    malayalam = get_language("ml")
    assert normalize_for_scoring(f"അവന്{ZWJ} വന്നു.", malayalam, "indic") == "അവൻ വന്നു"
    assert normalize_for_scoring(f"ಸಾಫ್ಟ್{ZWNJ}ವೇರ್!", get_language("kn"), "indic") == "ಸಾಫ್ಟ್ವೇರ್"


def test_indic_normaliser_keeps_a_number_it_cannot_spell_instead_of_failing():
    assert normalize_for_scoring("दाम 12.5 रुपये", HINDI, "indic") == "दाम 12 5 रुपये"  # the package raises on "12.5"


def test_indic_normaliser_refuses_languages_it_has_no_script_normaliser_for():
    with pytest.raises(ValueError, match="no script normaliser for 'en'"):
        normalize_for_scoring("hello", get_language("en"), "indic")
    with pytest.raises(ValueError, match="unknown normaliser"):
        normalize_for_scoring("hello", get_language("en"), "whisper")


def test_eval_normalizer_is_checked_against_the_languages_before_anything_runs(tmp_path):
    from whisper_lora.config import ConfigError, load_config

    base = [f"data.source.path={tmp_path}", "eval.normalizer=indic"]
    assert load_config(None, [*base, "data.languages=mr,ml"]).eval.normalizer == "indic"
    with pytest.raises(ConfigError, match="no script normaliser for \\['en'\\]"):
        load_config(None, [*base, "data.languages=hi,en"])
    with pytest.raises(ConfigError, match=r"eval\.normalizer"):
        load_config(None, [f"data.source.path={tmp_path}", "eval.normalizer=whisper"])
