"""What a person reads while a job runs: one line per stage with its progress, one line per trial event, the trial
table at the end of a sweep and a summary of what was published.

Left alone, a small local sweep prints hundreds of lines: Ray Data logs every operator every 10 s, Tune draws a
box per trial start and result, every model load draws a progress bar, and transformers, bitsandbytes and Ray
Data repeat the same notices in every process. ``quiet`` silences each of those notices at its own logger or
warnings filter (nothing else from those libraries is hidden) and runs in the driver and, through Ray's
``worker_process_setup_hook`` (``ray_runtime.setup_worker``), in every worker. Everything dropped from the
console here still reaches Ray's log files.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from typing import Any

from ray import tune

from whisper_lora.manifest import Manifest, timed_trials

RAY_DATA_PROGRESS_EVERY_S = 60.0
"""Seconds between two progress lines of one Ray Data execution (Ray logs every 10 s, ~12 lines each time)."""

NOTICES: dict[str, tuple[str, ...]] = {
    # logger → messages (substrings) that say nothing new after the first process said them once
    "transformers.generation.utils": (
        "The attention mask is not set",
        "together with generation-related arguments",
    ),
    "bitsandbytes.autograd._functions": ("inputs will be cast from",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*is_gradient_checkpointing.* is deprecated", FutureWarning),
    (r"The minimum number of concurrent actors for", UserWarning),
    (r".*MatMul8bitLt: inputs will be cast", UserWarning),
)


class DropMessages(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


class RayDataProgress(logging.Filter):
    """Ray Data's console, condensed: each progress block (a header, totals, two lines per operator) becomes one
    line, ``dataset: Op a/b · Op a/b``, at most every ``every_s`` seconds per dataset; other INFO records
    (execution plans, sink summaries) are dropped; warnings pass."""

    _OPERATOR = re.compile(r"^(\S.*): (\d+/[\d?]+)$")

    def __init__(self, every_s: float = RAY_DATA_PROGRESS_EVERY_S) -> None:
        super().__init__()
        self.every_s = every_s
        self._dataset: str | None = None
        self._operators: list[str] = []
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return "Progress bars disabled" not in record.getMessage()
        message = record.getMessage().strip()
        if message.startswith("======= Running Dataset:"):
            self._dataset, self._operators = message.strip("= ").removeprefix("Running Dataset: "), []
        elif (match := self._OPERATOR.match(message)) and self._dataset:
            self._operators.append(f"{match.group(1)} {match.group(2)}")
        elif message.startswith("=====") and self._dataset and self._operators:
            dataset, now = self._dataset, time.monotonic()
            self._dataset = None
            if now - self._last.get(dataset, -self.every_s) >= self.every_s:
                self._last[dataset] = now
                record.msg, record.args = f"{dataset}: " + " · ".join(self._operators), ()
                return True
        return False


def _ray_data_console() -> None:
    """``RayDataProgress`` on the console handler of Ray Data's logger (its file handler keeps every line)."""
    logger = logging.getLogger("ray.data")
    for handler in logger.handlers:
        if type(handler).__name__ != "SessionFileHandler" and not any(
            isinstance(f, RayDataProgress) for f in handler.filters
        ):
            handler.addFilter(RayDataProgress())


def quiet() -> None:
    """Silence the known repeated notices and progress bars in this process; idempotent. The CLI calls it at
    start, Ray workers through ``ray_runtime.setup_worker``."""
    for name, fragments in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(fragments))
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" per model load
    import ray.data  # noqa: F401  (configures Ray Data's logger, which the filter goes on)
    from ray.train.v2._internal.execution import context as train_context

    _ray_data_console()
    # Ray Train logs every report of every worker at INFO ("Reporting training result …") on a logger named by its
    # file path, outside the ray.train hierarchy that RunConfig(logging_config=…) sets
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _value(result: dict, key: str) -> str:
    value = result.get(key)
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


def trial_label(config: dict) -> str:
    """``hi r=8 lr=0.001`` (``alpha=…`` when swept): what a trial is, in the words of the config."""
    alpha = f" alpha={config['alpha']}" if config.get("alpha") else ""
    return f"{config.get('language')} r={config.get('rank')} lr={config.get('learning_rate')}{alpha}"


class TrialProgress(tune.Callback):
    """Tune's console, one line per event: a trial started, evaluated (step, loss, WER, CER), finished or
    failed; a training report at most every ``every_s`` seconds per trial; the trial table at the end. Pass it
    in ``tune.RunConfig(callbacks=…)`` with ``verbose=0``."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._best: dict[str, dict] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} ({trial_label(trial.config)}) started", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        kind = result.get("report_kind", "evaluation" if "wer" in result else "train")
        if kind not in ("train", "evaluation", "preemption"):
            return  # the trial's time stamps (``train.timing``): nothing new to read
        evaluation = kind == "evaluation"
        now = time.monotonic()
        if not evaluation and now - self._last.get(trial.trial_id, -self.every_s) < self.every_s:
            return
        self._last[trial.trial_id] = now
        line = f"trial {trial.trial_id} step {_value(result, 'step')}: loss {_value(result, 'loss')}"
        if evaluation:
            best = self._best.get(trial.trial_id)
            if best is None or result.get("primary", float("inf")) <= best.get("primary", float("inf")):
                self._best[trial.trial_id] = dict(result)
            line += f", wer {_value(result, 'wer')}, cer {_value(result, 'cer')}"
        print(line, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        best = self._best.get(trial.trial_id, {})
        print(f"trial {trial.trial_id} done: best {_value(best, 'primary')} at step {_value(best, 'step')}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = str(getattr(trial, "error_msg", None) or "see its error file").strip().splitlines()
        print(f"trial {trial.trial_id} ({trial_label(trial.config)}) failed: {error[-1] if error else ''}", flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        rows = [
            [trial.trial_id, trial_label(trial.config), trial.status, *self._scores(trial.trial_id)] for trial in trials
        ]
        print(table(["trial", "configuration", "status", "step", "wer", "cer", "primary"], rows), flush=True)

    def _scores(self, trial_id: str) -> list[str]:
        best = self._best.get(trial_id, {})
        return [_value(best, key) for key in ("step", "wer", "cer", "primary")]


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width text table (no box drawing: it survives logs, CI and ``less``)."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def summary_table(manifest: Manifest, location: str) -> str:
    """What a sweep published, one row per language: metric, zero-shot → adapted on the eval split, rank and
    rate, and the adapter; the number of failed trials below."""
    rows = []
    for code, entry in sorted(manifest.languages.items()):
        rows.append(
            [
                code,
                entry.metric,
                f"{entry.zero_shot.primary:.3f} → {entry.value:.3f}",
                entry.rank,
                f"{entry.learning_rate:g}",
                entry.adapter,
            ]
        )
    lines = [f"published {len(rows)} language(s) → {location}", table(
        ["language", "metric", "zero-shot → adapted", "rank", "lr", "adapter"], rows
    )]  # fmt: skip
    if manifest.failed_trials:
        lines.append(f"failed trials: {len(manifest.failed_trials)} (listed in manifest.json)")
    return "\n".join(lines + time_lines(manifest))


def time_lines(manifest: Manifest) -> list[str]:
    """Where each trial's time went (``manifest.TrialTime``), one line per trial; none before schema 4."""
    timed = timed_trials(manifest.trials)
    if not timed:
        return []
    lines = ["trial time, s: wall = start-up + compute + data wait + evaluation + checkpoint + bookkeeping"]
    labels = [f"{t.language} r={t.rank} lr={t.learning_rate:g}" for t in timed]
    width = max(map(len, labels))
    for label, trial in zip(labels, timed, strict=True):
        time = trial.time
        lines.append(
            f"  {label:<{width}}  {time.wall:.0f} = {time.startup:.0f} + {time.compute:.0f}"
            f" + {time.data_wait:.0f} + {time.evaluation:.0f} + {time.checkpoint:.0f} + {time.bookkeeping:.0f}"
            f"  (compute {time.compute_share:.0%})"
        )
    return lines
