"""Which trial each language publishes, and which checkpoint of a trial."""

from __future__ import annotations

from tests.builders import failed, outcome
from whisper_lora.tune.select import select_best, trial_outcome


def test_selection_takes_the_lowest_metric_and_ties_go_to_the_smaller_rank():
    outcomes = [
        outcome("a", "hi", 8, 0.40),
        outcome("b", "hi", 32, 0.35),
        outcome("c", "ta", 32, 0.20),
        outcome("d", "ta", 8, 0.20),
        failed("e", "ta", 4, "RuntimeError: boom"),
    ]
    selected = select_best(outcomes)
    assert selected["hi"].trial_id == "b"
    assert selected["ta"].trial_id == "d"
    assert outcomes[-1].failed


def test_trial_outcome_uses_the_best_checkpointed_report():
    reports = [
        {"step": 2, "primary": 0.5, "wer": 0.5, "cer": 0.2, "raw_wer": 0.5, "utterances": 2, "checkpoint_path": "/c/2"},
        {
            "step": 4.0,
            "primary": 0.3,
            "wer": 0.3,
            "cer": 0.1,
            "raw_wer": 0.3,
            "utterances": 2.0,
            "checkpoint_path": "/c/4",
        },
        {"step": 4, "primary": 0.1, "loss": 1.0},  # no checkpoint with it: not selectable
    ]
    result = trial_outcome("t1", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None)
    assert result.checkpoint == "/c/4" and result.best.primary == 0.3 and result.alpha == 16
    assert isinstance(result.best.utterances, int) and result.best.step == 4


def test_best_report_skips_deleted_and_preemption_checkpoints_and_prefers_the_later_tie():
    report = {"wer": 0.5, "cer": 0.2, "raw_wer": 0.5, "utterances": 2}
    reports = [
        {**report, "step": 2, "primary": 0.4, "checkpoint_path": "/c/2"},  # deleted by Ray's keep policy
        {**report, "step": 4, "primary": 0.5, "checkpoint_path": "/c/4"},
        {**report, "step": 6, "primary": 0.5, "checkpoint_path": "/c/6"},
        {**report, "step": 7, "primary": 0.5, "checkpoint_path": "/c/7", "checkpoint_reason": "preemption"},
    ]
    result = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None, "/c/2".__ne__)
    assert result.checkpoint == "/c/6" and result.best.step == 6


def test_a_trial_summary_carries_what_the_report_shows():
    summary = outcome("a", "hi", 8, 0.4, step=6).summary()
    assert (summary.primary, summary.best_step, summary.failed, summary.error) == (0.4, 6, False, None)
    broken = failed("b", "hi", 8).summary()
    assert broken.failed and broken.primary is None and broken.error.startswith("RuntimeError")
