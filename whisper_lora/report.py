"""The sweep at a glance, rendered from its manifest alone: ``report.md`` with the tables, and its PNGs (error by
language × rank, published adapter vs zero-shot on dev and test, and the trials' training curves when the
manifest has them). ``publish`` writes them beside the manifest, before it.

Every number says which split it comes from: *dev* is the eval split that selected the adapter (trials compete
on it, so the winner's dev score is optimistic), *test* the held-out split scored once after selection.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from whisper_lora.languages import get_language
from whisper_lora.manifest import Manifest, PublishedAdapter, Scores, TrialSummary, TrialTime, timed_trials

HEATMAP = "error_by_rank.png"
BEST_VS_ZERO_SHOT = "best_vs_zero_shot.png"
CURVES = "training_curves.png"
log = logging.getLogger(__name__)


def _label(language: str) -> str:
    return f"{language} ({get_language(language).primary_metric.upper()})"


def error_grid(trials: Sequence[TrialSummary]) -> tuple[list[str], list[int], np.ndarray]:
    """Best primary metric per (language, rank) over learning rates; NaN where every trial failed."""
    languages = sorted({t.language for t in trials})
    ranks = sorted({t.rank for t in trials})
    grid = np.full((len(languages), len(ranks)), np.nan)
    for trial in trials:
        if trial.failed or trial.primary is None:
            continue
        row, col = languages.index(trial.language), ranks.index(trial.rank)
        grid[row, col] = np.fmin(grid[row, col], trial.primary)
    return languages, ranks, grid


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def plot_heatmap(trials: Sequence[TrialSummary]) -> bytes:
    languages, ranks, grid = error_grid(trials)
    figure = Figure(figsize=(2.6 + 1.1 * len(ranks), 1.4 + 0.6 * len(languages)))
    axes = figure.subplots()
    image = axes.imshow(grid, cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(ranks)), [f"r={r}" for r in ranks])
    axes.set_yticks(range(len(languages)), [_label(language) for language in languages])
    middle = np.nanmean([np.nanmin(grid), np.nanmax(grid)]) if np.isfinite(grid).any() else 0.0
    for (row, col), value in np.ndenumerate(grid):
        text = "failed" if np.isnan(value) else f"{value:.3f}"
        axes.text(col, row, text, ha="center", va="center", color="black" if value <= middle else "white")
    axes.set_title("Dev error by LoRA rank (best learning rate)")
    figure.colorbar(image, ax=axes, label="error rate (lower is better)")
    figure.tight_layout()
    return _png(figure)


def plot_best_vs_zero_shot(entries: dict[str, PublishedAdapter]) -> bytes:
    """Zero-shot and adapter bars per language on dev, and on test where the manifest has test scores."""
    languages = sorted(entries)
    bars = [
        ("zero-shot, dev", "#bbbbbb", "", [entries[lang].zero_shot.primary for lang in languages]),
        ("adapter, dev", "#2a7ab9", "", [entries[lang].value for lang in languages]),
    ]
    if any(entries[lang].test is not None for lang in languages):
        bars += [
            ("zero-shot, test", "#dddddd", "//", [_primary(entries[lang].zero_shot_test) for lang in languages]),
            ("adapter, test", "#174a73", "//", [_primary(entries[lang].test) for lang in languages]),
        ]
    width = 0.8 / len(bars)
    x = np.arange(len(languages))
    figure = Figure(figsize=(max(5.0, 2 + 0.6 * len(bars) * len(languages)), 3.5))
    axes = figure.subplots()
    for index, (label, color, hatch, values) in enumerate(bars):
        offset = (index - (len(bars) - 1) / 2) * width
        axes.bar(x + offset, values, width, label=label, color=color, hatch=hatch, edgecolor="#333333")
    axes.set_xticks(x, [_label(language) for language in languages])
    axes.set_ylabel("error rate")
    axes.legend(fontsize="small")
    axes.set_title("Adapter vs zero-shot: dev (selected it) and test (held out)", fontsize="medium")
    figure.tight_layout()
    return _png(figure)


def _primary(scores: Scores | None) -> float:
    return np.nan if scores is None else scores.primary


def plot_curves(manifest: Manifest) -> bytes | None:
    """Per language (a column): training loss by step for every trial, and below it the dev primary metric at
    each evaluation, one colour per trial (legend: rank, learning rate; ★ the published one). None when no trial
    has a history (a manifest from before schema 3)."""
    trials = [t for t in manifest.trials if t.history]
    if not trials:
        return None
    languages = sorted({t.language for t in trials})
    figure = Figure(figsize=(1.5 + 4.2 * len(languages), 6.5))
    grid = figure.subplots(2, len(languages), squeeze=False, sharex="col")
    for column, language in enumerate(languages):
        loss_axes, metric_axes = grid[0, column], grid[1, column]
        published = manifest.languages.get(language)
        ranked = sorted((t for t in trials if t.language == language), key=lambda t: (t.rank, t.learning_rate))
        for index, trial in enumerate(ranked):
            color = f"C{index % 10}"
            label = f"r={trial.rank} lr={trial.learning_rate:g}" + (" (failed)" if trial.failed else "")
            if published is not None and published.trial_id == trial.trial_id:
                label += " ★"
            losses = [(p.step, p.loss) for p in trial.history if p.primary is None and p.loss is not None]
            if losses:
                loss_axes.plot(*zip(*losses, strict=True), color=color, linewidth=1.2, label=label)
            scores = [(p.step, p.primary) for p in trial.history if p.primary is not None]
            if scores:
                metric_axes.plot(*zip(*scores, strict=True), color=color, marker="o", linewidth=0.8, label=label)
        loss_axes.set_title(f"{language}: training loss")
        metric_axes.set_title(f"{language}: dev {get_language(language).primary_metric.upper()} (evaluations)")
        metric_axes.set_xlabel("optimizer step")
        for axes in (loss_axes, metric_axes):
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize="x-small")
    figure.tight_layout()
    return _png(figure)


def _score(scores: Scores | None) -> str:
    return "-" if scores is None else f"{scores.primary:.3f}"


def _pair(dev: float, test: float | None) -> str:
    return f"{dev:.3f} / " + ("-" if test is None else f"{test:.3f}")


def _normalizers(entry: PublishedAdapter) -> str:
    """The normaliser behind the entry's scores: one name, or each score's where they differ."""
    named = {"adapter dev": entry.normalizer, "zero-shot dev": entry.zero_shot.normalizer}
    named |= {"adapter test": entry.test.normalizer} if entry.test else {}
    named |= {"zero-shot test": entry.zero_shot_test.normalizer} if entry.zero_shot_test else {}
    if len(set(named.values())) == 1:
        return entry.normalizer
    return ", ".join(f"{what}: {name}" for what, name in named.items())


def _published_table(manifest: Manifest) -> list[str]:
    lines = [
        "| language | metric | zero-shot dev | adapter dev | zero-shot test | adapter test | WER dev / test "
        "| CER dev / test | rank | lr | steps | trial |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for language, entry in sorted(manifest.languages.items()):
        test = entry.test
        lines.append(
            f"| {language} | {entry.metric.upper()} | {entry.zero_shot.primary:.3f} | {entry.value:.3f} | "
            f"{_score(entry.zero_shot_test)} | {_score(test)} | {_pair(entry.wer, test and test.wer)} | "
            f"{_pair(entry.cer, test and test.cer)} | {entry.rank} | {entry.learning_rate:g} | "
            f"{entry.train_steps} | {entry.trial_id} |"
        )
    lines += [
        "",
        "| language | dev split (utterances) | test split (utterances) | normaliser | test precision | test device "
        "| run config |",
        "|---|---|---|---|---|---|---|",
    ]
    for language, entry in sorted(manifest.languages.items()):
        scoring = entry.test_scoring
        test_split = "not scored" if scoring is None else f"{scoring.split} ({scoring.utterances})"
        config = "-" if entry.config is None else f"[{entry.config.name}]({entry.config.name})"
        lines.append(
            f"| {language} | {entry.eval.split} ({entry.eval.utterances}) | {test_split} | {_normalizers(entry)} | "
            f"{scoring.precision if scoring else '-'} | {scoring.device if scoring else '-'} | {config} |"
        )
    return lines + _unlike_warnings(manifest)


def _unlike_warnings(manifest: Manifest) -> list[str]:
    """A loud line (and a logged warning) per comparison whose sides were decoded in different precisions."""
    lines = []
    for language, entry in sorted(manifest.languages.items()):
        for unlike in entry.unlike_comparisons():
            log.warning("%s: %s: its improvement mixes quantisation loss with adaptation", language, unlike)
            lines.append(f"> **Not like with like — {language}, {unlike}**: the difference mixes quantisation "
                         "loss with adaptation.")  # fmt: skip
    return ["", *lines] if lines else []


def markdown(manifest: Manifest, curves: bool = False) -> str:
    """``report.md``; ``curves``: whether the training-curves PNG is published beside it."""
    base = manifest.base_model
    lines = [
        f"# {manifest.experiment}: adapters per language",
        "",
        f"Base model `{base.id}` (sha256 `{base.sha256[:12]}…`), published {manifest.created}. Error rates, lower "
        "is better. **dev**: the eval split, on which trials competed and the adapter was selected (its own score "
        "there is optimistic); **test**: the held-out split, scored once after selection, the adapter and its "
        "zero-shot base in the same precision on the same device (`-`: not scored).",
        "",
        *_published_table(manifest),
        "",
        f"![error by rank]({HEATMAP}) ![adapter vs zero-shot]({BEST_VS_ZERO_SHOT})",
    ]
    if curves:
        lines += ["", f"![training curves]({CURVES})"]
    lines += [
        "",
        "## Every trial",
        "",
        "Best dev score of each trial (selection compares these).",
        "",
        "| trial | language | rank | lr | best dev | at step | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in sorted(manifest.trials, key=lambda t: (t.language, t.rank, t.learning_rate)):
        best = "-" if t.primary is None else f"{t.primary:.3f}"
        step = "-" if t.best_step is None else t.best_step
        status = f"failed: {t.error.splitlines()[0][:80]}" if t.error else ("no checkpoint" if t.failed else "ok")
        lines.append(f"| {t.trial_id} | {t.language} | {t.rank} | {t.learning_rate:g} | {best} | {step} | {status} |")
    for note in manifest.kept_previous:
        lines.append(f"\n{note}")
    return "\n".join(lines + _time_table(manifest.trials)) + "\n"


def _time_table(trials: Sequence[TrialSummary]) -> list[str]:
    """Where each trial's wall time went (``TrialTime``), and all trials together; nothing for a manifest whose
    trials carry no time (before schema 4)."""
    timed = timed_trials(trials)
    if not timed:
        return []
    lines = [
        "",
        "## Where the trials' time went",
        "",
        "Seconds per trial, as its Train run's rank 0 and the trial itself stamped them; the columns sum to the wall "
        "time. **Start-up**: Tune's trial actor / the Train controller and worker group (and `build_trainer`) / the "
        "model (and a checkpoint restored) / the dataset reader. **Compute**: optimizer steps (forward, backward, "
        "optimizer). **Checkpoint**: every save but the last. **Bookkeeping**: training-curve reports and preemption "
        "checks / the Train run's teardown (the last checkpoint's save, Train shutting down) / "
        "the rest (loop overhead, restarts). Trials ran side by side, so their walls overlap.",
        "",
        "| trial | language | rank | lr | wall | start-up (Tune / Train / model / data) | compute | data wait "
        "| evaluation | checkpoint | bookkeeping (reports / teardown / rest) | compute share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in timed:
        lines.append(f"| {t.trial_id} | {t.language} | {t.rank} | {t.learning_rate:g} | {_time_row(t.time)} |")
    if len(timed) > 1:
        total = _sum_times([t.time for t in timed])
        lines.append(f"| all {len(timed)} | | | | {_time_row(total)} |")
    restarted = [t.trial_id for t in timed if t.time.attempts > 1 or t.time.runs > 1]
    if restarted:
        lines += ["", f"Restarted (their phases add up every attempt): {', '.join(restarted)}."]
    return lines


def _time_row(time: TrialTime) -> str:
    startup = f"{time.startup:.0f} ({time.tune_startup:.0f} / {time.train_startup:.0f} / {time.model_load:.0f} / "
    startup += f"{time.dataset:.0f})"
    bookkeeping = f"{time.bookkeeping:.0f} ({time.reporting:.0f} / {time.teardown:.0f} / {time.other:.0f})"
    return (
        f"{time.wall:.0f} | {startup} | {time.compute:.0f} | {time.data_wait:.0f} | {time.evaluation:.0f} | "
        f"{time.checkpoint:.0f} | {bookkeeping} | {time.compute_share:.0%}"
    )


def _sum_times(times: Sequence[TrialTime]) -> TrialTime:
    """Every phase summed over ``times`` (trial-seconds: more than the sweep's wall when trials overlapped)."""
    fields = TrialTime.model_fields
    return TrialTime(**{name: sum(getattr(time, name) for time in times) for name in fields})


def report_files(manifest: Manifest) -> dict[str, bytes]:
    """``report.md`` and the PNGs it shows, by file name: ``publish``'s attachments."""
    curves = plot_curves(manifest)
    files = {
        "report.md": markdown(manifest, curves is not None).encode("utf-8"),
        HEATMAP: plot_heatmap(manifest.trials),
        BEST_VS_ZERO_SHOT: plot_best_vs_zero_shot(manifest.languages),
    }
    return files | ({CURVES: curves} if curves is not None else {})
