"""The Tune sweep of Train runs and what it yields per trial.

A sweep is named by what changes its results (``sweep_name``): the same config resumes the same Tune experiment
(a restarted driver goes on: finished trials are not trained again, interrupted ones continue from their last
checkpoint), a changed grid or plan starts a new one.

The identity is every config field except those listed in ``NOT_IDENTITY``, which change how, where or how fast
the sweep runs and what it logs, never what a trial computes (concurrency, CPUs and threads per worker, retries,
storage, tracking, ...). The list names exclusions, so a field added to the config counts as changing results
until someone declares otherwise here. Fields at their default value are left out: adding a field whose default
keeps today's behaviour renames no sweep (the flip side: changing a default in code, like any code change, does
not rename one either).

Tune's own state (``tuner.pkl``, trial states: pickles) lives on the driver's disk, ``tune.state_dir``; with
``WHISPER_LORA_STATE_KEY`` set it is mirrored, signed, beside the checkpoints, and a driver that lost its disk
resumes from that mirror only once it verifies (``tune/state.py``). Train's checkpoints stay in
``train.storage_path``: Tune only receives their paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import ray
from ray import tune

from whisper_lora.config import JobConfig
from whisper_lora.console import TrialProgress
from whisper_lora.models.resolve import ResolvedModel, resolve_model
from whisper_lora.storage import Location, StorageOptions, open_location
from whisper_lora.tune.search import max_concurrent_trials, param_space, scheduler
from whisper_lora.tune.select import TrialOutcome, trial_outcome
from whisper_lora.tune.state import (
    KEY_ENV,
    MIRROR_DIR,
    has_mirror,
    read_snapshot,
    restore_mirror,
    state_key,
    write_mirror,
)
from whisper_lora.tune.tracking import only_listed_loggers, tracking_callbacks
from whisper_lora.tune.trainable import train_trial

log = logging.getLogger(__name__)
TRIAL_DRIVER = {"CPU": 0.01}
"""A trial's own process only launches its Train run: a whole CPU for it starves the Train workers on small
machines (they never start); zero is not a valid request."""
MIRROR_EVERY_S = 30.0
"""Seconds between two mirrors of Tune's state while a sweep runs (each uploads only the files that changed)."""


NOT_IDENTITY: dict[str, str] = {
    "experiment": "the name's prefix already",
    "output_dir": "where prepared data and reports are written",
    "model.cache_dir": "where imported models are kept (keyed by their content)",
    "data.batch_size": "rows per Ray Data batch in the feature stage",
    "train.language": "every trial's language comes from the grid (data.languages)",
    "train.learning_rate": "every trial's comes from tune.learning_rates",
    "train.lora.rank": "every trial's comes from tune.ranks",
    "train.lora.alpha": "every trial's comes from tune.alphas (null: 2 × rank)",
    "train.torch_threads": "compute resources",
    "train.cpus_per_worker": "compute resources",
    "train.data_cache_mib": "memory held between epochs; the rows and their order are the same",
    "train.log_every_steps": "how often the training curve is reported",
    "train.checkpoints_to_keep": "Ray keeps the best by the primary metric, so the selected one survives either way",
    "train.max_failures": "retries",
    "train.storage_path": "where checkpoints and the sweep's signed mirror live",
    "eval.batch_size": "greedy decoding batches (fixed-length 30 s inputs and forced prompts)",
    "tune.max_concurrent_trials": "scheduling",
    "tune.trial_max_failures": "retries",
    "tune.state_dir": "where the driver keeps Tune's own state",
    "publish": "where the selection goes",
    "cost": "the full-vs-LoRA comparison, another job",
    "ray": "where Ray runs",
    "storage": "how remote locations are reached",
    "tracking": "what is logged, and where",
}
"""Config fields (dotted paths) that do not change what a sweep's trials compute, each with the reason."""


def sweep_identity(config: JobConfig) -> dict:
    """What names a sweep: the config's non-default values, without the fields in ``NOT_IDENTITY``."""
    tree = config.model_dump(mode="json", exclude_defaults=True)
    for dotted in NOT_IDENTITY:
        _remove(tree, dotted.split("."))
    return tree


def _remove(tree: dict, path: list[str]) -> None:
    """Remove ``path`` from ``tree`` and the sections it leaves empty (an empty one would still be hashed)."""
    head, *rest = path
    if rest and isinstance(tree.get(head), dict):
        _remove(tree[head], rest)
        if not tree[head]:
            del tree[head]
    elif not rest:
        tree.pop(head, None)


def sweep_name(config: JobConfig) -> str:
    """Tune experiment name: the same config resumes the same sweep; a changed grid or plan starts a new one, a
    changed schedule, resource, retry, storage or tracking setting does not (``NOT_IDENTITY``)."""
    digest = hashlib.sha256(json.dumps(sweep_identity(config), sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.experiment}-tune-{digest}"


def state_dir(config: JobConfig) -> Path:
    """Where this driver keeps Tune's state: ``tune.state_dir``, else ``<run_dir>/tune``."""
    return Path(config.tune.state_dir or config.run_dir / "tune").expanduser().resolve()


class MirrorTuneState(tune.Callback):
    """Mirrors the driver's Tune state to its signed prefix (``tune/state.py``): at most every ``MIRROR_EVERY_S``
    while the sweep runs, and once more when it ends (after Tune's last, awaited write). The key is read from the
    environment each time and never kept: Tune pickles its callbacks into the very state being mirrored."""

    def __init__(self, experiment: Path, mirror: str, options: StorageOptions, sweep: str, stored: set[str]) -> None:
        self.experiment, self.mirror_uri, self.options, self.sweep = str(experiment), mirror, options, sweep
        self.stored = set(stored)
        self.last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self.last >= MIRROR_EVERY_S:
            self.mirror()

    def on_experiment_end(self, trials: list, **info) -> None:
        self.mirror(final=True)

    def mirror(self, final: bool = False) -> None:
        """One mirror of the state as it is now; a failure is a warning (the sweep goes on, the previous mirror
        stays whole) and a file Tune was writing is taken at the next step."""
        self.last = time.monotonic()
        files, key = read_snapshot(Path(self.experiment)), state_key()
        if not files or key is None:
            if final and files is None:
                log.warning("Tune's state changed while it was read: its mirror %s is one step older", self.mirror_uri)
            return
        try:
            mirror = open_location(self.mirror_uri, self.options)
            self.stored = write_mirror(mirror, self.sweep, files, key, self.stored)
        except OSError as exc:
            log.warning("could not mirror Tune's state to %s (the previous mirror stays): %s", self.mirror_uri, exc)


def prepare_state(config: JobConfig, name: str) -> tuple[bool, MirrorTuneState | None]:
    """Whether the sweep resumes, and the callback that mirrors its state (None without a key). Tune resumes from
    the driver's own state dir; a dir without state is first filled from the signed mirror, once verified
    (``TuneStateRejected`` when it does not verify, before anything in it is loaded); else the sweep starts."""
    experiment = state_dir(config) / name
    mirror = open_location(config.train.storage_path, config.storage).join(name, MIRROR_DIR)
    key, stored = state_key(), set()
    resume = tune.Tuner.can_restore(str(experiment))
    if not resume and has_mirror(mirror):
        stored = restore_mirror(mirror, experiment, name, key)
        resume = True
    elif not resume and mirror.parent.join("tuner.pkl").exists():
        log.warning("%s holds unsigned Tune state of an earlier version: not loaded (it could run code in this "
                    "driver); the sweep starts again", mirror.parent.uri)  # fmt: skip
    if key is None:
        log.info("%s is not set: Tune's state stays in %s on this driver only (a resume needs this disk)",
                 KEY_ENV, experiment)  # fmt: skip
        return resume, None
    return resume, MirrorTuneState(experiment, mirror.uri, config.storage, name, stored)


def run_sweep(config: JobConfig, gpu: bool, base: ResolvedModel | None = None) -> tune.ResultGrid:
    """Run (or resume) the sweep ``config`` names and wait for it. Its state is checked before anything of Ray
    (``prepare_state``). A resumed sweep logs with the current ``tracking`` section; Tune restores its own
    concurrency limit with its search state. ``base``: the model this driver resolved (resolved here when None),
    handed to every trial with ``gpu``: trials run on any node and resolve nothing themselves."""
    name = sweep_name(config)
    path = str(state_dir(config) / name)
    resume, mirror = prepare_state(config, name)
    shared = {"config": config.model_dump(mode="json"), "base": base or resolve_model(config.model), "gpu": gpu}
    trainable = tune.with_resources(tune.with_parameters(train_trial, **shared), TRIAL_DRIVER)
    callbacks = [*tracking_callbacks(config, name), TrialProgress(), *([mirror] if mirror else [])]
    if resume:
        log.info("resuming sweep %s (with the concurrency it started with)", path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
        _log_with(tuner, callbacks)
    else:
        concurrency = max_concurrent_trials(config, ray.cluster_resources(), gpu)
        log.info("sweep %s: up to %d trials at once", path, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=tune.TuneConfig(scheduler=scheduler(config), max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(state_dir(config)),
                failure_config=tune.FailureConfig(max_failures=config.tune.trial_max_failures),
                callbacks=callbacks,
                verbose=0,  # TrialProgress prints a line per trial event instead of Tune's boxes and tables
            ),
        )
    with only_listed_loggers():
        return tuner.fit()


def _log_with(tuner: tune.Tuner, callbacks: list) -> None:
    """Tune restores the ``RunConfig`` pickled at a sweep's first start, loggers included; tracking is not part of
    the sweep's identity, so a resumed sweep logs with the ones configured now. Ray 2.60 keeps them on the
    driver's ``TunerInternal``; under Ray Client there is none and the first start's loggers stay."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:
        log.warning("resumed sweep: Tune keeps the loggers of its first start (no local Tuner to update)")
        return
    internal._run_config.callbacks = callbacks


def _trial_id(result) -> str:
    if "trial_id" in result.metrics:
        return result.metrics["trial_id"]
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", result.path)
    return match.group(1) if match else result.path.rsplit("/", 1)[-1]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(error: BaseException) -> str:
    """What failed a trial, in one line a manifest reader can act on: the innermost exception under Ray's wrappers
    (a task error's cause, a worker group's first failing rank, a controller's failure), not their tracebacks."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        inner = (
            getattr(error, "cause", None)
            or (failures[min(failures)] if failures else None)
            or getattr(error, "controller_failure", None)
            or error.__cause__
        )
        if not isinstance(inner, BaseException):
            break
        error = inner
    name = type(error).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):
        name = name[len("RayTaskError(") : -1]
    message = _ANSI.sub("", str(error)).strip()
    return f"{name}: {message}" if message else name


def outcomes_of(grid: tune.ResultGrid, train_storage: Location) -> list[TrialOutcome]:
    """Every trial's outcome; its best report is one whose checkpoint Ray still keeps in ``train_storage``."""

    def exists(path: str) -> bool:
        return train_storage.within(path).is_dir()

    outcomes = []
    for result in grid:
        frame = result.metrics_dataframe
        reports = frame.to_dict("records") if frame is not None else []
        error = None if result.error is None else error_summary(result.error)
        outcomes.append(trial_outcome(_trial_id(result), result.config, reports, error, exists))
    return outcomes
