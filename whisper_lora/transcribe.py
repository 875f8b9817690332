"""``whisper-lora transcribe --adapter <published adapter dir> FILE…``: what a downstream job does with a
published adapter — find its manifest, copy the adapter into a private directory, check that copy against the
recorded hashes and load exactly it (no gap between check and use), resolve the base model the manifest pins
(checked before any conversion), and transcribe in the adapter's language.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperTokenizer

from whisper_lora.data.audio import load_audio
from whisper_lora.data.collate import stack_features
from whisper_lora.data.features import Featurizer
from whisper_lora.evaluate import greedy_transcripts
from whisper_lora.manifest import ADAPTER_FILES, MANIFEST, Manifest, PublishedAdapter, adapter_files, read_manifest
from whisper_lora.models.inference import load_for_inference
from whisper_lora.models.resolve import ModelMismatch, resolve_base_model
from whisper_lora.storage import Location, StorageOptions, open_location

MAX_SECONDS = 30.0
log = logging.getLogger(__name__)


class PublishedAdapterError(ValueError):
    """The adapter directory is not what its manifest says (missing entry, hash mismatch, other base)."""


def find_entry(adapter: Location) -> tuple[Manifest, PublishedAdapter]:
    """The manifest and its entry for ``adapter`` (``<experiment>/adapters/<lang>/<name>``)."""
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
    return manifest, entry


def verified_copy(adapter: Location, entry: PublishedAdapter, directory: Path) -> Path:
    """The adapter's files copied into ``directory`` and checked there against the manifest's hashes: what is
    loaded is what was checked, whatever happens to the published copy meanwhile."""
    for name in ADAPTER_FILES:
        adapter.join(name).copy_to(open_location(str(directory / name)))
    if adapter_files(open_location(str(directory))) != entry.files:
        raise PublishedAdapterError(f"{adapter.uri}: files do not match the sha256 recorded in its {MANIFEST}")
    return directory


def transcribe_files(
    adapter: str,
    files: list[str],
    cache_dir: Path,
    base: str | None = None,
    batch_size: int = 8,
    storage: StorageOptions | None = None,
) -> list[tuple[str, str]]:
    """(file, transcript) for every file, with the published ``adapter`` (local path or ``s3://…``).
    ``base`` replaces the manifest's base model (unchecked: said in a warning)."""
    location = open_location(adapter, storage)
    manifest, entry = find_entry(location)
    pinned = manifest.base_model
    if base is None:
        try:
            resolved = resolve_base_model(pinned.id, cache_dir, expected_sha256=pinned.sha256)
        except ModelMismatch as exc:
            raise PublishedAdapterError(f"the adapter was trained on other weights: {exc}") from None
    else:
        resolved = resolve_base_model(base, cache_dir)
        log.warning(
            "--base %s replaces the manifest's base %s (sha256 %s…)%s: transcripts are only as good as that match",
            base, pinned.id, pinned.sha256[:12],
            "" if resolved.sha256 == pinned.sha256 else f" with OTHER weights (sha256 {resolved.sha256[:12]}…)",
        )  # fmt: skip
    featurizer = Featurizer(resolved.path)
    tokenizer = WhisperTokenizer.from_pretrained(resolved.path)
    with tempfile.TemporaryDirectory(prefix="adapter-") as directory:
        model = load_for_inference(resolved.path, str(verified_copy(location, entry, Path(directory))))
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        features = []
        for path in chunk:
            audio = load_audio(open_location(path, storage), max_seconds=MAX_SECONDS)
            features.append(featurizer.log_mel(audio))
        inputs = {"input_features": stack_features([np.asarray(f) for f in features])}
        with torch.no_grad():
            texts = greedy_transcripts(model, tokenizer, inputs, entry.language)
        results += list(zip(chunk, texts, strict=True))
    return results
