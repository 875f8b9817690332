"""Which trial each language publishes, and which checkpoint of a trial."""

from __future__ import annotations

import itertools

import pytest

from tests.builders import failed, outcome
from whisper_lora.tune.select import MAX_HISTORY, history_of, select_best, trial_outcome


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


NAN = float("nan")


def _train_row(step: int, loss: float) -> dict:
    """A training report as Tune's table holds it beside evaluations: their keys NaN."""
    evaluation = dict.fromkeys(("primary", "wer", "cer", "raw_wer", "utterances", "checkpoint_path"), NAN)
    return {"report_kind": "train", "step": step, "epoch": 0, "loss": loss, "learning_rate": 1e-3 * step,
            "grad_norm": 1.0, "samples_per_second": 3.0, "data_wait_seconds": 0.1, "checkpoint_reason": NAN,
            **evaluation}  # fmt: skip


def _eval_row(step: int, primary: float, kind: str = "evaluation") -> dict:
    return {"report_kind": kind, "step": step, "epoch": 0, "loss": 1.0, "learning_rate": 1e-3 * step,
            "grad_norm": NAN, "samples_per_second": 3.0, "data_wait_seconds": 0.1, "primary": primary, "wer": primary,
            "cer": primary / 2, "raw_wer": primary, "utterances": 2.0, "checkpoint_path": f"/c/{step}",
            "checkpoint_reason": kind}  # fmt: skip


def test_selection_ignores_training_rows_and_preemptions_among_mixed_reports():
    reports = [
        _train_row(1, 3.0),
        _train_row(2, 2.5),
        _eval_row(2, 0.6),
        _train_row(3, 2.0),
        {**_train_row(4, 1.0), "primary": 0.0},  # a training row never selects, whatever it carries
        _eval_row(4, 0.5),
        _eval_row(5, 0.5, "preemption"),  # carries the last evaluation's scores
        {**_train_row(6, 0.9), "checkpoint_path": "/c/6"},
    ]
    result = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None)
    assert result.checkpoint == "/c/4" and result.best.primary == 0.5 and result.best.step == 4
    assert result.best.normalizer == "basic" and result.best.epoch == 0
    only_training = trial_outcome("u", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports[:2], None)
    assert only_training.best is None and only_training.failed


def test_history_has_training_loss_and_evaluations_by_step():
    reports = [_train_row(1, 3.0), _train_row(2, 2.5), _eval_row(2, 0.6), _eval_row(3, 0.6, "preemption")]
    history = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None).history
    assert [(p.step, p.loss, p.primary) for p in history] == [(1, 3.0, None), (2, 2.5, None), (2, 1.0, 0.6),
                                                              (3, 1.0, None)]  # fmt: skip
    assert history[0].learning_rate == pytest.approx(1e-3)
    assert outcome("a", "hi", 8, 0.4).summary().history == []


def test_history_keeps_every_evaluation_and_thins_training_rows_to_the_limit():
    reports = [_train_row(step, 1000.0 / step) for step in range(1, 1001)]
    reports += [_eval_row(step, 1.0 / step) for step in range(100, 1001, 100)]
    reports += [_train_row(500, 7.0)]  # a resumed run reports step 500 again: the later report stands
    history = history_of(reports, limit=50)
    evaluations = [p.step for p in history if p.primary is not None]
    training = [p for p in history if p.primary is None]
    assert len(history) == 50 and evaluations == list(range(100, 1001, 100))
    assert training[0].step == 1 and training[-1].step == 1000  # the whole run, evenly
    assert [p.step for p in history] == sorted(p.step for p in history)
    gaps = {b.step - a.step for a, b in itertools.pairwise(training)}
    assert max(gaps) - min(gaps) <= 1
    assert len(history_of(reports)) == MAX_HISTORY
    assert all(p.loss == 7.0 for p in history_of(reports, limit=2000) if p.step == 500 and p.primary is None)


def test_a_trial_lists_the_nodes_it_reported_from_in_order():
    """A worker group restarted on another node and back: each node once, in order of first report; reports from
    before node ids were reported (NaN in Tune's table) name none."""
    rows = [_train_row(1, 3.0), _train_row(2, 2.5), _eval_row(2, 0.6), _train_row(3, 2.0), _eval_row(4, 0.5)]
    nodes = [NAN, "node-a", "node-a", "node-b", "node-a"]
    reports = [{**row, "node_id": node} for row, node in zip(rows, nodes, strict=True)]
    result = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None)
    assert result.nodes == ["node-a", "node-b"] and result.summary().nodes == ["node-a", "node-b"]
    assert trial_outcome("u", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, rows, None).nodes == []


def test_a_failed_trial_is_named_by_its_innermost_error_not_rays_wrappers():
    import ray.exceptions
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from whisper_lora.tune.sweep import error_summary

    cause = ValueError("ta: 1 training rows cannot give each of 1 workers")
    wrapped = ray.exceptions.RayTaskError("train", "Traceback ...\x1b[36mray::ImplicitFunc.train()\x1b[39m", cause)
    assert error_summary(wrapped.as_instanceof_cause()) == f"ValueError: {cause}"
    group = WorkerGroupError("Training failed due to worker errors", {1: RuntimeError("rank 1"), 0: KeyError("rank 0")})
    assert error_summary(ControllerError(group)) == "KeyError: 'rank 0'"
    assert error_summary(MemoryError()) == "MemoryError"
