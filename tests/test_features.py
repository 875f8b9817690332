import numpy as np
import pytest
import soundfile as sf

from tests.builders import write_clip
from whisper_lora.data.collate import IGNORE_INDEX, collate
from whisper_lora.data.features import Featurizer, Limits, RowDropped, pad_log_mel
from whisper_lora.languages import REGISTERED

LANGUAGE_TOKEN_IDS = {"mr": 50320, "hi": 50276, "ta": 50287, "te": 50299, "kn": 50306, "ml": 50296}


@pytest.fixture(scope="module")
def featurizer(tiny_model_dir):
    return Featurizer(tiny_model_dir, Limits(max_label_tokens=448))


def test_features_have_the_models_shape(featurizer, tmp_path):
    example = featurizer.example(str(write_clip(tmp_path / "a.mp3", 3.0)), " यह एक वाक्य है ", "hi")
    assert example.input_features.shape == (80, 302)
    assert example.input_features.dtype == np.float32
    assert pad_log_mel(example.input_features).shape == (80, 3000)
    assert example.duration_s == pytest.approx(3.0, abs=0.05)
    assert example.sentence == "यह एक वाक्य है"


@pytest.mark.parametrize("samples", [100, 1600, 64_037, 192_000, 479_900, 480_000])
def test_trimmed_log_mel_padded_equals_whispers_feature_extractor(featurizer, samples):
    audio = (0.1 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    reference = featurizer.extractor(audio, sampling_rate=16_000, return_tensors="np").input_features[0]
    trimmed = featurizer.log_mel(audio)
    assert trimmed.shape[1] == min(3000, -(-(samples + 200) // 160))
    np.testing.assert_allclose(pad_log_mel(trimmed), reference, atol=1e-6)


def test_silence_pads_like_whisper(featurizer):
    silence = np.zeros(16_000, dtype=np.float32)
    reference = featurizer.extractor(silence, sampling_rate=16_000, return_tensors="np").input_features[0]
    np.testing.assert_array_equal(pad_log_mel(featurizer.log_mel(silence)), reference)


@pytest.mark.parametrize("code", sorted(REGISTERED))
def test_label_prefix_and_end_for_each_registered_language(featurizer, code):
    ids = featurizer.label_ids("एक दो तीन", code)
    assert ids[:4].tolist() == [50258, LANGUAGE_TOKEN_IDS[code], 50359, 50363]
    assert ids[-1] == 50257
    assert featurizer.tokenizer.decode(ids[4:-1]).strip() == "एक दो तीन"


def test_unknown_language_token_is_an_error(featurizer):
    with pytest.raises(ValueError, match="lacks"):
        featurizer.prefix_ids("xx")


@pytest.mark.parametrize(
    ("seconds", "sentence", "reason"),
    [
        (0.05, "एक दो तीन", "too_short"),
        (31.0, "एक दो तीन", "too_long"),
        (2.0, " ।, ! ", "empty_text"),
        (2.0, "शब्द " * 300, "labels_too_long"),
    ],
)
def test_unusable_rows_raise_row_dropped(featurizer, tmp_path, seconds, sentence, reason):
    clip = str(write_clip(tmp_path / "c.wav", seconds, fmt="WAV"))
    with pytest.raises(RowDropped) as raised:
        featurizer.example(clip, sentence, "hi")
    assert raised.value.reason == reason


def test_a_clip_over_the_featurizers_limit_is_dropped_from_its_header_undecoded(tiny_model_dir, tmp_path, monkeypatch):
    clip = str(write_clip(tmp_path / "c.wav", 15.0, fmt="WAV"))

    def decoded(*args, **kwargs):
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(sf.SoundFile, "read", decoded)
    with pytest.raises(RowDropped) as raised:
        Featurizer(tiny_model_dir, Limits(max_duration_s=10.0)).example(clip, "एक दो तीन", "hi")
    assert (raised.value.reason, raised.value.duration_s) == ("too_long", pytest.approx(15.0))


def test_text_far_over_the_label_limit_is_dropped_untokenized(featurizer, tmp_path, monkeypatch):
    """No token spans more bytes than the vocabulary's longest, so 2 MiB of text cannot fit in 448 tokens."""

    def tokenized(*args, **kwargs):
        raise AssertionError("the tokenizer ran")

    monkeypatch.setattr(featurizer.tokenizer, "encode", tokenized)
    clip = str(write_clip(tmp_path / "c.wav", 1.0, fmt="WAV"))
    with pytest.raises(RowDropped, match="labels_too_long"):
        featurizer.example(clip, "शब्द " * 170_000, "hi")


def test_text_spelling_special_tokens_is_tokenized_as_text(featurizer):
    """A transcript must not end its labels early (``<|endoftext|>``) or switch language (``<|en|>``)."""
    sentence = "एक <|endoftext|> दो <|en|>"
    text_ids = featurizer.label_ids(sentence, "hi")[4:-1].tolist()
    assert not set(text_ids) & set(featurizer.tokenizer.all_special_ids) and 50259 not in text_ids
    assert featurizer.tokenizer.decode(text_ids).strip() == sentence


def test_collation_shifts_labels_and_masks_padding():
    batch = {
        "input_features": [np.zeros((80, 120), dtype=np.float32), np.ones((80, 3000), dtype=np.float32)],
        "label_ids": [
            np.array([50258, 50276, 50359, 50363, 10, 11, 50257]),
            np.array([50258, 50276, 50359, 50363, 50257]),
        ],
    }
    out = collate(batch)
    assert out["input_features"].shape == (2, 80, 3000)
    assert out["input_features"][0, 0, -1] == -1.5 and out["input_features"][1, 0, -1] == 1.0
    assert out["decoder_input_ids"].tolist() == [
        [50258, 50276, 50359, 50363, 10, 11],
        [50258, 50276, 50359, 50363, 50257, 50257],
    ]
    assert out["labels"].tolist() == [
        [50276, 50359, 50363, 10, 11, 50257],
        [50276, 50359, 50363, 50257, IGNORE_INDEX, IGNORE_INDEX],
    ]
