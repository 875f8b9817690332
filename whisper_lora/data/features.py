"""Model inputs from clips: Whisper log-mel features and decoder label ids, with a drop reason for bad rows."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from whisper_lora.data.audio import SAMPLE_RATE, AudioError, load_audio
from whisper_lora.languages import get_language
from whisper_lora.storage import Location
from whisper_lora.text import clean_transcript, normalize_for_scoring

DROP_REASONS = (
    "bad_row",
    "outside_source",
    "empty_text",
    "missing_audio",
    "bad_header",
    "too_long",
    "unreadable",
    "truncated",
    "too_short",
    "labels_too_long",
)
"""Every reason a row can be dropped for, in pipeline order. The source decides the first two: a row it cannot
parse, or one whose audio lies outside the source's folder (``data.source.allow_outside_paths``); ``bad_row`` also
counts a row that failed in any unforeseen way. ``bad_header`` and ``too_long`` are decided from the stream
header, before any sample is decoded."""


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
    """Log-mel spectrogram, ``(num_mel_bins, frames)`` float32: only the frames the audio reaches;
    ``pad_log_mel`` restores Whisper's padded 30-s input exactly."""
    label_ids: np.ndarray
    """``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>`` + text tokens + ``<|endoftext|>``."""
    duration_s: float
    sentence: str


class RowDropped(Exception):
    """A row that cannot be used; ``reason`` is one of ``DROP_REASONS``, ``duration_s`` what was decoded (or what
    the header declares, for a clip rejected from its header as too long)."""

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
        # No token spans more bytes than the vocabulary's longest: text beyond this cannot fit in the label limit
        # and is dropped untokenized (a 2-MiB sentence takes the tokenizer seconds).
        self._max_text_bytes = limits.max_label_tokens * max(len(token) for token in self.tokenizer.get_vocab())
        self._mel_filters = torch.from_numpy(self.extractor.mel_filters).float()
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
        """Prefix + text + end. The text gets a leading space, as Whisper's own transcripts start with one; text
        spelling a special token (``<|endoftext|>``, ``<|en|>``) is tokenized as the characters it is."""
        text_ids = self.tokenizer.encode(" " + sentence, add_special_tokens=False, split_special_tokens=True)
        return np.asarray([*self.prefix_ids(language), *text_ids, self.tokenizer.eos_token_id], dtype=np.int32)

    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """Whisper's log-mel of up to 30 s of 16 kHz audio, computed only over the frames the audio reaches.

        Whisper pads every clip to 30 s; frames whose window sees only that padding all hold one value,
        ``pad_log_mel`` puts them back. Skipping them makes a 5-s clip ~6x cheaper to featurize, store and
        ship, and leaves every value equal to ``WhisperFeatureExtractor``'s.
        """
        n_fft, hop, max_frames = self.extractor.n_fft, self.extractor.hop_length, self.extractor.nb_max_frames
        frames = min(max_frames, -(-(len(audio) + n_fft // 2) // hop))
        length = self.extractor.n_samples if frames == max_frames else frames * hop + n_fft // 2
        waveform = torch.zeros(length)
        clip = torch.from_numpy(audio[:length])
        waveform[: clip.numel()] = clip
        stft = torch.stft(waveform, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
        power = (stft[:, :frames].abs() ** 2).contiguous()
        log_spec = torch.clamp(self._mel_filters.T @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).numpy()

    def example(self, audio_source: bytes | Location, sentence: str, language: str) -> Example:
        """The model inputs of one row, or ``RowDropped`` saying why the row is unusable."""
        sentence = clean_transcript(sentence or "")
        if len(sentence.encode("utf-8")) > self._max_text_bytes:
            raise RowDropped("labels_too_long")
        if not normalize_for_scoring(sentence, get_language(language)):
            raise RowDropped("empty_text")
        try:
            audio = load_audio(audio_source, max_duration_s=self.limits.max_duration_s)
        except AudioError as exc:
            raise RowDropped(exc.reason, exc.duration_s) from exc
        duration = len(audio) / SAMPLE_RATE
        if duration < self.limits.min_duration_s:
            raise RowDropped("too_short", duration)
        if duration > self.limits.max_duration_s:
            raise RowDropped("too_long", duration)
        labels = self.label_ids(sentence, language)
        if len(labels) > self.limits.max_label_tokens:
            raise RowDropped("labels_too_long", duration)
        return Example(self.log_mel(audio), labels, duration, sentence)


def pad_log_mel(features: np.ndarray, frames: int = 3000) -> np.ndarray:
    """Extend trimmed log-mel features to ``frames`` with the value Whisper's 30-s padding has.

    Padding is silence: log10 of the 1e-10 floor (-10), clamped at the clip's maximum minus 8, normalised by
    (x + 4) / 4, which is ``max(-1.5, features.max() - 2)``.
    """
    if features.shape[-1] >= frames:
        return features[..., :frames]
    padded = np.full((*features.shape[:-1], frames), max(-1.5, float(features.max()) - 2.0), dtype=np.float32)
    padded[..., : features.shape[-1]] = features
    return padded


@functools.lru_cache(maxsize=4)
def cached_featurizer(model_dir: str, limits: Limits) -> Featurizer:
    """One ``Featurizer`` per worker process and model: Ray reuses workers across tasks."""
    return Featurizer(model_dir, limits)
