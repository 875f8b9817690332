"""What the sweep tries, how many trials run at once, and early stopping within a language."""

from __future__ import annotations

from whisper_lora.config import load_config
from whisper_lora.tune.search import PerLanguageASHA, max_concurrent_trials, trial_config


class _Trial:
    def __init__(self, trial_id: str, language: str) -> None:
        self.trial_id, self.config = trial_id, {"language": language}


def test_early_stopping_compares_trials_of_one_language_only():
    scheduler = PerLanguageASHA(grace_period=1, reduction_factor=2, max_t=100)
    tamil, hindi, hindi_worse = _Trial("ta1", "ta"), _Trial("hi1", "hi"), _Trial("hi2", "hi")
    for trial in (tamil, hindi, hindi_worse):
        scheduler.on_trial_add(None, trial)
    evaluation = {"report_kind": "evaluation"}
    assert scheduler.on_trial_result(None, tamil, {**evaluation, "step": 1, "primary": 0.05}) == "CONTINUE"
    # Much worse than Tamil's CER, but the first Hindi result at this rung: nothing to compare with.
    assert scheduler.on_trial_result(None, hindi, {**evaluation, "step": 1, "primary": 0.9}) == "CONTINUE"
    preempted = {"report_kind": "preemption", "step": 1, "primary": float("inf"), "checkpoint_reason": "preemption"}
    assert scheduler.on_trial_result(None, hindi_worse, preempted) == "CONTINUE"
    clock = {"report_kind": "trial_time", "step": 1, "primary": 0.95}  # whatever it carries, not an evaluation
    assert scheduler.on_trial_result(None, hindi_worse, clock) == "CONTINUE"
    assert scheduler.on_trial_result(None, hindi_worse, {**evaluation, "step": 1, "primary": 0.95}) == "STOP"


def test_a_trial_at_its_last_step_is_never_stopped():
    """ASHA stops every trial that reaches ``max_t``; ours end there by themselves, and a STOP would cut the
    reports a trial sends after its last evaluation (the attempt's clock, the trial's time)."""
    scheduler = PerLanguageASHA(grace_period=1, reduction_factor=2, max_t=10)
    trial = _Trial("hi1", "hi")
    scheduler.on_trial_add(None, trial)
    last = {"report_kind": "evaluation", "step": 10, "primary": 0.5}
    assert scheduler.on_trial_result(None, trial, last) == "CONTINUE"


def test_trial_config_and_concurrency(tmp_path):
    config = load_config(None, [f"data.source.path={tmp_path}", "data.languages=mr,ta", "train.num_workers=2"])
    trial = trial_config(config, {"language": "ta", "rank": 16, "learning_rate": 3e-4})
    assert (trial.train.language, trial.train.lora.rank, trial.train.learning_rate) == ("ta", 16, 3e-4)
    assert trial.train.lora.resolved_alpha == 32
    assert max_concurrent_trials(config, {"CPU": 64, "GPU": 8}, gpu=True) == 4
    assert max_concurrent_trials(config, {"CPU": 4}, gpu=False) >= 1
    pinned = load_config(None, [f"data.source.path={tmp_path}", "tune.max_concurrent_trials=3"])
    assert max_concurrent_trials(pinned, {"CPU": 64, "GPU": 8}, gpu=True) == 3
