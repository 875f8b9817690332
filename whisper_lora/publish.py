"""Publishing selected adapters to shared storage (a local/NFS directory or ``s3://``) under one manifest.

Layout under ``<storage>/<experiment>/``::

    manifest.json                          the only thing a reader needs; written last
    adapters/<lang>/<trial_id>-<sha12>/    peft directory (adapter_config.json, adapter_model.safetensors)
    report.md, *.png                       the sweep at a glance

Adapter directories are never overwritten (their names carry the weights' hash), and the manifest is replaced in
one step (rename on a filesystem, a single PUT on S3) only after every file it names is complete: a reader sees
the old manifest or the new one, never one pointing at a partial adapter, and an interrupted publish leaves the
previous manifest valid. A language keeps its published adapter when the new one scores worse on the same base
model and eval set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from whisper_lora.config import JobConfig, PublishConfig
from whisper_lora.languages import get_language
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.report import write_report
from whisper_lora.tune.select import TrialOutcome

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHUNK = 8 << 20


@dataclass(frozen=True)
class Storage:
    """A filesystem and a root path inside it (no scheme)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url(self, *parts: str) -> str:
        """What the manifest records: the location as a user writes it (``s3://…`` or an absolute path)."""
        return "/".join([self.uri.rstrip("/"), *parts])


def open_storage(uri: str, s3_endpoint: str | None = None, s3_region: str | None = None) -> Storage:
    """``s3://bucket/prefix`` (credentials from the environment) or a local/NFS directory."""
    if uri.startswith("s3://"):
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        options: dict = {"region": s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")}
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            options.update(endpoint_override=host or endpoint, scheme=scheme or "https")
        fs = pafs.S3FileSystem(**{key: value for key, value in options.items() if value})
        return Storage(fs, uri.removeprefix("s3://").rstrip("/"), uri.rstrip("/"))
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
        return Storage(fs, root, uri.rstrip("/"))
    root = str(Path(uri).expanduser().resolve())
    return Storage(pafs.LocalFileSystem(), root, root)


def storage_of(config: PublishConfig) -> Storage:
    return open_storage(config.storage, config.s3_endpoint, config.s3_region)


def read_json(storage: Storage, path: str) -> dict | None:
    """A JSON file at ``path`` inside ``storage``'s filesystem, or None when there is none."""
    if storage.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with storage.fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


def read_manifest(storage: Storage, experiment: str) -> dict | None:
    return read_json(storage, storage.path(experiment, MANIFEST))


def write_bytes(storage: Storage, path: str, data: bytes) -> None:
    storage.fs.create_dir(path.rpartition("/")[0], recursive=True)
    with storage.fs.open_output_stream(path) as stream:
        stream.write(data)


def write_manifest(storage: Storage, experiment: str, manifest: dict) -> None:
    """Replace the manifest in one step: rename of a complete temporary file locally, one PUT on S3."""
    data = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
    final = storage.path(experiment, MANIFEST)
    if isinstance(storage.fs, pafs.LocalFileSystem):
        temporary = f"{final}.partial-{uuid.uuid4().hex}"
        write_bytes(storage, temporary, data)
        os.replace(temporary, final)
    else:
        write_bytes(storage, final, data)


def adapter_files(storage: Storage, directory: str) -> dict[str, dict]:
    """``{name: {sha256, bytes}}`` of a peft directory's files."""
    files = {}
    for name in ADAPTER_FILES:
        digest, size = hashlib.sha256(), 0
        with storage.fs.open_input_stream(f"{directory}/{name}") as reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        files[name] = {"sha256": digest.hexdigest(), "bytes": size}
    return files


def copy_adapter(source: Storage, source_dir: str, target: Storage, target_dir: str) -> None:
    target.fs.create_dir(target_dir, recursive=True)
    for name in ADAPTER_FILES:
        with (
            source.fs.open_input_stream(f"{source_dir}/{name}") as reader,
            target.fs.open_output_stream(f"{target_dir}/{name}") as writer,
        ):
            while chunk := reader.read(CHUNK):
                writer.write(chunk)


def keeps_previous(previous: dict | None, candidate: dict) -> bool:
    """A published entry stays when it is at least as good on the same base model, metric and eval set."""
    if previous is None:
        return False
    same_ground = all(previous.get(key) == candidate.get(key) for key in ("base_sha256", "metric", "eval"))
    return same_ground and previous["value"] <= candidate["value"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def publish_adapter(
    train_storage: Storage, checkpoint_dir: str, target: Storage, experiment: str, language: str, trial_id: str
) -> tuple[str, dict[str, dict]]:
    """Upload one adapter into a directory named by its weights' hash; returns (that name, files with hashes).

    The files are hashed at the source first; a directory that already holds exactly those files (the same
    weights published before) is reused, anything else there (a partial upload) is overwritten. The upload is
    checked against the source hashes before the caller may point a manifest at it.
    """
    source_dir = f"{checkpoint_dir}/adapter"
    files = adapter_files(train_storage, source_dir)
    name = f"{trial_id}-{files['adapter_model.safetensors']['sha256'][:12]}"
    final = target.path(experiment, "adapters", language, name)
    if not _holds(target, final, files):
        copy_adapter(train_storage, source_dir, target, final)
        if not _holds(target, final, files):
            raise OSError(f"upload of {source_dir} to {final} does not match its source")
    return name, files


def _holds(storage: Storage, directory: str, files: dict[str, dict]) -> bool:
    if storage.fs.get_file_info(directory).type != pafs.FileType.Directory:
        return False
    try:
        return adapter_files(storage, directory) == files
    except (FileNotFoundError, OSError):
        return False


def entry_for(
    language: str, outcome: TrialOutcome, base_sha256: str, zero_shot: dict, eval_split: str, target_modules
) -> dict:
    """The manifest entry of a selected trial (before upload: no path and files yet)."""
    best = outcome.best
    return {
        "language": language,
        "metric": get_language(language).primary_metric,
        "value": best["primary"],
        "wer": best["wer"],
        "cer": best["cer"],
        "raw_wer": best["raw_wer"],
        "zero_shot": {key: zero_shot[key] for key in ("wer", "cer", "raw_wer", "primary")},
        "eval": {"split": eval_split, "utterances": best["utterances"]},
        "rank": outcome.rank,
        "alpha": outcome.alpha,
        "learning_rate": outcome.learning_rate,
        "target_modules": target_modules,
        "train_steps": best["step"],
        "trial_id": outcome.trial_id,
        "base_sha256": base_sha256,
    }


def publish_selection(
    config: JobConfig,
    base: ResolvedModel,
    selected: dict[str, TrialOutcome],
    zero_shot: dict[str, dict],
    outcomes: list[TrialOutcome],
) -> dict:
    """Upload each language's selected adapter (unless the published one is at least as good), then the report,
    then the manifest. Returns the manifest."""
    target = storage_of(config.publish)
    train_storage = open_storage(config.train.storage_uri)
    experiment = config.experiment
    previous = read_manifest(target, experiment) or {}
    same_base = previous.get("base_model", {}).get("sha256") == base.sha256
    languages = dict(previous.get("languages", {})) if same_base else {}
    notes = []
    for language, outcome in selected.items():
        candidate = entry_for(
            language,
            outcome,
            base.sha256,
            zero_shot[language],
            config.data.eval_split,
            config.train.lora.target_modules,
        )
        old = languages.get(language)
        if keeps_previous(old, candidate):
            notes.append(
                f"{language}: kept the published adapter ({old['metric']} {old['value']:.3f} ≤ "
                f"{candidate['value']:.3f} of trial {outcome.trial_id})."
            )
            continue
        # Ray Train reports checkpoint paths inside its storage filesystem (absolute locally, bucket/key on S3).
        name, files = publish_adapter(train_storage, outcome.checkpoint, target, experiment, language, outcome.trial_id)
        languages[language] = {
            **candidate,
            "adapter": target.url(experiment, "adapters", language, name),
            "files": files,
            "created": now(),
        }
    failed = [
        {
            "trial_id": o.trial_id,
            "language": o.language,
            "rank": o.rank,
            "learning_rate": o.learning_rate,
            "error": (o.error or "no checkpoint with a score")[:2000],
        }
        for o in outcomes
        if o.failed
    ]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "experiment": experiment,
        "created": now(),
        "base_model": {"id": base.spec, "sha256": base.sha256},
        "languages": dict(sorted(languages.items())),
        "failed_trials": failed,
        "kept_previous": notes,
        "trials": [
            {
                "trial_id": o.trial_id,
                "language": o.language,
                "rank": o.rank,
                "learning_rate": o.learning_rate,
                "alpha": o.alpha,
                "primary": o.best["primary"] if o.best else None,
                "failed": o.failed,
            }
            for o in outcomes
        ],
    }
    with tempfile.TemporaryDirectory() as directory:
        for path in write_report(Path(directory), manifest, outcomes):
            write_bytes(target, target.path(experiment, path.name), path.read_bytes())
    write_manifest(target, experiment, manifest)
    log.info("published %s → %s", ", ".join(sorted(languages)), target.url(experiment, MANIFEST))
    return manifest
