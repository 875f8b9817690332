"""``whisper-lora export``: an adapter as a model that serves without whisper-lora or peft.

``merged``: the base reloaded in full precision (an adapter is never merged into int8 weights: the rounding
would be baked in), the LoRA deltas merged (``merge_and_unload``) and saved as a transformers directory with its
processor (tokenizer and feature extractor files) and a ``generation_config.json`` that carries the adapter's
language and task, so ``generate`` without arguments transcribes in that language.
``ctranslate2``: that merged model converted by CTranslate2's own ``TransformersConverter`` for faster-whisper,
at the quantisation asked for, with the ``tokenizer.json`` and ``preprocessor_config.json`` faster-whisper reads.

The adapter is a published one (its manifest names the language and the pinned base, checked as ``transcribe``
checks them) or a training checkpoint's (``--language`` and ``--base`` say what the manifest would). Every export
writes ``export.json``: the source adapter files' sha256, the base model, the quantisation, the versions that made
it and the sha256 of every file written. The output appears in one rename, complete or not at all.

    whisper-lora export --adapter artifacts/published/demo/adapters/hi/<name> --to ctranslate2
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

from whisper_lora import __version__
from whisper_lora.manifest import ADAPTER_FILES, BaseModelRecord, FileRecord, adapter_files
from whisper_lora.models.ctranslate2 import special_token_ids
from whisper_lora.models.resolve import ModelMismatch, resolve_base_model
from whisper_lora.publish import now
from whisper_lora.storage import Location, StorageOptions, open_location
from whisper_lora.train.checkpoint import ADAPTER_DIR
from whisper_lora.transcribe import PublishedAdapterError, find_entry, verified_copy

Format = Literal["merged", "ctranslate2"]
FORMATS: tuple[Format, ...] = ("merged", "ctranslate2")
QUANTIZATIONS = ("int8_float16", "float16", "int8", "float32")
"""CTranslate2 weight types offered; ``merged`` takes ``float32`` (its default) or ``float16``."""
DEFAULT_QUANTIZATION = {"merged": "float32", "ctranslate2": "float16"}
RECORD = "export.json"
FASTER_WHISPER_FILES = ["tokenizer.json", "preprocessor_config.json"]
"""Beside ``model.bin``/``config.json``/``vocabulary.json``: what faster-whisper loads from the model directory
(without them it fetches a tokenizer from the hub and guesses the feature extractor)."""
TASK = "transcribe"
log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export that cannot be made as asked: a missing flag, a language or base that does not fit, an output
    that exists."""


class ExportRecord(BaseModel):
    """``export.json``: what an exported model was made from and of."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Format
    quantization: str
    language: str
    task: str
    adapter: str
    """The source adapter's URI."""
    adapter_files: dict[str, FileRecord]
    """sha256 and size of the source adapter's files, as checked before the export."""
    base_model: BaseModelRecord
    files: dict[str, FileRecord]
    """Every file of the export but this record."""
    versions: dict[str, str]
    created: str


@dataclass(frozen=True)
class Source:
    """An adapter ready to export: a checked local copy, its language and the base it applies to."""

    uri: str
    directory: Path
    language: str
    base: str
    pinned_sha256: str | None
    """The manifest's pin on the base weights; None for a checkpoint or an overridden base."""
    pinned_revision: str | None = None
    """The hub commit the manifest recorded for a hub base: the export loads exactly those files."""


def find_source(adapter: Location, copy_dir: Path, language: str | None, base: str | None) -> Source:
    """The adapter at ``adapter`` copied (and for a published one, checked) into ``copy_dir``."""
    if adapter.parent.parent.name == "adapters":  # <experiment>/adapters/<lang>/<name>: published
        try:
            manifest, entry = find_entry(adapter)
            verified_copy(adapter, entry, copy_dir)
        except PublishedAdapterError as exc:
            raise ExportError(str(exc)) from None
        if language is not None and language != entry.language:
            raise ExportError(f"{adapter.uri} is a {entry.language!r} adapter (its manifest says), not {language!r}")
        if base is not None:
            log.warning("--base %s replaces the manifest's base %s: unchecked", base, manifest.base_model.id)
        pinned = None if base is not None else manifest.base_model.sha256
        revision = None if base is not None else manifest.base_model.revision
        return Source(adapter.uri, copy_dir, entry.language, base or manifest.base_model.id, pinned, revision)
    directory = adapter if adapter.join(ADAPTER_FILES[0]).is_file() else adapter.join(ADAPTER_DIR)
    if not directory.join(ADAPTER_FILES[0]).is_file():
        raise ExportError(f"{adapter.uri} holds no peft adapter ({ADAPTER_FILES[0]}, or {ADAPTER_DIR}/ in it)")
    if language is None or base is None:
        raise ExportError(f"{adapter.uri} is not a published adapter: name its --language and --base")
    for name in ADAPTER_FILES:
        directory.join(name).copy_to(open_location(str(copy_dir / name)))
    return Source(directory.uri, copy_dir, language, base, None)


def merged_model(base_path: str, adapter_dir: Path, language: str) -> WhisperForConditionalGeneration:
    """The base in float32 with the adapter merged in; config and generation config set for ``language``."""
    tokenizer = WhisperTokenizer.from_pretrained(base_path)
    model = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    languages = model.generation_config.lang_to_id or {}
    if f"<|{language}|>" not in languages:
        raise ExportError(f"language {language!r} is not one this base model knows ({len(languages)} languages)")
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:  # target modules or shapes that are not this base's
        raise ExportError(f"the adapter does not apply to this base model: {str(exc)[:300]}") from None
    model.config.update(special_token_ids(tokenizer))
    generation = model.generation_config
    generation.update(**special_token_ids(tokenizer))
    generation.language, generation.task = f"<|{language}|>", TASK  # not GenerationConfig fields: update drops them
    return model.eval()


def save_merged(model: WhisperForConditionalGeneration, base_path: str, out: Path, dtype: torch.dtype) -> None:
    """Weights (safetensors, ``dtype``), configs and the processor's files as the hub's Whisper repos lay them
    out (``preprocessor_config.json``, which faster-whisper reads, not transformers 5's ``processor_config.json``);
    ``WhisperProcessor.from_pretrained`` reads either."""
    model.to(dtype).save_pretrained(out)
    WhisperFeatureExtractor.from_pretrained(base_path).save_pretrained(out)
    WhisperTokenizer.from_pretrained(base_path).save_pretrained(out)


def convert_ctranslate2(merged_dir: Path, out: Path, quantization: str) -> str:
    """CTranslate2's converter on a merged transformers directory; returns the ctranslate2 version."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise ExportError(
            "--to ctranslate2 needs the ctranslate2 package: pip install 'whisper-lora[export]'"
        ) from None
    TransformersConverter(str(merged_dir), copy_files=FASTER_WHISPER_FILES).convert(
        str(out), quantization=quantization, force=True
    )
    return ctranslate2.__version__


def _versions(**extra: str) -> dict[str, str]:
    names = ("torch", "transformers", "peft")
    return {"whisper-lora": __version__} | {name: importlib.metadata.version(name) for name in names} | extra


def _files(directory: Path) -> dict[str, FileRecord]:
    location = open_location(str(directory))
    records = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != RECORD:
            digest, size = location.join(*path.relative_to(directory).parts).sha256()
            records[path.relative_to(directory).as_posix()] = FileRecord(sha256=digest, bytes=size)
    return records


def check_request(to: str, quantization: str | None) -> str:
    """The quantisation to use for ``to``; ``ExportError`` for one it does not take."""
    if to not in FORMATS:
        raise ExportError(f"--to {to!r}: one of {', '.join(FORMATS)}")
    quantization = quantization or DEFAULT_QUANTIZATION[to]
    allowed = QUANTIZATIONS if to == "ctranslate2" else ("float32", "float16")
    if quantization not in allowed:
        raise ExportError(f"--quantization {quantization!r} for --to {to}: one of {', '.join(allowed)}")
    return quantization


def export_adapter(
    adapter: str,
    to: str,
    out: Path | None = None,
    quantization: str | None = None,
    language: str | None = None,
    base: str | None = None,
    cache_dir: Path = Path("artifacts/models"),
    storage: StorageOptions | None = None,
) -> tuple[Path, ExportRecord]:
    """Export ``adapter`` (a published adapter directory or a checkpoint's, local or ``s3://``) as ``to``.
    Returns the output directory (default ``artifacts/exports/<lang>-<name>-<to>[-<quantization>]``) and its record.
    """
    quantization = check_request(to, quantization)
    location = open_location(adapter, storage)
    with tempfile.TemporaryDirectory(prefix="export-") as work:
        source = find_source(location, Path(work) / "adapter", language, base)
        suffix = f"-{quantization}" if to == "ctranslate2" else ""
        name = location.name if location.name != ADAPTER_DIR else location.parent.name
        out = out or Path("artifacts/exports") / f"{source.language}-{name}-{to}{suffix}"
        if out.exists() and any(out.iterdir()):
            raise ExportError(f"{out} exists and is not empty: choose another --out")
        try:
            resolved = resolve_base_model(
                source.base, cache_dir, expected_sha256=source.pinned_sha256, revision=source.pinned_revision
            )
        except ModelMismatch as exc:
            raise ExportError(f"the adapter was trained on other weights: {exc}") from None
        log.info("merging %s into %s (float32)", source.uri, resolved.spec)
        model = merged_model(resolved.path, source.directory, source.language)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            extra = {}
            if to == "merged":
                save_merged(model, resolved.path, staging, getattr(torch, quantization))
            else:
                merged_dir = Path(work) / "merged"
                save_merged(model, resolved.path, merged_dir, torch.float32)
                del model
                log.info("converting to CTranslate2 (%s)", quantization)
                extra["ctranslate2"] = convert_ctranslate2(merged_dir, staging, quantization)
            record = ExportRecord(
                format=to,
                quantization=quantization,
                language=source.language,
                task=TASK,
                adapter=source.uri,
                adapter_files=adapter_files(open_location(str(source.directory))),
                base_model=BaseModelRecord(id=resolved.spec, sha256=resolved.sha256, revision=resolved.revision),
                files=_files(staging),
                versions=_versions(**extra),
                created=now(),
            )
            (staging / RECORD).write_text(record.model_dump_json(indent=2) + "\n")
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s → %s", source.uri, out)
    return out, record
