"""Publishing selected adapters to shared storage (a local/NFS directory or ``s3://``) under one manifest.

Layout under ``<storage>/<experiment>/``::

    manifest.json                          the only thing a reader needs; written last (``whisper_lora.manifest``)
    adapters/<lang>/<trial_id>-<sha12>/    peft directory (adapter_config.json naming the recorded base,
                                           adapter_model.safetensors, README.md model card: whisper_lora.portable)
    report.md, *.png                       attachments rendered from the manifest (``whisper_lora.report``)

Adapter directories are never overwritten (their names carry the weights' hash), and the manifest is replaced in
one step (rename on a filesystem, a single PUT on S3) only after every file it names is complete: a reader sees
the old manifest or the new one, never one pointing at a partial adapter, and an interrupted publish leaves the
previous manifest valid. A language keeps its published adapter when the new one scores worse on the same base
model and eval set.

Two jobs publishing to one experiment do not lose each other's languages: on a filesystem they take turns (a
lock file beside the manifest); on an object store a publisher re-reads the manifest just before replacing it
and, when another publish landed meanwhile, merges again on top of it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from whisper_lora.manifest import (
    ADAPTER_FILES,
    MANIFEST,
    BaseModelRecord,
    FailedTrial,
    FileRecord,
    Manifest,
    PublishedAdapter,
    SelectedAdapter,
    TrialSummary,
    adapter_files,
    read_manifest,
)
from whisper_lora.portable import CARD, card_record, model_card, portable_copy
from whisper_lora.storage import Location
from whisper_lora.train.checkpoint import ADAPTER_DIR

log = logging.getLogger(__name__)
MERGE_ATTEMPTS = 5
Attachments = Callable[[Manifest], Mapping[str, bytes]]
"""Files written beside the manifest, before it (``report.md`` and plots), rendered from the manifest to be."""


@dataclass(frozen=True)
class Upload:
    """A selected adapter and the checkpoint directory holding it (``<checkpoint>/adapter/``)."""

    selected: SelectedAdapter
    checkpoint: Location


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def publish_adapter(source: Location, target: Location, files: dict[str, FileRecord]) -> None:
    """Upload one adapter directory whose files hash to ``files``, and check the upload against them.

    A ``target`` that already holds exactly these files (the same weights published before) is reused; anything
    else there (a partial upload) is overwritten.
    """
    if _holds(target, files):
        return
    for name in ADAPTER_FILES:
        source.join(name).copy_to(target.join(name))
    if not _holds(target, files):
        raise OSError(f"upload of {source.uri} to {target.uri} does not match its source")


def _holds(directory: Location, files: dict[str, FileRecord]) -> bool:
    if not directory.is_dir():
        return False
    try:
        return adapter_files(directory) == files
    except OSError:
        return False


def publish_selection(
    experiment_dir: Location,
    base_model: BaseModelRecord,
    uploads: list[Upload],
    trials: list[TrialSummary],
    attachments: Attachments = lambda manifest: {},
) -> Manifest:
    """Upload each language's selected adapter (unless the published one is at least as good), then the
    attachments, then the manifest. Returns the manifest."""
    manifest_file = experiment_dir.join(MANIFEST)
    with _turn(experiment_dir):
        for _ in range(MERGE_ATTEMPTS):
            seen = manifest_file.read_bytes() if manifest_file.is_file() else None
            manifest = _merged(experiment_dir, base_model, uploads, trials)
            for name, data in attachments(manifest).items():
                experiment_dir.join(name).replace_with(data)
            if (manifest_file.read_bytes() if manifest_file.is_file() else None) == seen:
                manifest_file.replace_with(manifest.to_json())
                log.info("published %s → %s", ", ".join(sorted(manifest.languages)), manifest_file.uri)
                return manifest
            log.warning("another publish to %s landed meanwhile: merging on top of it", experiment_dir.uri)
    raise OSError(f"{manifest_file.uri} kept changing under {MERGE_ATTEMPTS} attempts to publish")


def _turn(experiment_dir: Location) -> AbstractContextManager:
    """Mutual exclusion of publishers on a filesystem (a lock file); object stores rely on the re-read."""
    if not experiment_dir.is_local:
        return nullcontext()
    Path(experiment_dir.path).mkdir(parents=True, exist_ok=True)
    return FileLock(experiment_dir.join(".manifest.lock").path)


def _merged(
    experiment_dir: Location, base_model: BaseModelRecord, uploads: list[Upload], trials: list[TrialSummary]
) -> Manifest:
    """The manifest this publish makes of the one published now: adapters uploaded where they replace one."""
    previous = read_manifest(experiment_dir)
    same_base = previous is not None and previous.base_model.sha256 == base_model.sha256
    languages = dict(previous.languages) if same_base else {}
    notes = []
    for upload in uploads:
        selected, old = upload.selected, languages.get(upload.selected.language)
        if selected.keeps(old):
            notes.append(
                f"{selected.language}: kept the published adapter ({old.metric} {old.value:.3f} ≤ "
                f"{selected.value:.3f} of trial {selected.trial_id})."
            )
            continue
        with tempfile.TemporaryDirectory(prefix="adapter-") as staging:
            source = portable_copy(upload.checkpoint.join(ADAPTER_DIR), Path(staging), base_model)
            files = adapter_files(source)  # hashed at the source: names the directory, checks the upload
            name = f"{selected.trial_id}-{files['adapter_model.safetensors'].sha256[:12]}"
            target = experiment_dir.join("adapters", selected.language, name)
            publish_adapter(source, target, files)
        card = model_card(selected, base_model, name)
        target.join(CARD).replace_with(card)
        languages[selected.language] = PublishedAdapter(
            **selected.model_dump(), adapter=target.uri, files=files, created=now(), card=card_record(card)
        )
    return Manifest(
        experiment=experiment_dir.name,
        created=now(),
        base_model=base_model,
        languages=dict(sorted(languages.items())),
        failed_trials=[
            FailedTrial(
                trial_id=t.trial_id,
                language=t.language,
                rank=t.rank,
                learning_rate=t.learning_rate,
                error=(t.error or "no checkpoint with a score")[:2000],
            )
            for t in trials
            if t.failed
        ],
        kept_previous=notes,
        trials=trials,
    )
