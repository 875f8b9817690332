"""The main job's honest numbers, on a tiny random Whisper run in-process: each published adapter and its zero-shot
base scored on the test split (equal to what ``whisper-lora evaluate --split test`` says of the published
adapter), how they were scored, the trials' curves, and the resolved config published beside the manifest. The job
is the session's ``tracked_job`` (conftest), whose MLflow side test_tracking checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from whisper_lora.cli import main
from whisper_lora.config import load_config
from whisper_lora.manifest import SCHEMA_VERSION, Scores
from whisper_lora.report import CURVES
from whisper_lora.train.precision import device_label

CPU = device_label(torch.device("cpu"))


def _evaluate(capsys, config_file: Path, *arguments: str) -> dict:
    """``whisper-lora evaluate`` as a user runs it; its JSON output."""
    capsys.readouterr()
    assert main(["evaluate", "--config", str(config_file), *arguments]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_test_scores_equal_an_independent_evaluate_of_the_published_adapter(tracked_job, capsys):
    config_file, manifest = tracked_job.config_file, tracked_job.manifest
    assert manifest.schema_version == SCHEMA_VERSION and sorted(manifest.languages) == ["hi", "ta"]
    base = _evaluate(capsys, config_file, "--split", "test")  # the zero-shot base, every language at once
    for language, entry in manifest.languages.items():
        scoring = entry.test_scoring
        assert (scoring.split, scoring.utterances) == ("test", len(tracked_job.sentences[language]) - 1)
        assert (scoring.precision, scoring.device) == ("fp32", CPU)
        # zero-shot and every adapter decoded alike, dev and test (train.precision.scoring_precision)
        assert entry.zero_shot.precision == entry.test.precision == entry.zero_shot_test.precision == "fp32"
        assert entry.unlike_comparisons() == []
        assert entry.eval.utterances == 2  # dev still selects
        assert entry.test.normalizer == entry.zero_shot_test.normalizer == entry.normalizer == "basic"
        adapted = _evaluate(capsys, config_file, "--split", "test", "--adapter", entry.adapter,
                            f"train.language={language}")  # fmt: skip
        assert (adapted["precision"], adapted["device"], adapted["normalizer"]) == ("fp32", CPU, "basic")
        for scores, independent in ((entry.test, adapted), (entry.zero_shot_test, base)):
            alone = independent["languages"][language]
            assert Scores.of(alone) == scores and alone["utterances"] == scoring.utterances


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_resolved_config_is_published_and_referenced(tracked_job):
    config, manifest = tracked_job.config, tracked_job.manifest
    experiment = Path(config.publish.storage) / config.experiment
    records = {entry.config for entry in manifest.languages.values()}
    assert len(records) == 1
    [record] = records
    data = (experiment / record.name).read_bytes()
    assert record.name == f"configs/{hashlib.sha256(data).hexdigest()[:12]}.yaml"
    assert (record.sha256, record.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    assert load_config(experiment / record.name) == config.with_absolute_paths()  # runs again as it ran
    assert (config.run_dir / "config.yaml").read_bytes() == data


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_trials_carry_their_curves_and_the_report_draws_them(tracked_job):
    config, manifest = tracked_job.config, tracked_job.manifest
    # epoch ends evaluate: hi's 4 training rows make 2 batches of 2 per epoch, ta's 3 rows make 1
    evaluated_at = {"hi": [2, 4], "ta": [1, 2, 3, 4]}
    for trial in manifest.trials:
        training = [p for p in trial.history if p.primary is None]
        evaluations = [p for p in trial.history if p.primary is not None]
        assert [p.step for p in training] == [1, 2, 3, 4] and all(p.loss > 0 for p in training)
        assert [p.step for p in evaluations] == evaluated_at[trial.language]
        assert trial.primary == min(p.primary for p in evaluations)
    experiment = Path(config.publish.storage) / config.experiment
    report = (experiment / "report.md").read_text()
    assert (experiment / CURVES).stat().st_size > 0 and CURVES in report
    assert f"| hi | dev (2) | test (3) | basic | fp32 | {CPU} |" in report


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_every_trials_time_is_accounted_for_and_the_report_says_where_it_went(tracked_job):
    from tests.test_select import assert_time_accounted

    config, manifest = tracked_job.config, tracked_job.manifest
    for trial in manifest.trials:
        assert_time_accounted(trial)
        assert trial.time.checkpoint > 0  # the step-2 (hi) and step-1..3 (ta) checkpoints before the last
    report = (Path(config.publish.storage) / config.experiment / "report.md").read_text()
    assert "Where the trials' time went" in report
