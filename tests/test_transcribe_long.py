"""``transcribe`` on recordings longer than Whisper's 30-s window: overlapping windows, each decoded, their texts
joined where they overlap; and the device it runs on."""

import pytest
import torch
from transformers import WhisperTokenizer

from tests.builders import write_clip
from whisper_lora.data.audio import SAMPLE_RATE, load_audio
from whisper_lora.data.features import Featurizer
from whisper_lora.evaluate import greedy_transcripts
from whisper_lora.models.inference import load_for_inference
from whisper_lora.transcribe import (
    PublishedAdapterError,
    _device,
    join_overlapping,
    transcribe_audio,
    windows,
)

TOKENS = 6
"""Tokens per window for the random tiny model (it never ends on its own; 440 per window would take minutes)."""


def test_windows_cover_the_recording_and_overlap_by_five_seconds():
    def spans(seconds: float) -> list[tuple[float, float]]:
        audio = torch.arange(int(seconds * SAMPLE_RATE)).numpy()
        return [(w[0] / SAMPLE_RATE, len(w) / SAMPLE_RATE) for w in windows(audio)]

    assert spans(70) == [(0.0, 30.0), (25.0, 30.0), (50.0, 20.0)]
    assert spans(30) == [(0.0, 30.0)]
    assert spans(31) == [(0.0, 30.0), (25.0, 6.0)]
    assert spans(4) == [(0.0, 4.0)]
    assert len(windows(torch.zeros(0).numpy())) == 1


def test_overlapping_texts_are_joined_once_where_they_agree():
    assert join_overlapping(["a b c d e", "d e f g", "g h"]) == "a b c d e f g h"
    # a word cut at the first window's edge is replaced by the whole one the next window heard
    assert join_overlapping(["एक दो ती", "दो तीन चार"]) == "एक दो तीन चार"
    assert join_overlapping(["one two", "three four"]) == "one two three four"
    assert join_overlapping(["", "x y", ""]) == "x y"
    assert join_overlapping(["a b", "a b"]) == "a b"


def test_a_70_second_clip_is_decoded_window_by_window_and_joined(tiny_model_dir, tmp_path, monkeypatch):
    audio = load_audio(str(write_clip(tmp_path / "long.flac", 70.0, rate=16_000, fmt="FLAC")), max_seconds=3600)
    assert len(audio) == 70 * SAMPLE_RATE
    featurizer, tokenizer = Featurizer(tiny_model_dir), WhisperTokenizer.from_pretrained(tiny_model_dir)
    model = load_for_inference(tiny_model_dir, device=torch.device("cpu"))
    features = [featurizer.log_mel(window) for window in windows(audio)]
    alone = [
        greedy_transcripts(model, tokenizer, {"input_features": torch.tensor(f[None])}, "hi", TOKENS)[0]
        for f in features
    ]

    batches, generate = [], model.generate

    def counted(**kwargs):
        batches.append(kwargs["input_features"].shape)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", counted)
    windowed = iter([(0, f) for f in features] + [(1, features[0])])
    texts = transcribe_audio(model, tokenizer, windowed, "hi", batch_size=2, max_new_tokens=TOKENS)
    assert batches == [(2, 80, 3000), (2, 80, 3000)]  # three windows of file 0, one of file 1, two per batch
    assert texts == {0: join_overlapping(alone), 1: alone[0]}
    assert len(texts[0].split()) >= max(len(text.split()) for text in alone)


def test_device_names_are_checked_before_any_model_loads():
    assert _device("cpu") == torch.device("cpu")
    assert _device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PublishedAdapterError, match="--device 'tpu0'"):
        _device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PublishedAdapterError, match="no such CUDA device"):
            _device("cuda:0")
