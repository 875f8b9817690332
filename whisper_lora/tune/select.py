"""Which trial's adapter each language publishes: the lowest primary metric on the eval split, ties to the
smaller rank (fewer parameters, same quality), then the lower learning rate. Within a trial, the best evaluated
checkpoint that still exists (Ray keeps only ``train.checkpoints_to_keep``), in the order Ray's own keep policy
uses (``train.checkpoint.checkpoint_order``); checkpoints taken for a preemption carry no score of their own and
are never selected. Training rows (``report_kind: "train"``: loss and learning rate, no checkpoint, no primary
metric; NaN in Tune's table) only draw the trial's curve, its ``history``. Every report names the node of the Train
run's rank 0 (``node_id``): a trial's ``nodes`` say where it ran, and where it moved after a restart. Every report
also carries the clock of its worker-group attempt and the trial adds one report of its own (``train.timing``): a
trial's ``time`` says where its wall time went."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from whisper_lora.config import lora_alpha
from whisper_lora.languages import get_language
from whisper_lora.manifest import (
    AttachedFile,
    CheckpointScores,
    EvalSet,
    HistoryPoint,
    Scores,
    SelectedAdapter,
    TrialSummary,
    TrialTime,
)
from whisper_lora.metrics import PRIMARY
from whisper_lora.score import HeldOutScores
from whisper_lora.train.checkpoint import checkpoint_order
from whisper_lora.train.timing import (
    AT,
    ATTEMPT,
    DATA_READY,
    FIT_ENDED,
    MODEL_READY,
    PHASES,
    TRAINABLE_STARTED,
    TRIAL_TIME,
)

MAX_HISTORY = 200
"""Points of a trial's curve kept in the manifest: every evaluation first, training rows evenly thinned."""


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
    history: list[HistoryPoint] = field(default_factory=list)
    """The trial's curve: training loss and learning rate, and each evaluation's primary metric, by step."""
    nodes: list[str] = field(default_factory=list)
    """Ray node ids the trial's rank 0 reported from, in order of first report."""
    time: TrialTime | None = None
    """Where its wall time went; None when its reports carry no clock (from before it was reported)."""

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
            history=self.history,
            nodes=self.nodes,
            time=self.time,
        )


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _evaluation(report: Mapping[str, Any]) -> bool:
    """A report with an evaluation of its own: a finite primary metric, neither a training row nor a preemption
    checkpoint (which carries the previous evaluation's scores)."""
    return (
        _finite(report.get(PRIMARY))
        and report.get("report_kind") not in ("train", "preemption")
        and report.get("checkpoint_reason") != "preemption"
    )


def _scored(report: Mapping[str, Any]) -> bool:
    path = report.get("checkpoint_path")
    return isinstance(path, str) and bool(path) and _evaluation(report)


def best_report(reports: Iterable[dict], exists: Callable[[str], bool] = lambda path: True) -> dict | None:
    """The best evaluated report whose checkpoint still ``exists``."""
    ranked = sorted(filter(_scored, reports), key=checkpoint_order)
    return next((report for report in ranked if exists(report["checkpoint_path"])), None)


def _point(report: Mapping[str, Any]) -> HistoryPoint:
    def number(name: str) -> float | None:
        return float(report[name]) if _finite(report.get(name)) else None

    return HistoryPoint(
        step=int(report["step"]),
        loss=number("loss"),
        learning_rate=number("learning_rate"),
        primary=float(report[PRIMARY]) if _evaluation(report) else None,
    )


def _thin(points: list[HistoryPoint], count: int) -> list[HistoryPoint]:
    """``count`` of ``points`` evenly spaced, first and last included."""
    if len(points) <= count:
        return points
    if count <= 1:
        return points[-1:] if count == 1 else []
    return [points[int(i * (len(points) - 1) / (count - 1) + 0.5)] for i in range(count)]


def history_of(reports: Iterable[Mapping[str, Any]], limit: int = MAX_HISTORY) -> list[HistoryPoint]:
    """A trial's curve from its reports, at most ``limit`` points in step order: every evaluation (thinned only
    when they alone exceed ``limit``), training rows evenly thinned into the rest. A step reported again (a
    resumed run) counts once, as last reported."""
    latest: dict[tuple[int, bool], HistoryPoint] = {}
    for report in reports:
        if _finite(report.get("step")):
            point = _point(report)
            latest[point.step, point.primary is not None] = point
    ordered = [latest[key] for key in sorted(latest)]
    evaluations = _thin([p for p in ordered if p.primary is not None], limit)
    training = _thin([p for p in ordered if p.primary is None], limit - len(evaluations))
    return sorted(evaluations + training, key=lambda p: (p.step, p.primary is not None))


def nodes_of(reports: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct ``node_id`` values of ``reports``, in order of first appearance (reports from before node ids
    were reported have none: NaN in Tune's table)."""
    return list(dict.fromkeys(r["node_id"] for r in reports if isinstance(r.get("node_id"), str) and r["node_id"]))


def trial_time(reports: Iterable[Mapping[str, Any]]) -> TrialTime | None:
    """Where a trial's time went, from its reports (rank 0's, as Tune keeps them); None when none carries a clock.

    Each worker-group attempt is its last report (the last evaluation, or the last before it failed): its
    start-up from its stamps, its loop phases as they stood then; what the attempt did after it (the last
    checkpoint's save, Train's shutdown) is the run's teardown. Each run of the trial that ended with its own report
    (``timing.TRIAL_TIME``) adds its wall (Tune's ``time_since_restore``: from the trial actor's start), the Tune
    and Train start-up before its first attempt and the teardown after its last; a run without that report adds
    its attempts' spans. What no phase covers is ``other``."""
    attempts: dict[float, Mapping[str, Any]] = {}
    runs = []
    for report in reports:
        if _finite(report.get(ATTEMPT)) and _finite(report.get(AT)):
            known = attempts.get(report[ATTEMPT])
            if known is None or report[AT] >= known[AT]:
                attempts[report[ATTEMPT]] = report
        elif report.get("report_kind") == TRIAL_TIME and all(
            _finite(report.get(key)) for key in ("time_since_restore", AT, TRAINABLE_STARTED, FIT_ENDED)
        ):
            runs.append(report)
    if not attempts and not runs:
        return None
    seconds = dict.fromkeys(("tune_startup", "train_startup", "model_load", "dataset", *PHASES, "teardown"), 0.0)
    for attempt in attempts.values():
        seconds["model_load"] += attempt[MODEL_READY] - attempt[ATTEMPT]
        seconds["dataset"] += attempt[DATA_READY] - attempt[MODEL_READY]
        for phase in PHASES:
            seconds[phase] += float(attempt.get(f"time_{phase}", 0.0))
    wall, unclaimed = 0.0, set(attempts)
    for run in runs:
        actor = run[AT] - run["time_since_restore"]
        mine = sorted(start for start in unclaimed if run[TRAINABLE_STARTED] <= start <= run[FIT_ENDED])
        unclaimed -= set(mine)
        wall += run[AT] - actor
        seconds["tune_startup"] += run[TRAINABLE_STARTED] - actor
        body_end = max((attempts[start][AT] for start in mine), default=run[TRAINABLE_STARTED])
        seconds["train_startup"] += (mine[0] if mine else body_end) - run[TRAINABLE_STARTED]
        seconds["teardown"] += run[AT] - body_end
    wall += sum(attempts[start][AT] - start for start in unclaimed)
    seconds = {name: max(value, 0.0) for name, value in seconds.items()}  # stamps of two clocks: never below zero
    other = max(wall - sum(seconds.values()), 0.0)
    return TrialTime(wall=sum(seconds.values()) + other, other=other, attempts=len(attempts), runs=len(runs), **seconds)


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
        best=CheckpointScores.of(best) if best else None,
        checkpoint=best["checkpoint_path"] if best else None,
        error=error,
        history=history_of(reports),
        nodes=nodes_of(reports),
        time=trial_time(reports),
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
    outcome: TrialOutcome,
    zero_shot: Scores,
    eval_split: str,
    target_modules: list[str] | str,
    base_sha256: str,
    test: HeldOutScores | None = None,
    config: AttachedFile | None = None,
) -> SelectedAdapter:
    """What the manifest will say of a language's winning trial (``test``: its scores on the test split, and its
    base model's; ``config``: the run config published beside it)."""
    best = outcome.best
    return SelectedAdapter(
        language=outcome.language,
        metric=get_language(outcome.language).primary_metric,
        value=best.primary,
        wer=best.wer,
        cer=best.cer,
        raw_wer=best.raw_wer,
        normalizer=best.normalizer,
        precision=best.precision,
        device=best.device,
        zero_shot=zero_shot,
        eval=EvalSet(split=eval_split, utterances=best.utterances),
        rank=outcome.rank,
        alpha=outcome.alpha,
        learning_rate=outcome.learning_rate,
        target_modules=target_modules,
        train_steps=best.step,
        trial_id=outcome.trial_id,
        base_sha256=base_sha256,
        test=test.adapter if test else None,
        zero_shot_test=test.zero_shot if test else None,
        test_scoring=test.scoring if test else None,
        config=config,
    )
