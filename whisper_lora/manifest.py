"""The published manifest, typed: what ``publish`` writes and ``report``, ``transcribe`` and the next publish
read. One ``manifest.json`` per experiment, beside ``adapters/<lang>/<name>/`` (see ``whisper_lora.publish``).

Versions: 4 is this schema; it adds each trial's ``time`` (where its wall time went), and 3 reads as 4 without it.
2 lacks what 3 added (test-split scores of each adapter and of its zero-shot base, how they were scored, the
normaliser named beside every score, the resolved run config, the trials' curves) and reads as 3 with those absent
(its scores all came from the ``basic`` normaliser); 1 (before it was typed) also lacks the trials' ``best_step``
and ``error``. A manifest from a newer whisper-lora is refused with a clear error
rather than half-understood: a downstream job must not act on fields it cannot see. A field added within version 3
(the trials' ``nodes``) has a default, so a manifest written before it reads as it always did; a whisper-lora
from before it refuses a manifest that has it, naming the field (no field is ever ignored), as it would refuse a
newer version. Version 4 adds each trial's time split (``TrialTime``: start-up, compute, data wait, evaluation,
checkpointing, bookkeeping); 3 reads as 4 with ``time`` null.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from whisper_lora.storage import Location

MANIFEST = "manifest.json"
SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
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
    normalizer: str = "basic"
    """The text normaliser WER and CER were computed after (``eval.normalizer``: ``basic`` or ``indic``)."""
    precision: str | None = None
    """The precision the transcripts were decoded in (``int8``, ``bf16``, ``fp16``, ``fp32``: the adapters' training
    precision, ``train.precision.scoring_precision``); None for scores from before it was recorded."""
    device: str | None = None
    """Where they were decoded: ``cpu (N cores)`` or ``cuda (<accelerator>)``; None before it was recorded."""

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Scores:
        """The scores among a larger mapping (a Ray report, an ``evaluate`` result); fields with a default may be
        absent (a report from before the field existed)."""
        return cls(**{name: values[name] for name, field in cls.model_fields.items() if _given(values, name, field)})


def _given(values: Mapping[str, Any], name: str, field: FieldInfo) -> bool:
    """Whether ``values`` holds ``name``; a missing or NaN (Tune's table) value is allowed where there is a default."""
    value = values.get(name)
    absent = value is None or (isinstance(value, float) and value != value)
    return not (absent and not field.is_required())


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
    revision: str | None = None
    """The hub commit of the weights when ``id`` is a hub id (what a published adapter_config.json names)."""


class EvalSet(_Record):
    split: str
    utterances: int


class Scoring(EvalSet):
    """How an adapter and its zero-shot base were scored on the test split: one loader
    (``models.inference``), so one precision and device for both."""

    precision: str
    """Weights' dtype while decoding, e.g. ``float32`` (CPU) or ``float16`` (GPU)."""
    device: str
    """``cpu``, or ``cuda`` and the accelerator's name."""


class AttachedFile(_Record):
    """A file published beside the manifest, named relative to the experiment directory."""

    name: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, name: str, data: bytes) -> AttachedFile:
        return cls(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


class SelectedAdapter(_Record):
    """A language's winning trial, before its adapter is uploaded."""

    language: str
    metric: str
    value: float
    """The primary metric on the eval (dev) split: what selection and ``keeps_previous`` compare."""
    wer: float
    cer: float
    raw_wer: float
    normalizer: str = "basic"
    """The text normaliser of ``value``, ``wer`` and ``cer`` (the trial's evaluation)."""
    zero_shot: Scores
    """The base model on the eval split."""
    eval: EvalSet
    rank: int
    alpha: int
    learning_rate: float
    target_modules: list[str] | str
    train_steps: int
    trial_id: str
    base_sha256: str
    test: Scores | None = None
    """The adapter on the held-out test split, scored once after selection; None when there was none to score."""
    zero_shot_test: Scores | None = None
    """The base model on the same test utterances, in the same precision and on the same device."""
    test_scoring: Scoring | None = None
    """Split, utterances, precision and device of ``test`` and ``zero_shot_test``."""
    config: AttachedFile | None = None
    """The fully resolved run config that trained this adapter (``configs/<sha12>.yaml`` beside the manifest)."""
    precision: str | None = None
    """The precision ``value``, ``wer`` and ``cer`` were decoded in (the trial's evaluation: its training
    precision); None before it was recorded."""
    device: str | None = None
    """Where the trial evaluated; None before it was recorded."""

    def unlike_comparisons(self) -> list[str]:
        """Each split on which the adapter and its zero-shot base were decoded in different precisions: that
        "improvement" mixes quantisation with adaptation. Empty when both sides agree or one predates the record."""
        pairs = {"dev": (self.precision, self.zero_shot.precision)}
        if self.test and self.zero_shot_test:
            pairs["test"] = (self.test.precision, self.zero_shot_test.precision)
        return [
            f"{split}: adapter decoded in {adapter}, zero-shot base in {base}"
            for split, (adapter, base) in pairs.items()
            if adapter and base and adapter != base
        ]

    def keeps(self, previous: PublishedAdapter | None) -> bool:
        """Whether ``previous`` stays published instead of this: at least as good on the same base model,
        metric, eval set and normaliser."""
        if previous is None:
            return False
        same_ground = (previous.base_sha256, previous.metric, previous.eval, previous.normalizer) == (
            self.base_sha256,
            self.metric,
            self.eval,
            self.normalizer,
        )
        return same_ground and previous.value <= self.value


class PublishedAdapter(SelectedAdapter):
    """A selected adapter once uploaded: where it is and the hash of every file."""

    adapter: str
    """The adapter directory's URI (a path or ``s3://…``)."""
    files: dict[str, FileRecord]
    created: str
    card: FileRecord | None = None
    """The model card (``README.md``) beside the adapter files, hashed apart from them: ``files`` is what is
    loaded and verified; None for adapters published before cards."""


class HistoryPoint(_Record):
    """One report of a trial: a training row (loss, learning rate) or an evaluation (also ``primary``)."""

    step: int
    loss: float | None = None
    """Mean training loss since the previous report."""
    learning_rate: float | None = None
    primary: float | None = None
    """The primary metric on the eval split; None on training rows."""


class TrialTime(_Record):
    """Where a trial's wall time went, in seconds (rank 0 of its Train run; ``tune.select.trial_time`` builds it).
    The phases are disjoint and sum to ``wall``; a trial Tune ran more than once (retried, or continued by a resumed
    sweep) sums its runs, a Train run restarted after a failure sums its attempts."""

    wall: float
    """From Tune's trial actor beginning a run to the trial's last report, summed over runs; a run that never sent
    that report (failed, stopped by ASHA) counts from its workers' first stamp to their last report."""
    tune_startup: float
    """Tune's trial actor → the trial function's body (the actor's setup, ``with_parameters`` objects fetched)."""
    train_startup: float
    """Trial body → the first worker loop entered: trial config, ``build_trainer`` (row count, encoder cache), the
    Train controller, its placement group, the worker group and its process group."""
    model_load: float
    """Loop entry → base model, adapter, optimizer built (and a checkpoint restored), in every attempt."""
    dataset: float
    """Then → the train split's reader ready, in every attempt."""
    compute: float
    """Optimizer steps: collate, forward, backward, optimizer (``StepResult.seconds`` summed)."""
    data_wait: float
    """The loop waiting for its next batches."""
    evaluation: float
    """Decoding the eval split and scoring it."""
    checkpoint: float
    """Saving checkpoints and the ``ray.train.report`` that hands each to Ray (and Tune)."""
    reporting: float
    """Training-curve reports and preemption checks: Ray Train collectives without a checkpoint."""
    teardown: float
    """The last attempt's loop end → the Train run returned to the trial (worker group and controller shut down)
    and the trial reported."""
    other: float
    """The rest, never negative: the loop's own overhead (an epoch's order, logging), a worker group restarting,
    what a failed attempt did after its last report."""
    attempts: int = 1
    """Worker-group attempts seen (more than one: Train restarted it, or Tune ran the trial again)."""
    runs: int = 1
    """Runs of the trial that ended with its own last report."""

    @property
    def startup(self) -> float:
        """Everything before the first optimizer step: Tune, Train, model and dataset start-up."""
        return self.tune_startup + self.train_startup + self.model_load + self.dataset

    @property
    def bookkeeping(self) -> float:
        """Neither start-up nor training, evaluation or checkpoints: reports, teardown and the rest."""
        return self.reporting + self.teardown + self.other

    @property
    def compute_share(self) -> float:
        """The share of the wall time that was optimizer compute."""
        return self.compute / self.wall if self.wall > 0 else 0.0


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
    history: list[HistoryPoint] = Field(default_factory=list)
    """The trial's curve, down-sampled (``tune.select.MAX_HISTORY`` points); empty before schema 3."""
    nodes: list[str] = Field(default_factory=list)
    """Ray node ids its Train run's rank 0 reported from, in order of first report (more than one: it was
    restarted elsewhere); empty for manifests written before nodes were recorded."""
    time: TrialTime | None = None
    """Where the trial's wall time went; None before schema 4 (or when its reports carry no clock)."""


def timed_trials(trials: Iterable[TrialSummary]) -> list[TrialSummary]:
    """The trials that carry their time (schema 4), by language, rank and learning rate: as report.md and the
    console list them."""
    return sorted((t for t in trials if t.time), key=lambda t: (t.language, t.rank, t.learning_rate))


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
