"""Decode any soundfile-readable clip (mp3, flac, wav, ogg), downmix to mono and resample to 16 kHz."""

from __future__ import annotations

import io
from contextlib import nullcontext

import numpy as np
import soundfile as sf
import soxr

from whisper_lora.storage import Location, open_location

SAMPLE_RATE = 16_000
"""Whisper's input rate."""


TRUNCATION_TOLERANCE_FRAMES = 4096
"""Decoders may drop up to a few MP3 frames (encoder delay) of the length a header declares."""


class AudioError(ValueError):
    """A clip that cannot be used; ``reason`` is its drop-count key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode(source: bytes | str | Location) -> tuple[np.ndarray, int]:
    """Samples (frames × channels, float32) and the native rate of encoded bytes or a file: a ``Location``, or a
    path or URI opened with the environment's storage settings (``whisper_lora.storage``).

    Raises ``AudioError`` with reason ``missing_audio``, ``unreadable`` (empty, not audio, corrupt header) or
    ``truncated`` (fewer frames decoded than the stream header declares: a cut-off download).
    """
    if isinstance(source, str):
        source = open_location(source)
    if isinstance(source, Location) and not source.is_file():
        raise AudioError("missing_audio", source.uri)
    try:
        with (
            nullcontext(io.BytesIO(source)) if isinstance(source, bytes) else source.open() as handle,
            sf.SoundFile(handle) as stream,
        ):
            declared, rate = stream.frames, stream.samplerate
            samples = stream.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise AudioError("unreadable", str(exc)) from exc
    if samples.size == 0:
        raise AudioError("unreadable", "no samples")
    if len(samples) < declared - max(TRUNCATION_TOLERANCE_FRAMES, declared // 100):
        raise AudioError("truncated", f"decoded {len(samples)} of {declared} declared frames")
    return samples, rate


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Average channels, then resample with soxr's high-quality filter to ``SAMPLE_RATE``."""
    mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32)
    if rate == SAMPLE_RATE:
        return mono
    return soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def load_audio(source: bytes | str | Location) -> np.ndarray:
    """Mono float32 samples at 16 kHz; raises ``AudioError`` for anything that is not decodable audio."""
    samples, rate = decode(source)
    return to_mono_16k(samples, rate)
