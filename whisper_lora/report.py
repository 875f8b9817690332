"""The sweep at a glance: ``report.md`` with the tables, and two PNGs (error by language × rank, best vs
zero-shot). Written to a local directory; ``publish`` uploads them beside the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from whisper_lora.languages import get_language
from whisper_lora.tune.select import TrialOutcome

HEATMAP = "error_by_rank.png"
BEST_VS_ZERO_SHOT = "best_vs_zero_shot.png"


def _label(language: str) -> str:
    return f"{language} ({get_language(language).primary_metric.upper()})"


def error_grid(outcomes: Sequence[TrialOutcome]) -> tuple[list[str], list[int], np.ndarray]:
    """Best primary metric per (language, rank) over learning rates; NaN where every trial failed."""
    languages = sorted({o.language for o in outcomes})
    ranks = sorted({o.rank for o in outcomes})
    grid = np.full((len(languages), len(ranks)), np.nan)
    for outcome in outcomes:
        if outcome.failed:
            continue
        row, col = languages.index(outcome.language), ranks.index(outcome.rank)
        grid[row, col] = np.fmin(grid[row, col], outcome.best["primary"])
    return languages, ranks, grid


def plot_heatmap(outcomes: Sequence[TrialOutcome], path: Path) -> None:
    languages, ranks, grid = error_grid(outcomes)
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
    figure.savefig(path, dpi=120)


def plot_best_vs_zero_shot(entries: dict[str, dict], path: Path) -> None:
    languages = sorted(entries)
    zero = [entries[language]["zero_shot"]["primary"] for language in languages]
    best = [entries[language]["value"] for language in languages]
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
    figure.savefig(path, dpi=120)


def markdown(manifest: dict, outcomes: Sequence[TrialOutcome]) -> str:
    lines = [
        f"# {manifest['experiment']}: adapters per language",
        "",
        f"Base model `{manifest['base_model']['id']}` (sha256 `{manifest['base_model']['sha256'][:12]}…`), "
        f"published {manifest['created']}. Scores on the eval split; lower is better.",
        "",
        "| language | metric | zero-shot | best | WER | CER | rank | lr | steps | trial |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for language, entry in sorted(manifest["languages"].items()):
        lines.append(
            f"| {language} | {entry['metric'].upper()} | {entry['zero_shot']['primary']:.3f} | {entry['value']:.3f} | "
            f"{entry['wer']:.3f} | {entry['cer']:.3f} | {entry['rank']} | {entry['learning_rate']:g} | "
            f"{entry['train_steps']} | {entry['trial_id']} |"
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
    for o in sorted(outcomes, key=lambda o: (o.language, o.rank, o.learning_rate)):
        best = f"{o.best['primary']:.3f}" if o.best else "-"
        step = o.best["step"] if o.best else "-"
        status = f"failed: {o.error.splitlines()[0][:80]}" if o.error else ("no checkpoint" if o.failed else "ok")
        lines.append(f"| {o.trial_id} | {o.language} | {o.rank} | {o.learning_rate:g} | {best} | {step} | {status} |")
    for note in manifest.get("kept_previous", []):
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def write_report(directory: Path, manifest: dict, outcomes: Sequence[TrialOutcome]) -> list[Path]:
    """report.md and the PNGs, in ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.md", directory / HEATMAP, directory / BEST_VS_ZERO_SHOT]
    written[0].write_text(markdown(manifest, outcomes), encoding="utf-8")
    plot_heatmap(outcomes, written[1])
    plot_best_vs_zero_shot(manifest["languages"], written[2])
    return written
