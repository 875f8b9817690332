"""The sweep at a glance, rendered from its manifest alone: ``report.md`` with the tables, and two PNGs (error
by language × rank, best vs zero-shot). ``publish`` writes them beside the manifest, before it."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from whisper_lora.languages import get_language
from whisper_lora.manifest import Manifest, PublishedAdapter, TrialSummary

HEATMAP = "error_by_rank.png"
BEST_VS_ZERO_SHOT = "best_vs_zero_shot.png"


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
    axes.set_title("Eval error by LoRA rank (best learning rate)")
    figure.colorbar(image, ax=axes, label="error rate (lower is better)")
    figure.tight_layout()
    return _png(figure)


def plot_best_vs_zero_shot(entries: dict[str, PublishedAdapter]) -> bytes:
    languages = sorted(entries)
    zero = [entries[language].zero_shot.primary for language in languages]
    best = [entries[language].value for language in languages]
    x = np.arange(len(languages))
    figure = Figure(figsize=(2 + 1.2 * len(languages), 3.5))
    axes = figure.subplots()
    axes.bar(x - 0.2, zero, 0.4, label="zero-shot base", color="#bbbbbb")
    axes.bar(x + 0.2, best, 0.4, label="best adapter", color="#2a7ab9")
    axes.set_xticks(x, [_label(language) for language in languages])
    axes.set_ylabel("eval error rate")
    axes.legend()
    axes.set_title("Published adapter vs zero-shot")
    figure.tight_layout()
    return _png(figure)


def markdown(manifest: Manifest) -> str:
    base = manifest.base_model
    lines = [
        f"# {manifest.experiment}: adapters per language",
        "",
        f"Base model `{base.id}` (sha256 `{base.sha256[:12]}…`), "
        f"published {manifest.created}. Scores on the eval split; lower is better.",
        "",
        "| language | metric | zero-shot | best | WER | CER | rank | lr | steps | trial |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for language, entry in sorted(manifest.languages.items()):
        lines.append(
            f"| {language} | {entry.metric.upper()} | {entry.zero_shot.primary:.3f} | {entry.value:.3f} | "
            f"{entry.wer:.3f} | {entry.cer:.3f} | {entry.rank} | {entry.learning_rate:g} | "
            f"{entry.train_steps} | {entry.trial_id} |"
        )
    lines += [
        "",
        f"![error by rank]({HEATMAP}) ![best vs zero-shot]({BEST_VS_ZERO_SHOT})",
        "",
        "## Every trial",
        "",
        "| trial | language | rank | lr | best | at step | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in sorted(manifest.trials, key=lambda t: (t.language, t.rank, t.learning_rate)):
        best = "-" if t.primary is None else f"{t.primary:.3f}"
        step = "-" if t.best_step is None else t.best_step
        status = f"failed: {t.error.splitlines()[0][:80]}" if t.error else ("no checkpoint" if t.failed else "ok")
        lines.append(f"| {t.trial_id} | {t.language} | {t.rank} | {t.learning_rate:g} | {best} | {step} | {status} |")
    for note in manifest.kept_previous:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def report_files(manifest: Manifest) -> dict[str, bytes]:
    """``report.md`` and the PNGs it shows, by file name: ``publish``'s attachments."""
    return {
        "report.md": markdown(manifest).encode("utf-8"),
        HEATMAP: plot_heatmap(manifest.trials),
        BEST_VS_ZERO_SHOT: plot_best_vs_zero_shot(manifest.languages),
    }
