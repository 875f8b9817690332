"""``report.md`` and its plots, rendered from a manifest alone."""

from __future__ import annotations

import math

from tests.builders import ZERO_SHOT, failed, outcome
from whisper_lora.manifest import BaseModelRecord, EvalSet, FileRecord, Manifest, PublishedAdapter
from whisper_lora.report import BEST_VS_ZERO_SHOT, HEATMAP, error_grid, report_files

PNG = b"\x89PNG\r\n\x1a\n"


def _manifest() -> Manifest:
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
        files={"adapter_model.safetensors": FileRecord(sha256="1" * 64, bytes=10)}, created="now",
    )  # fmt: skip
    return Manifest(
        experiment="x",
        created="now",
        base_model=BaseModelRecord(id="tiny", sha256="0" * 64),
        languages={"hi": entry},
        trials=[t.summary() for t in trials],
    )


def test_grid_marks_failed_cells_and_keeps_the_best_rate_per_rank():
    languages, ranks, grid = error_grid(_manifest().trials)
    assert (languages, ranks) == (["hi", "ta"], [8, 32])
    assert grid[0, 0] == 0.30 and math.isnan(grid[1, 0]) and grid[1, 1] == 0.20


def test_report_renders_the_published_table_and_every_trial():
    files = report_files(_manifest())
    assert files[HEATMAP].startswith(PNG) and files[BEST_VS_ZERO_SHOT].startswith(PNG)
    text = files["report.md"].decode()
    assert "| hi | WER | 1.500 | 0.300 |" in text
    assert "| b | hi | 8 | 0.0003 | 0.300 | 6 | ok |" in text
    assert "| d | ta | 8 | 0.001 | - | - | failed: RuntimeError: out of memory |" in text
