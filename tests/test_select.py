"""Which trial each language publishes, and which checkpoint of a trial."""

from __future__ import annotations

import itertools

import pytest

from tests.builders import failed, outcome
from whisper_lora.manifest import TrialSummary
from whisper_lora.train.timing import TRIAL_TIME
from whisper_lora.tune.select import MAX_HISTORY, history_of, select_best, trial_outcome, trial_time


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


def _clock(attempt: float, at: float, compute: float, wait: float, evaluation: float, checkpoint: float,
           reporting: float) -> dict:  # fmt: skip
    """An attempt's clock as its reports carry it: loop entry at ``attempt``, model 3 s later, reader 1 s after."""
    return {"time_attempt": attempt, "time_model_ready": attempt + 3, "time_data_ready": attempt + 4, "time_at": at,
            "time_compute": compute, "time_data_wait": wait, "time_evaluation": evaluation,
            "time_checkpoint": checkpoint, "time_reporting": reporting}  # fmt: skip


def _run(actor: float, started: float, fit_ended: float, at: float) -> dict:
    """The trial's own last report; Tune's ``time_since_restore`` places the actor's start."""
    return {"report_kind": TRIAL_TIME, "trainable_started": started, "trainable_fit_started": started + 1,
            "trainable_fit_ended": fit_ended, "time_at": at, "time_since_restore": at - actor, "step": NAN,
            "time_attempt": NAN}  # fmt: skip


def test_a_trials_time_splits_into_phases_that_sum_to_its_wall():
    """Actor up at 1000, trial body at 1002, loop at 1010 (model 1013, reader 1014), the loop's last report (its
    last evaluation) at 1050, ``fit()`` back at 1065, the trial's own report at 1066: the last checkpoint's save and
    Train's shutdown are the teardown."""
    reports = [
        {**_train_row(5, 2.0), **_clock(1010, 1030, compute=10, wait=1, evaluation=0, checkpoint=0, reporting=0.5)},
        {**_eval_row(10, 0.5), **_clock(1010, 1050, compute=20, wait=2, evaluation=10, checkpoint=0, reporting=1)},
        _run(actor=1000, started=1002, fit_ended=1065, at=1066),
    ]
    time = trial_time(reports)
    assert time.wall == pytest.approx(66) and (time.attempts, time.runs) == (1, 1)
    expected = {"tune_startup": 2, "train_startup": 8, "model_load": 3, "dataset": 1, "compute": 20, "data_wait": 2,
                "evaluation": 10, "checkpoint": 0, "reporting": 1, "teardown": 16, "other": 3}  # fmt: skip
    assert time.model_dump(exclude={"wall", "attempts", "runs"}) == pytest.approx(expected)
    assert time.startup == pytest.approx(14) and time.compute_share == pytest.approx(20 / 66)

    outcome = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None)
    assert outcome.summary().time == time
    assert_time_accounted(outcome.summary())
    assert outcome.checkpoint == "/c/10" and outcome.best.step == 10
    assert [(p.step, p.primary) for p in outcome.history] == [(5, None), (10, 0.5)]


def test_a_restarted_worker_group_and_a_retried_trial_add_up():
    """Run 1: an attempt fails after its report at 1050 and the worker group restarts at 1055; Tune later runs the
    trial again (run 2, resumed from the checkpoint). A third run failed before any report of its own: its attempt
    counts from its loop entry to its last report, with nothing before."""
    first = _clock(1010, 1050, compute=20, wait=2, evaluation=15, checkpoint=4, reporting=1)
    restarted = _clock(1055, 1070, compute=5, wait=0, evaluation=3, checkpoint=2, reporting=0)
    second = _clock(2010, 2020, compute=0, wait=0, evaluation=0, checkpoint=0, reporting=0)
    orphan = _clock(3010, 3030, compute=10, wait=0, evaluation=0, checkpoint=0, reporting=0)
    reports = [
        {**_eval_row(10, 0.5), **first},
        {**_eval_row(12, 0.4), **restarted},
        _run(actor=1000, started=1002, fit_ended=1072, at=1073),
        {**_eval_row(12, 0.4), **second},
        _run(actor=2000, started=2001, fit_ended=2021, at=2022),
        {**_train_row(13, 1.0), **orphan},
    ]
    time = trial_time(reports)
    assert (time.attempts, time.runs) == (4, 2)
    assert time.wall == pytest.approx(73 + 22 + 20)
    assert time.tune_startup == pytest.approx(2 + 1) and time.train_startup == pytest.approx(8 + 9)
    assert time.model_load == pytest.approx(4 * 3) and time.dataset == pytest.approx(4 * 1)
    assert time.compute == pytest.approx(35) and time.teardown == pytest.approx(3 + 2)
    phases = time.model_dump(exclude={"wall", "attempts", "runs"})
    assert sum(phases.values()) == pytest.approx(time.wall) and time.other >= 0
    assert time.other == pytest.approx(115 - sum(v for k, v in phases.items() if k != "other"))


def test_reports_without_a_clock_give_no_time_and_skewed_stamps_never_give_negative_seconds():
    assert trial_time([_train_row(1, 3.0), _eval_row(2, 0.6)]) is None
    unclocked = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, [_eval_row(2, 0.6)], None)
    assert unclocked.time is None and unclocked.summary().time is None
    # another node's clock runs 5 s behind the trial's: its loop entry stamps before the trial body began
    skewed = [{**_eval_row(2, 0.6), **_clock(997, 1040, 20, 1, 5, 2, 1)}, _run(1000, 1002, 1045, 1046)]
    time = trial_time(skewed)
    assert time.train_startup == 0.0 and min(time.model_dump().values()) >= 0
    assert time.wall == pytest.approx(sum(time.model_dump(exclude={"wall", "attempts", "runs"}).values()))


def assert_time_accounted(trial: TrialSummary) -> None:
    """What a trial of a real sweep must show of its time (a Ray test's published manifest: ``test_job_scores``):
    one run, every phase it went through measured, the phases summing to the wall, little left unexplained."""
    time = trial.time
    assert time is not None and time.runs == 1 and time.attempts >= 1, trial
    phases = time.model_dump(exclude={"wall", "attempts", "runs"})
    assert sum(phases.values()) == pytest.approx(time.wall) and min(phases.values()) >= 0
    # tune_startup may be 0: Tune starts ``time_since_restore`` with the trainable's body, not its actor
    assert min(time.train_startup, time.model_load, time.compute, time.evaluation) > 0, time
    assert time.teardown > 0, time  # the last checkpoint's save and Train's shutdown; earlier saves are ``checkpoint``
    assert time.other < 0.1 * time.wall, time
