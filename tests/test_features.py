import numpy as np
import pytest

from tests.conftest import write_clip
from whisper_lora.data.collate import IGNORE_INDEX, collate
from whisper_lora.data.features import Featurizer, Limits, RowDropped
from whisper_lora.languages import REGISTERED

LANGUAGE_TOKEN_IDS = {"mr": 50320, "hi": 50276, "ta": 50287, "te": 50299, "kn": 50306, "ml": 50296}


@pytest.fixture(scope="module")
def featurizer(tiny_model_dir):
    return Featurizer(tiny_model_dir, Limits(max_label_tokens=448))


def test_features_have_the_models_shape(featurizer, tmp_path):
    example = featurizer.example(str(write_clip(tmp_path / "a.mp3", 3.0)), " यह एक वाक्य है ", "hi")
    assert example.input_features.shape == (80, 3000)
    assert example.input_features.dtype == np.float32
    assert example.duration_s == pytest.approx(3.0, abs=0.05)
    assert example.sentence == "यह एक वाक्य है"


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


def test_collation_shifts_labels_and_masks_padding():
    batch = {
        "input_features": np.zeros((2, 80, 3000), dtype=np.float32),
        "label_ids": [
            np.array([50258, 50276, 50359, 50363, 10, 11, 50257]),
            np.array([50258, 50276, 50359, 50363, 50257]),
        ],
    }
    out = collate(batch)
    assert out["input_features"].shape == (2, 80, 3000)
    assert out["decoder_input_ids"].tolist() == [
        [50258, 50276, 50359, 50363, 10, 11],
        [50258, 50276, 50359, 50363, 50257, 50257],
    ]
    assert out["labels"].tolist() == [
        [50276, 50359, 50363, 10, 11, 50257],
        [50276, 50359, 50363, 50257, IGNORE_INDEX, IGNORE_INDEX],
    ]
