"""Which trial's adapter each language publishes: the lowest primary metric on the eval split, ties to the
smaller rank (fewer parameters, same quality), then the lower learning rate. Within a trial, the best evaluated
checkpoint that still exists (Ray keeps only ``train.checkpoints_to_keep``), in the order Ray's own keep policy
uses (``train.checkpoint.checkpoint_order``); checkpoints taken for a preemption carry no score of their own and
are never selected."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from whisper_lora.config import lora_alpha
from whisper_lora.languages import get_language
from whisper_lora.manifest import CheckpointScores, EvalSet, Scores, SelectedAdapter, TrialSummary
from whisper_lora.metrics import PRIMARY
from whisper_lora.train.checkpoint import checkpoint_order


@dataclass
class TrialOutcome:
    trial_id: str
    language: str
    rank: int
    learning_rate: float
    alpha: int
    best: CheckpointScores | None = None
    """Scores reported with the trial's best checkpoint, or None when it never evaluated."""
    checkpoint: str | None = None
    """That checkpoint's path in the Train storage's filesystem."""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.checkpoint is None

    def summary(self) -> TrialSummary:
        """The trial as the manifest lists it."""
        return TrialSummary(
            trial_id=self.trial_id,
            language=self.language,
            rank=self.rank,
            learning_rate=self.learning_rate,
            alpha=self.alpha,
            primary=self.best.primary if self.best else None,
            failed=self.failed,
            best_step=self.best.step if self.best else None,
            error=self.error,
        )


def _scored(report: Mapping[str, Any]) -> bool:
    primary = report.get(PRIMARY)
    return (
        bool(report.get("checkpoint_path"))
        and report.get("checkpoint_reason") != "preemption"
        and primary is not None
        and not math.isnan(primary)
    )


def best_report(reports: Iterable[dict], exists: Callable[[str], bool] = lambda path: True) -> dict | None:
    """The best evaluated report whose checkpoint still ``exists``."""
    ranked = sorted(filter(_scored, reports), key=checkpoint_order)
    return next((report for report in ranked if exists(report["checkpoint_path"])), None)


def trial_outcome(
    trial_id: str,
    params: dict,
    reports: list[dict],
    error: str | None,
    exists: Callable[[str], bool] = lambda path: True,
) -> TrialOutcome:
    """A trial from its Tune parameters and reports (Tune's result table holds every number as a float)."""
    best = best_report(reports, exists)
    return TrialOutcome(
        trial_id=trial_id,
        language=params["language"],
        rank=params["rank"],
        learning_rate=params["learning_rate"],
        alpha=lora_alpha(params["rank"], params.get("alpha")),
        best=CheckpointScores(**{name: best[name] for name in CheckpointScores.model_fields if name in best})
        if best
        else None,
        checkpoint=best["checkpoint_path"] if best else None,
        error=error,
    )


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
    return (outcome.best.primary, outcome.rank, outcome.learning_rate, outcome.best.step)


def selected_adapter(
    outcome: TrialOutcome, zero_shot: Scores, eval_split: str, target_modules: list[str] | str, base_sha256: str
) -> SelectedAdapter:
    """What the manifest will say of a language's winning trial."""
    best = outcome.best
    return SelectedAdapter(
        language=outcome.language,
        metric=get_language(outcome.language).primary_metric,
        value=best.primary,
        wer=best.wer,
        cer=best.cer,
        raw_wer=best.raw_wer,
        zero_shot=zero_shot,
        eval=EvalSet(split=eval_split, utterances=best.utterances),
        rank=outcome.rank,
        alpha=outcome.alpha,
        learning_rate=outcome.learning_rate,
        target_modules=target_modules,
        train_steps=best.step,
        trial_id=outcome.trial_id,
        base_sha256=base_sha256,
    )
