"""The released Whisper sizes, as architectures (no weights): what cost projections and parameter counts use."""

from __future__ import annotations

from transformers import WhisperConfig

ENCODER_POSITIONS = 1500
"""Encoder positions of every 30-s window: the encoder's cost per utterance does not depend on its length."""

SIZES: dict[str, dict[str, int]] = {
    # d_model, layers per stack, attention heads, feed-forward width, vocabulary, mel bins: as in OpenAI's released
    # checkpoints (openai/whisper-<name> config.json).
    "tiny": {"d_model": 384, "layers": 4, "heads": 6, "ffn": 1536, "vocab": 51865, "mels": 80},
    "base": {"d_model": 512, "layers": 6, "heads": 8, "ffn": 2048, "vocab": 51865, "mels": 80},
    "small": {"d_model": 768, "layers": 12, "heads": 12, "ffn": 3072, "vocab": 51865, "mels": 80},
    "medium": {"d_model": 1024, "layers": 24, "heads": 16, "ffn": 4096, "vocab": 51865, "mels": 80},
    "large-v2": {"d_model": 1280, "layers": 32, "heads": 20, "ffn": 5120, "vocab": 51865, "mels": 80},
    "large-v3": {"d_model": 1280, "layers": 32, "heads": 20, "ffn": 5120, "vocab": 51866, "mels": 128},
}


TINY_RANDOM: dict[str, int] = {"d_model": 64, "layers": 2, "heads": 2, "ffn": 256, "vocab": 51865, "mels": 80}
"""No released size: a random Whisper that trains a step in ~0.15 s on CPU, with the real vocabulary (tests, the
cluster dry run, ``gpu_check --tiny``)."""


def whisper_config(size: str) -> WhisperConfig:
    """The architecture of a released Whisper size."""
    if size not in SIZES:
        raise ValueError(f"unknown Whisper size {size!r}: known sizes are {', '.join(SIZES)}")
    return config_of(SIZES[size])


def config_of(shape: dict[str, int], **extra) -> WhisperConfig:
    """A ``WhisperConfig`` of ``shape`` (keys as in ``SIZES``); ``extra``: further config fields."""
    return WhisperConfig(
        vocab_size=shape["vocab"],
        num_mel_bins=shape["mels"],
        d_model=shape["d_model"],
        encoder_layers=shape["layers"],
        decoder_layers=shape["layers"],
        encoder_attention_heads=shape["heads"],
        decoder_attention_heads=shape["heads"],
        encoder_ffn_dim=shape["ffn"],
        decoder_ffn_dim=shape["ffn"],
        max_source_positions=ENCODER_POSITIONS,
        max_target_positions=448,
        **extra,
    )


def size_of(config: WhisperConfig) -> str | None:
    """Which released size an architecture is (``None`` for others, e.g. the tests' tiny random models)."""
    shape = {
        "d_model": config.d_model,
        "layers": config.encoder_layers,
        "heads": config.encoder_attention_heads,
        "ffn": config.encoder_ffn_dim,
        "vocab": config.vocab_size,
        "mels": config.num_mel_bins,
    }
    return next((name for name, known in SIZES.items() if known == shape), None)
