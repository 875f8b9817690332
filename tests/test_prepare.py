"""``whisper-lora prepare`` and ``evaluate`` (zero-shot) through the CLI, on a tiny model and a tiny release."""

import json

import pytest

from tests.builders import write_clip, write_common_voice
from whisper_lora.cli import main
from whisper_lora.config import load_config
from whisper_lora.data.prepared import iter_batches, split_dir
from whisper_lora.prepare import ensure_prepared

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
SENTENCE = "यह एक छोटा वाक्य है"


def test_prepare_writes_partitions_and_stats_then_zero_shot_scores(ray_local, tiny_model_dir, tmp_path, capsys):
    clips = tmp_path / "cv" / "hi" / "clips"
    rows = []
    for index in range(5):
        write_clip(clips / f"c{index}.mp3", 1.0 + index * 0.2)
        rows.append((f"c{index}.mp3", SENTENCE))
    write_common_voice(
        tmp_path / "cv", "hi", {"train": [*rows, ("gone.mp3", SENTENCE)], "dev": rows[:2], "test": rows[:3]}
    )
    overrides = [
        f"data.source.path={tmp_path}/cv",
        "data.languages=hi",
        f"model.base={tiny_model_dir}",
        f"output_dir={tmp_path}/runs",
        "experiment=t",
        "data.batch_size=2",
    ]
    assert main(["prepare", *overrides]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["rows_in"], printed["rows_out"]) == (11, 10)
    prepared = tmp_path / "runs" / "t" / "prepared"
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["groups"]["hi/train"]["dropped"] == {"missing_audio": 1}
    assert stats["model"]["path"] == tiny_model_dir and stats["audio_seconds_per_second"] > 0
    batches = list(iter_batches(split_dir(prepared, "hi", "train"), batch_size=2))
    assert sum(len(b["id"]) for b in batches) == 5
    assert [f.shape for f in batches[0]["input_features"]] == [(80, 102), (80, 122)]
    assert list(iter_batches(split_dir(prepared, "hi", "train"), batch_size=2, limit=3))[-1]["id"].size == 1

    reused = ensure_prepared(load_config(None, overrides))
    assert reused == stats  # same config, model and source files
    write_clip(clips / "c0.mp3", 3.0)  # the corpus changes at the same path
    assert ensure_prepared(load_config(None, overrides))["source_fingerprint"] != stats["source_fingerprint"]

    assert main(["evaluate", *overrides, "eval.batch_size=2"]) == 0
    scores = json.loads((tmp_path / "runs" / "t" / "scores_test_zero-shot.json").read_text())
    assert scores["languages"]["hi"]["utterances"] == 3
    assert scores["languages"]["hi"]["wer"] >= 0.0 and len(scores["languages"]["hi"]["samples"]) == 3


def test_bad_config_exits_2_with_a_message_naming_the_field(tmp_path, capsys):
    assert main(["prepare", f"data.source.path={tmp_path}", "data.languages=mr,zz"]) == 2
    assert "data.languages: unknown language code 'zz'" in capsys.readouterr().err
