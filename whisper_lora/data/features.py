"""Model inputs from clips: Whisper log-mel features and decoder label ids, with a drop reason for bad rows."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from whisper_lora.data.audio import SAMPLE_RATE, AudioError, load_audio
from whisper_lora.languages import get_language
from whisper_lora.text import clean_transcript, normalize_for_scoring

DROP_REASONS = (
    "missing_audio",
    "unreadable",
    "truncated",
    "too_short",
    "too_long",
    "empty_text",
    "labels_too_long",
)
"""Every reason a row can be dropped for, in pipeline order."""


@dataclass(frozen=True)
class Limits:
    """What a usable row must satisfy."""

    min_duration_s: float = 0.1
    max_duration_s: float = 30.0
    max_label_tokens: int = 448


@dataclass(frozen=True)
class Example:
    """One usable row, ready for the model."""

    input_features: np.ndarray
    """Log-mel spectrogram, ``(num_mel_bins, 3000)`` float32: 30 s, padded."""
    label_ids: np.ndarray
    """``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>`` + text tokens + ``<|endoftext|>``."""
    duration_s: float
    sentence: str


class RowDropped(Exception):
    """A row that cannot be used; ``reason`` is one of ``DROP_REASONS``, ``duration_s`` what was decoded."""

    def __init__(self, reason: str, duration_s: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.duration_s = duration_s


class Featurizer:
    """Feature extractor and tokenizer of one base model, applied row by row."""

    def __init__(self, model_dir: str, limits: Limits = Limits()) -> None:
        self.extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
        self.tokenizer = WhisperTokenizer.from_pretrained(model_dir)
        self.limits = limits
        self._prefixes: dict[str, list[int]] = {}

    def prefix_ids(self, language: str) -> list[int]:
        """The decoder prompt for transcribing ``language`` without timestamps."""
        if language not in self._prefixes:
            tokens = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
            ids = self.tokenizer.convert_tokens_to_ids(tokens)
            if self.tokenizer.unk_token_id in ids:
                raise ValueError(f"the tokenizer lacks one of {tokens}")
            self._prefixes[language] = ids
        return self._prefixes[language]

    def label_ids(self, sentence: str, language: str) -> np.ndarray:
        """Prefix + text + end. The text gets a leading space, as Whisper's own transcripts start with one."""
        text_ids = self.tokenizer.encode(" " + sentence, add_special_tokens=False)
        return np.asarray([*self.prefix_ids(language), *text_ids, self.tokenizer.eos_token_id], dtype=np.int32)

    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """``(num_mel_bins, 3000)`` float32 features of up to 30 s of 16 kHz audio."""
        features = self.extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        return features.astype(np.float32, copy=False)

    def example(self, audio_source: bytes | str, sentence: str, language: str) -> Example:
        """The model inputs of one row, or ``RowDropped`` saying why the row is unusable."""
        sentence = clean_transcript(sentence or "")
        if not normalize_for_scoring(sentence, get_language(language)):
            raise RowDropped("empty_text")
        try:
            audio = load_audio(audio_source)
        except AudioError as exc:
            raise RowDropped(exc.reason) from exc
        duration = len(audio) / SAMPLE_RATE
        if duration < self.limits.min_duration_s:
            raise RowDropped("too_short", duration)
        if duration > self.limits.max_duration_s:
            raise RowDropped("too_long", duration)
        labels = self.label_ids(sentence, language)
        if len(labels) > self.limits.max_label_tokens:
            raise RowDropped("labels_too_long", duration)
        return Example(self.log_mel(audio), labels, duration, sentence)


@functools.lru_cache(maxsize=4)
def cached_featurizer(model_dir: str, limits: Limits) -> Featurizer:
    """One ``Featurizer`` per worker process and model: Ray reuses workers across tasks."""
    return Featurizer(model_dir, limits)
