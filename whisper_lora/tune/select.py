"""Which trial's adapter each language publishes: the lowest primary metric on the eval split, ties to the
smaller rank (fewer parameters, same quality), then the lower learning rate. Within a trial, the best evaluated
checkpoint that still exists (Ray keeps only ``train.checkpoints_to_keep``), ties to the later step, as Ray's own
keep policy does; checkpoints taken for a preemption carry no score of their own and are never selected."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

SCORE_KEYS = ("primary", "wer", "cer", "raw_wer", "utterances", "step", "epoch")
INT_KEYS = ("utterances", "step", "epoch")


@dataclass
class TrialOutcome:
    trial_id: str
    language: str
    rank: int
    learning_rate: float
    alpha: int
    best: dict | None = None
    """Scores reported with the trial's best checkpoint (``SCORE_KEYS``), or None when it never evaluated."""
    checkpoint: str | None = None
    """That checkpoint's path in the Train storage."""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.checkpoint is None

    def to_dict(self) -> dict:
        return asdict(self)


def _scored(report: dict) -> bool:
    primary = report.get("primary")
    return (
        bool(report.get("checkpoint_path"))
        and report.get("checkpoint_reason") != "preemption"
        and primary is not None
        and not math.isnan(primary)
    )


def best_report(reports: Iterable[dict], exists: Callable[[str], bool] = lambda path: True) -> dict | None:
    """The best evaluated report whose checkpoint still ``exists``; ties go to the later step."""
    ranked = sorted(filter(_scored, reports), key=lambda r: (r["primary"], -r["step"]))
    return next((report for report in ranked if exists(report["checkpoint_path"])), None)


def trial_outcome(
    trial_id: str,
    params: dict,
    reports: list[dict],
    error: str | None,
    exists: Callable[[str], bool] = lambda path: True,
) -> TrialOutcome:
    best = best_report(reports, exists)
    return TrialOutcome(
        trial_id=trial_id,
        language=params["language"],
        rank=params["rank"],
        learning_rate=params["learning_rate"],
        alpha=params.get("alpha") or 2 * params["rank"],
        best=_scores(best) if best else None,
        checkpoint=best["checkpoint_path"] if best else None,
        error=error,
    )


def _scores(report: dict) -> dict:
    """The scores of a report, counts as ints (Tune's result table holds every number as a float)."""
    return {key: int(report[key]) if key in INT_KEYS else report[key] for key in SCORE_KEYS if key in report}


def select_best(outcomes: Iterable[TrialOutcome]) -> dict[str, TrialOutcome]:
    """Per language, the winning trial among those that finished with a checkpoint."""
    winners: dict[str, TrialOutcome] = {}
    for outcome in outcomes:
        if outcome.failed:
            continue
        current = winners.get(outcome.language)
        if current is None or _key(outcome) < _key(current):
            winners[outcome.language] = outcome
    return dict(sorted(winners.items()))


def _key(outcome: TrialOutcome) -> tuple:
    return (outcome.best["primary"], outcome.rank, outcome.learning_rate, outcome.best["step"])
