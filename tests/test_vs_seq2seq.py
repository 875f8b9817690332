"""``benchmarks/vs_seq2seq_trainer.py``: both sides of the race run end to end on a tiny model and report curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import benchmark_module, write_clip, write_prepared_split
from whisper_lora.data.features import Featurizer

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_seq2seq_trainer.py"
SENTENCES = ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह", "तेरह चौदह", "पंद्रह सोलह", "सत्रह अठारह",
             "उन्नीस बीस", "इक्कीस बाईस", "तेईस चौबीस"]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (its dataclasses need it in ``sys.modules``)."""
    with benchmark_module("vs_seq2seq_trainer") as module:
        yield module


def _write_prepared(root: Path, model_dir: str) -> Path:
    """A prepared Hindi corpus as ``prepare`` lays it out, featurized by the product's ``Featurizer``: ten train
    rows, three dev rows."""
    featurizer = Featurizer(model_dir)
    prepared = root / "prepared"
    for split, sentences in (("train", SENTENCES), ("dev", SENTENCES[:3])):
        examples = []
        for index, sentence in enumerate(sentences):
            clip = write_clip(root / "clips" / f"{split}{index}.mp3", 0.5 + 0.1 * index)
            examples.append(featurizer.example(clip.read_bytes(), sentence, "hi"))
        write_prepared_split(prepared, "hi", split, examples)
    return prepared


def test_time_to_reach_interpolates_between_evaluations(bench):
    curve = [{"train_s": 10.0, "wer": 1.0}, {"train_s": 30.0, "wer": 0.6}, {"train_s": 50.0, "wer": 0.2}]
    assert bench.time_to_reach(curve, 0.8) == 20.0
    assert bench.time_to_reach(curve, 0.2) == 50.0
    assert bench.time_to_reach(curve, 1.5) == 10.0
    assert bench.time_to_reach(curve, 0.1) is None


def test_samples_seen_counts_the_short_last_batch_of_each_epoch(bench):
    assert bench._samples_seen(2, 10, 8) == 10
    assert bench._samples_seen(3, 10, 8) == 18
    assert bench._samples_seen(1, 10, 8) == 8


def test_verdict_follows_the_issue_goal(bench):
    recipe = {"train_s": 600.0, "final_wer": 1.0}
    start = {"zero_shot_wer": 1.5}
    assert bench.verdict(recipe, {**start, "reaches_other_s": 150.0, "final_wer": 0.8})["met"]
    assert bench.verdict(recipe, {**start, "reaches_other_s": 400.0, "final_wer": 0.5})["met"]
    assert not bench.verdict(recipe, {**start, "reaches_other_s": 400.0, "final_wer": 0.6})["met"]
    assert not bench.verdict(recipe, {**start, "reaches_other_s": None, "final_wer": 1.2})["met"]
    # the recipe never got below where the project started: reaching it at once wins nothing
    trivial = bench.verdict(recipe, {"zero_shot_wer": 1.0, "reaches_other_s": 3.0, "final_wer": 0.9})
    assert not trivial["met"] and not trivial["time_counts"]


@pytest.mark.timeout(300)
def test_race_reports_both_sides(tmp_path, tiny_model_dir):
    """Both sides train on the same rows for the budget and score the same dev rows (the project's encoder cache
    built in its own process: no Ray to start)."""
    prepared = _write_prepared(tmp_path, tiny_model_dir)
    budget = 8
    out = tmp_path / "race.json"
    command = [
        sys.executable, str(BENCHMARK), "--base", tiny_model_dir, "--prepared", str(prepared),
        "--budget-s", str(budget), "--eval-every-s", "4", "--recipe-precision", "fp32", "--rank", "4", "--threads", "1",
        "--json", str(out), f"model.cache_dir={tmp_path / 'models'}", f"publish.storage={tmp_path / 'published'}",
        "--encoder-cache", "in-process", f"data.source.path={tmp_path}", "data.languages=[hi]", "train.batch_size=2",
    ]  # fmt: skip
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, env=env, cwd=BENCHMARK.parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dev_utterances"] == 3
    for side in ("recipe", "project"):
        figures = result["sides"][side]
        curve = figures["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == figures["steps"]
        assert [point["train_s"] for point in curve] == sorted(point["train_s"] for point in curve)
        assert curve[-1]["train_s"] >= budget and figures["train_s"] >= budget
        assert figures["final_wer"] == curve[-1]["wer"] >= 0 and figures["peak_rss_gib"] > 0
        if figures["steps"]:
            assert len(curve) >= 2 and figures["samples"] >= figures["steps"] and figures["samples_per_s"] > 0
        else:  # no step starts after the budget: only a setup (the project's encoder cache) outlasting it trains none
            assert side == "project" and figures["setup_s"] >= budget and len(curve) == 1
    assert result["sides"]["recipe"]["settings"] == {
        "rank": 32, "alpha": 64, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "batch_size": 8,
        "learning_rate": 1e-3, "warmup_steps": 50, "precision": "fp32",
    }  # fmt: skip
    project = result["sides"]["project"]
    assert project["settings"]["rank"] == 4 and project["settings"]["decoder_only"]
    assert project["encode_s"] > 0 and project["setup_s"] >= project["encode_s"]
    assert set(result["verdict"]) == {"time_ratio", "time_counts", "wer_ratio", "met"}
    assert "recipe (fp32)" in done.stdout and "s to reach the other's final WER" in done.stdout
