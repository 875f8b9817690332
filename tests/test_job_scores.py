"""The main job's honest numbers, on a tiny random Whisper run in-process: each published adapter and its zero-shot
base scored on the test split (equal to what ``whisper-lora evaluate --split test`` says of the published
adapter), how they were scored, the trials' curves, and the resolved config published beside the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.builders import write_clip, write_common_voice
from whisper_lora.cli import main
from whisper_lora.config import load_config
from whisper_lora.manifest import Scores
from whisper_lora.report import CURVES
from whisper_lora.train.precision import device_label

CPU = device_label(torch.device("cpu"))
SENTENCES = {"hi": ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह"], "ta": ["ஒன்று இரண்டு", "மூன்று நான்கு", "ஐந்து"]}


@pytest.fixture(scope="module")
def published(ray_local, tiny_model_dir, tmp_path_factory):
    """The job on hi and ta (one rank each, 4 steps, a training row every step); returns its config file, config
    and manifest."""
    from whisper_lora.job import tune_languages

    root = tmp_path_factory.mktemp("job")
    for language, sentences in SENTENCES.items():
        rows = []
        for index, sentence in enumerate(sentences):
            write_clip(root / "cv" / language / "clips" / f"{language}{index}.mp3", 1.0 + 0.2 * index)
            rows.append((f"{language}{index}.mp3", sentence))
        # the test split has its own utterances, a different count from dev's
        write_common_voice(root / "cv", language, {"train": rows, "dev": rows[:2], "test": rows[1:]})
    overrides = [
        f"data.source.path={root}/cv", "data.languages=hi,ta", f"model.base={tiny_model_dir}",
        f"model.cache_dir={root}/models", f"output_dir={root}/runs", f"train.storage_path={root}/ray",
        f"publish.storage={root}/published", "experiment=scores", "train.batch_size=2", "train.max_steps=4",
        "train.warmup_steps=1", "train.learning_rate=1e-2", "train.gradient_checkpointing=false",
        "train.freeze_encoder=true", "train.log_every_steps=1", "train.eval_every_steps=2", "eval.batch_size=2",
        "tune.ranks=2",
    ]  # fmt: skip
    config_file = root / "job.yaml"
    config_file.write_text(yaml.safe_dump(load_config(None, overrides).model_dump(mode="json")))
    config = load_config(config_file)
    return config_file, config, tune_languages(config)


def _evaluate(capsys, config_file: Path, *arguments: str) -> dict:
    """``whisper-lora evaluate`` as a user runs it; its JSON output."""
    capsys.readouterr()
    assert main(["evaluate", "--config", str(config_file), *arguments]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_test_scores_equal_an_independent_evaluate_of_the_published_adapter(published, capsys):
    config_file, _, manifest = published
    assert manifest.schema_version == 3 and sorted(manifest.languages) == ["hi", "ta"]
    for language, entry in manifest.languages.items():
        scoring = entry.test_scoring
        assert (scoring.split, scoring.utterances) == ("test", len(SENTENCES[language]) - 1)
        assert (scoring.precision, scoring.device) == ("fp32", CPU)
        # zero-shot and every adapter decoded alike, dev and test (train.precision.scoring_precision)
        assert entry.zero_shot.precision == entry.test.precision == entry.zero_shot_test.precision == "fp32"
        assert entry.unlike_comparisons() == []
        assert entry.eval.utterances == 2  # dev still selects
        assert entry.test.normalizer == entry.zero_shot_test.normalizer == entry.normalizer == "basic"
        adapted = _evaluate(capsys, config_file, "--split", "test", "--adapter", entry.adapter,
                            f"train.language={language}")  # fmt: skip
        base = _evaluate(capsys, config_file, "--split", "test")
        assert (adapted["precision"], adapted["device"], adapted["normalizer"]) == ("fp32", CPU, "basic")
        for scores, independent in ((entry.test, adapted), (entry.zero_shot_test, base)):
            alone = independent["languages"][language]
            assert Scores.of(alone) == scores and alone["utterances"] == scoring.utterances


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_resolved_config_is_published_and_referenced(published):
    _, config, manifest = published
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
def test_trials_carry_their_curves_and_the_report_draws_them(published):
    _, config, manifest = published
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
