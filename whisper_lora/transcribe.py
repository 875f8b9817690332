"""``whisper-lora transcribe --adapter <published adapter dir> FILE…``: what a downstream job does with a
published adapter — find its manifest, check the files against the recorded hashes, load the recorded base model
plus the adapter (``PeftModel.from_pretrained``, the peft format unchanged) and transcribe in its language.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperTokenizer

from whisper_lora.data.audio import SAMPLE_RATE, load_audio
from whisper_lora.data.collate import stack_features
from whisper_lora.data.features import Featurizer
from whisper_lora.evaluate import greedy_transcripts
from whisper_lora.manifest import ADAPTER_FILES, MANIFEST, Manifest, PublishedAdapter, adapter_files, read_manifest
from whisper_lora.models.inference import load_for_inference
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.storage import Location, StorageOptions, open_location

MAX_SECONDS = 30.0
log = logging.getLogger(__name__)


class PublishedAdapterError(ValueError):
    """The adapter directory is not what its manifest says (missing entry, hash mismatch, other base)."""


def find_entry(adapter: Location) -> tuple[Manifest, PublishedAdapter]:
    """The manifest and its entry for ``adapter`` (``<experiment>/adapters/<lang>/<name>``), files verified."""
    parts = adapter.uri.rstrip("/").split("/")
    if len(parts) < 4 or parts[-3] != "adapters":
        raise PublishedAdapterError(f"{adapter.uri} is not a published adapter (…/adapters/<lang>/<name>)")
    experiment_dir = adapter.parent.parent.parent
    manifest = read_manifest(experiment_dir)
    if manifest is None:
        raise PublishedAdapterError(f"no {MANIFEST} at {experiment_dir.uri}: publish with `whisper-lora tune` first")
    entry = manifest.languages.get(parts[-2])
    if entry is None or not entry.adapter.rstrip("/").endswith("/".join(parts[-3:])):
        raise PublishedAdapterError(f"{experiment_dir.join(MANIFEST).uri} does not list {adapter.uri} (superseded?)")
    if adapter_files(adapter) != entry.files:
        raise PublishedAdapterError(f"{adapter.uri}: files do not match the sha256 recorded in its {MANIFEST}")
    return manifest, entry


def local_copy(adapter: Location, directory: Path) -> Path:
    for name in ADAPTER_FILES:
        (directory / name).write_bytes(adapter.join(name).read_bytes())
    return directory


def transcribe_files(
    adapter: str,
    files: list[str],
    cache_dir: Path,
    base: str | None = None,
    batch_size: int = 8,
    storage: StorageOptions | None = None,
) -> list[tuple[str, str]]:
    """(file, transcript) for every file, with the published ``adapter`` (local path or ``s3://…``)."""
    location = open_location(adapter, storage)
    manifest, entry = find_entry(location)
    model_spec = base or manifest.base_model.id
    resolved = resolve_base_model(model_spec, cache_dir)
    if base is None and resolved.sha256 != manifest.base_model.sha256:
        raise PublishedAdapterError(f"{model_spec} resolved to other weights than the adapter was trained on")
    featurizer = Featurizer(resolved.path)
    tokenizer = WhisperTokenizer.from_pretrained(resolved.path)
    with tempfile.TemporaryDirectory() as directory:
        model = load_for_inference(resolved.path, str(local_copy(location, Path(directory))))
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        features = []
        for path in chunk:
            audio = load_audio(open_location(path, storage))
            if len(audio) > MAX_SECONDS * SAMPLE_RATE:
                log.warning("%s: only the first %.0f s are transcribed", path, MAX_SECONDS)
            features.append(featurizer.log_mel(audio[: int(MAX_SECONDS * SAMPLE_RATE)]))
        inputs = {"input_features": stack_features([np.asarray(f) for f in features])}
        with torch.no_grad():
            texts = greedy_transcripts(model, tokenizer, inputs, entry.language)
        results += list(zip(chunk, texts, strict=True))
    return results
