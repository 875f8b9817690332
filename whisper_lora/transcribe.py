"""``whisper-lora transcribe --adapter <published language dir> FILE…``: what a downstream job does with a
published adapter — find its manifest, check the files against the recorded hashes, load the recorded base model
plus the adapter (``PeftModel.from_pretrained``, the peft format unchanged) and transcribe in its language.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperTokenizer

from whisper_lora.data.audio import load_audio
from whisper_lora.data.collate import stack_features
from whisper_lora.data.features import Featurizer
from whisper_lora.evaluate import greedy_transcripts
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.publish import ADAPTER_FILES, MANIFEST, Storage, adapter_files, open_storage, read_json
from whisper_lora.train.model import load_adapter

MAX_SECONDS = 30.0
log = logging.getLogger(__name__)


class PublishedAdapterError(ValueError):
    """The adapter directory is not what its manifest says (missing entry, hash mismatch, other base)."""


@dataclass(frozen=True)
class PublishedAdapter:
    language: str
    base_id: str
    base_sha256: str
    entry: dict


def find_entry(storage: Storage, adapter_path: str) -> PublishedAdapter:
    """The manifest entry for ``adapter_path`` (``<experiment>/adapters/<lang>/<name>``), files verified."""
    parts = adapter_path.rstrip("/").split("/")
    if len(parts) < 4 or parts[-3] != "adapters":
        raise PublishedAdapterError(f"{adapter_path} is not a published adapter (…/adapters/<lang>/<name>)")
    experiment_dir = "/".join(parts[:-3])
    manifest_path = f"{experiment_dir}/{MANIFEST}"
    manifest = read_json(storage, manifest_path)
    if manifest is None:
        raise PublishedAdapterError(f"no {MANIFEST} at {experiment_dir}: publish with `whisper-lora tune` first")
    language = parts[-2]
    entry = manifest["languages"].get(language)
    if entry is None or not entry["adapter"].rstrip("/").endswith("/".join(parts[-3:])):
        raise PublishedAdapterError(f"{manifest_path} does not list {adapter_path} (it may have been superseded)")
    if adapter_files(storage, adapter_path) != entry["files"]:
        raise PublishedAdapterError(f"{adapter_path}: files do not match the sha256 recorded in {manifest_path}")
    base = manifest["base_model"]
    return PublishedAdapter(language, base["id"], base["sha256"], entry)


def local_copy(storage: Storage, adapter_path: str, directory: Path) -> Path:
    for name in ADAPTER_FILES:
        with storage.fs.open_input_stream(f"{adapter_path}/{name}") as reader:
            (directory / name).write_bytes(reader.read())
    return directory


def transcribe_files(
    adapter: str, files: list[str], cache_dir: Path, base: str | None = None, batch_size: int = 8
) -> list[tuple[str, str]]:
    """(file, transcript) for every file, with the published ``adapter`` (local path or ``s3://…``)."""
    storage = open_storage(adapter)
    published = find_entry(storage, storage.root)
    model_spec = base or published.base_id
    resolved = resolve_base_model(model_spec, cache_dir)
    if base is None and resolved.sha256 != published.base_sha256:
        raise PublishedAdapterError(f"{model_spec} resolved to other weights than the adapter was trained on")
    featurizer = Featurizer(resolved.path)
    tokenizer = WhisperTokenizer.from_pretrained(resolved.path)
    with tempfile.TemporaryDirectory() as directory:
        model = load_adapter(resolved.path, str(local_copy(storage, storage.root, Path(directory))))
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        features = []
        for path in chunk:
            audio = load_audio(path)
            if len(audio) > MAX_SECONDS * 16000:
                log.warning("%s: only the first %.0f s are transcribed", path, MAX_SECONDS)
            features.append(featurizer.log_mel(audio[: int(MAX_SECONDS * 16000)]))
        inputs = {"input_features": stack_features([np.asarray(f) for f in features])}
        with torch.no_grad():
            texts = greedy_transcripts(model, tokenizer, inputs, published.language)
        results += list(zip(chunk, texts, strict=True))
    return results
