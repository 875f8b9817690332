"""Decode any soundfile-readable clip (mp3, flac, wav, ogg), downmix to mono and resample to 16 kHz.

Decoding is bounded before anything is allocated. The stream header (rate, channels, frame count) is checked
first and at most the frames the caller's limit allows are read: soundfile sizes its output from the header,
so a 42-byte FLAC claiming 2^36 frames × 8 channels asks for 2 TiB, and a WAV declaring 1 Hz resamples 4 KB into
32 M samples. A clip that passes the checks costs at most (limit + ``HEADER_TOLERANCE_S``) × ``MAX_RATE`` ×
``MAX_CHANNELS`` × 4 bytes: 31 s × 384 kHz × 8 × 4 B ≈ 381 MB at the 30-s default.
"""

from __future__ import annotations

import io
import math
from contextlib import nullcontext

import numpy as np
import soundfile as sf
import soxr

from whisper_lora.config import DataConfig
from whisper_lora.storage import Location, open_location

SAMPLE_RATE = 16_000
"""Whisper's input rate."""

MIN_RATE, MAX_RATE = 4_000, 384_000
"""Native rates accepted: narrowband telephone speech is 8 kHz, the highest studio rate 384 kHz."""

MAX_CHANNELS = 8
"""7.1 surround, and the most FLAC can hold. Speech corpora are mono or stereo; more is a forged header."""

MAX_DURATION_S: float = DataConfig.model_fields["max_duration_s"].default
"""The limit for callers without a config: the config's own default (Whisper's 30-s window)."""

HEADER_TOLERANCE_S = 1.0
"""How far a header may overstate the limit before the clip is rejected unread: MP3 headers count encoder
padding, and libsndfile estimates the length of MP3s without a Xing header. The decoded length is what the
feature stage checks exactly."""

MAX_DECLARED_S = 24 * 3600
"""A header declaring more than a day is forged or corrupt (``bad_header``), not a long recording."""

TRUNCATION_TOLERANCE_FRAMES = 4096
"""Decoders may drop up to a few MP3 frames (encoder delay) of the length a header declares."""


class AudioError(ValueError):
    """A clip that cannot be used; ``reason`` is its drop-count key, ``duration_s`` what its header declares
    when it was rejected for its length."""

    def __init__(self, reason: str, detail: str, duration_s: float = 0.0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.duration_s = duration_s


def _frames_to_read(
    declared: int, rate: int, channels: int, max_duration_s: float, max_seconds: float | None = None
) -> int:
    """How many frames of a stream to read, from its header alone; ``AudioError`` for a header outside what any
    clip has (``bad_header``) or a clip longer than ``max_duration_s`` (``too_long``). With ``max_seconds`` the
    first ``max_seconds`` are read instead, whatever the clip's length."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError("bad_header", f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError("bad_header", f"{channels} channels; at most {MAX_CHANNELS} are read")
    seconds = declared / rate
    if declared < 0 or seconds > MAX_DECLARED_S:
        raise AudioError("bad_header", f"the header declares {declared} frames ({seconds:.0f} s)")
    if max_seconds is not None:
        return min(declared, math.ceil(max_seconds * rate))
    if seconds > max_duration_s + HEADER_TOLERANCE_S:
        raise AudioError("too_long", f"the header declares {seconds:.1f} s (limit {max_duration_s} s)", seconds)
    return declared


def decode(
    source: bytes | str | Location, *, max_duration_s: float = MAX_DURATION_S, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """Samples (frames × channels, float32) and the native rate of encoded bytes or a file: a ``Location``, or a
    path or URI opened with the environment's storage settings (``whisper_lora.storage``).

    A clip whose header declares more than ``max_duration_s`` is rejected before any sample is decoded; with
    ``max_seconds`` only the first ``max_seconds`` are decoded instead (``transcribe`` of a long recording).
    Raises ``AudioError`` with reason ``missing_audio``, ``bad_header`` (rate, channels or length out of range),
    ``too_long``, ``unreadable`` (empty, not audio, any decoder error, out of memory) or ``truncated`` (fewer
    frames decoded than the header declares: a cut-off download).
    """
    try:
        if isinstance(source, str):
            source = open_location(source)
        if isinstance(source, Location) and not source.is_file():
            raise AudioError("missing_audio", source.uri)
        with (
            nullcontext(io.BytesIO(source)) if isinstance(source, bytes) else source.open() as handle,
            sf.SoundFile(handle) as stream,
        ):
            rate = stream.samplerate
            wanted = _frames_to_read(stream.frames, rate, stream.channels, max_duration_s, max_seconds)
            samples = stream.read(wanted, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # a decoder failing in any way (MemoryError included) is one unusable clip
        raise AudioError("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if samples.size == 0:
        raise AudioError("unreadable", "no samples")
    if len(samples) < wanted - max(TRUNCATION_TOLERANCE_FRAMES, wanted // 100):
        raise AudioError("truncated", f"decoded {len(samples)} of the {wanted} frames the header declares")
    return samples, rate


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Average channels, then resample with soxr's high-quality filter to ``SAMPLE_RATE``."""
    mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32)
    if rate == SAMPLE_RATE:
        return mono
    return soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def load_audio(
    source: bytes | str | Location, *, max_duration_s: float = MAX_DURATION_S, max_seconds: float | None = None
) -> np.ndarray:
    """Mono float32 samples at 16 kHz, decoded within the bounds ``decode`` describes; raises ``AudioError`` for
    anything that is not usable audio."""
    samples, rate = decode(source, max_duration_s=max_duration_s, max_seconds=max_seconds)
    return to_mono_16k(samples, rate)
