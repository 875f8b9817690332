"""``report.md`` and its plots, rendered from a manifest alone."""

from __future__ import annotations

import io
import math

from matplotlib.image import imread

from tests.builders import TRIAL_TIME, ZERO_SHOT, failed, outcome
from whisper_lora.manifest import (
    AttachedFile,
    BaseModelRecord,
    EvalSet,
    FileRecord,
    HistoryPoint,
    Manifest,
    PublishedAdapter,
    Scores,
    Scoring,
)
from whisper_lora.report import BEST_VS_ZERO_SHOT, CURVES, HEATMAP, error_grid, markdown, report_files

PNG = b"\x89PNG\r\n\x1a\n"


def _manifest(**hindi) -> Manifest:
    trials = [
        outcome("a", "hi", 8, 0.40, lr=1e-3),
        outcome("b", "hi", 8, 0.30, lr=3e-4, step=6),
        outcome("c", "ta", 32, 0.20),
        failed("d", "ta", 8, "RuntimeError: out of memory\nTraceback ..."),
    ]
    entry = PublishedAdapter(
        language="hi", metric="wer", value=0.3, wer=0.3, cer=0.15, raw_wer=0.3, zero_shot=ZERO_SHOT,
        eval=EvalSet(split="dev", utterances=2), rank=8, alpha=16, learning_rate=3e-4, target_modules=["q_proj"],
        train_steps=6, trial_id="b", base_sha256="0" * 64, adapter="/p/x/adapters/hi/b-0",
        files={"adapter_model.safetensors": FileRecord(sha256="1" * 64, bytes=10)}, created="now", **hindi,
    )  # fmt: skip
    return Manifest(
        experiment="x",
        created="now",
        base_model=BaseModelRecord(id="tiny", sha256="0" * 64),
        languages={"hi": entry},
        trials=[t.summary() for t in trials],
    )


TESTED = {
    "test": Scores(primary=0.35, wer=0.35, cer=0.18, raw_wer=0.4),
    "zero_shot_test": Scores(primary=1.4, wer=1.4, cer=1.1, raw_wer=1.4),
    "test_scoring": Scoring(split="test", utterances=3, precision="float32", device="cpu"),
    "config": AttachedFile(name="configs/0123456789ab.yaml", sha256="2" * 64, bytes=100),
}


def _with_histories(manifest: Manifest) -> Manifest:
    def curve(trial_id: str, final: float) -> list[HistoryPoint]:
        training = [HistoryPoint(step=s, loss=3.0 / s, learning_rate=1e-3) for s in range(1, 7)]
        return [*training, HistoryPoint(step=3, loss=1.0, primary=final + 0.2), HistoryPoint(step=6, primary=final)]

    trials = [t.model_copy(update={"history": curve(t.trial_id, t.primary)}) if t.primary else t
              for t in manifest.trials]  # fmt: skip
    return manifest.model_copy(update={"trials": trials})


def test_grid_marks_failed_cells_and_keeps_the_best_rate_per_rank():
    languages, ranks, grid = error_grid(_manifest().trials)
    assert (languages, ranks) == (["hi", "ta"], [8, 32])
    assert grid[0, 0] == 0.30 and math.isnan(grid[1, 0]) and grid[1, 1] == 0.20


def test_report_shows_dev_and_test_scores_and_says_where_each_comes_from():
    files = report_files(_manifest(**TESTED))
    assert files[HEATMAP].startswith(PNG) and files[BEST_VS_ZERO_SHOT].startswith(PNG)
    text = files["report.md"].decode()
    assert "| zero-shot dev | adapter dev | zero-shot test | adapter test | WER dev / test | CER dev / test |" in text
    assert "| hi | WER | 1.500 | 0.300 | 1.400 | 0.350 | 0.300 / 0.350 | 0.150 / 0.180 | 8 | 0.0003 | 6 | b |" in text
    config = "[configs/0123456789ab.yaml](configs/0123456789ab.yaml)"
    assert f"| hi | dev (2) | test (3) | basic | float32 | cpu | {config} |" in text
    assert "**dev**: the eval split" in text and "**test**: the held-out split" in text
    assert "| b | hi | 8 | 0.0003 | 0.300 | 6 | ok |" in text
    assert "| d | ta | 8 | 0.001 | - | - | failed: RuntimeError: out of memory |" in text


def test_report_names_each_normaliser_when_the_scores_used_different_ones():
    indic_test = {**TESTED, "test": TESTED["test"].model_copy(update={"normalizer": "indic"})}
    text = report_files(_manifest(**indic_test))["report.md"].decode()
    assert "adapter dev: basic, zero-shot dev: basic, adapter test: indic, zero-shot test: basic" in text


def test_training_curves_are_drawn_per_language_from_the_trials_histories():
    files = report_files(_with_histories(_manifest(**TESTED)))
    image = imread(io.BytesIO(files[CURVES]), format="png")
    assert files[CURVES].startswith(PNG) and image.shape[1] > image.shape[0]  # a column per language (2)
    assert f"![training curves]({CURVES})" in files["report.md"].decode()


def test_a_manifest_from_before_test_scores_and_curves_still_renders():
    files = report_files(_manifest())  # schema 2: no histories, no test scores, no config
    text = files["report.md"].decode()
    assert CURVES not in files and CURVES not in text
    assert "| hi | WER | 1.500 | 0.300 | - | - | 0.300 / - | 0.150 / - |" in text
    assert "| hi | dev (2) | not scored | basic | - | - | - |" in text
    assert files[BEST_VS_ZERO_SHOT].startswith(PNG)
    assert "time went" not in text  # before schema 4: no trial carries its time


def _with_times(manifest: Manifest) -> Manifest:
    """Trial b took twice the builders' split and ran in two attempts; the failed trial d has none."""
    twice = TRIAL_TIME.model_copy(update={n: 2 * v for n, v in TRIAL_TIME.model_dump().items()} | {"runs": 1})
    times = {"a": TRIAL_TIME, "b": twice, "c": TRIAL_TIME}
    trials = [t.model_copy(update={"time": times.get(t.trial_id)}) for t in manifest.trials]
    return manifest.model_copy(update={"trials": trials})


def test_report_says_where_each_trials_time_went_and_the_columns_sum_to_the_wall():
    text = markdown(_with_times(_manifest()))
    section = text[text.index("## Where the trials' time went") :]
    assert "| wall | start-up (Tune / Train / model / data) | compute | data wait | evaluation |" in section
    # 100 = 31 start-up + 40 compute + 1 data wait + 20 evaluation + 3 checkpoint + 5 bookkeeping
    assert "| a | hi | 8 | 0.001 | 100 | 31 (2 / 20 / 8 / 1) | 40 | 1 | 20 | 3 | 5 (2 / 2 / 1) | 40% |" in section
    assert "| b | hi | 8 | 0.0003 | 200 | 62 (4 / 40 / 16 / 2) | 80 | 2 | 40 | 6 | 10 (4 / 4 / 2) | 40% |" in section
    assert "| all 3 | | | | 400 | 124 (8 / 80 / 32 / 4) | 160 | 4 | 80 | 12 | 20 (8 / 8 / 4) | 40% |" in section
    assert "| d |" not in section and "Restarted (their phases add up every attempt): b." in section
    for row in (line for line in section.splitlines() if line.startswith(("| a ", "| b ", "| all"))):
        cells = row.split("|")[5:-2]
        wall, parts = float(cells[0]), [float(cell.split()[0]) for cell in cells[1:]]
        assert sum(parts) == wall
