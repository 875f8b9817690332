"""Experiment tracking of the sweep: which loggers Tune runs, what an MLflow run holds, training rows passing
Tune's metric check and ASHA, and (Ray) the main job tracked on a real MLflow server (the session's ``tracked_job``,
whose scores test_job_scores checks): a run per trial with its params and curves, each published adapter recorded
on its trial's run, and its sweep run again with another concurrency resuming instead of training again."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from whisper_lora.config import load_config
from whisper_lora.tune.search import METRIC, PerLanguageASHA, scheduler
from whisper_lora.tune.tracking import (
    AUTO_LOGGERS,
    OptimizerStepAxis,
    SweepMLflowLogger,
    TrackingError,
    link_published,
    mlflow_tracking_uri,
    only_listed_loggers,
    run_params,
    tracking_callbacks,
)


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.source.path={tmp_path}", f"output_dir={tmp_path}/runs", *overrides])


def test_run_params_are_the_trials_own_choices(tmp_path):
    config = _config(tmp_path, "train.lora.target_modules=[q_proj,v_proj,fc1]", "train.max_steps=7")
    params = run_params(config, {"language": "ta", "rank": 16, "learning_rate": 3e-4})
    assert params["language"] == "ta" and params["rank"] == 16 and params["learning_rate"] == 3e-4
    assert params["alpha"] == 32  # 2 × rank when the grid has no alphas
    assert params["target_modules"] == "q_proj,v_proj,fc1" and params["max_steps"] == 7
    assert run_params(config, {"language": "mr", "rank": 4, "learning_rate": 1e-3, "alpha": 4})["alpha"] == 4


def test_tensorboard_is_what_the_config_says(tmp_path):
    from ray.tune.utils.callback import _create_default_callbacks

    def loggers(*overrides: str) -> list[type]:
        listed = tracking_callbacks(_config(tmp_path, *overrides), "sweep")
        with only_listed_loggers():
            every = _create_default_callbacks(listed)  # what Tune runs with those
        return [type(callback) for callback in every if "Progress" not in type(callback).__name__]

    assert loggers() == [OptimizerStepAxis, CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback]
    assert loggers("tracking.tensorboard=false") == [OptimizerStepAxis, CSVLoggerCallback, JsonLoggerCallback]
    assert AUTO_LOGGERS not in os.environ  # only within the sweep
    # Without the guard Tune would add TensorBoard back: the setting is not honoured by accident.
    again = _create_default_callbacks(tracking_callbacks(_config(tmp_path, "tracking.tensorboard=false"), "s"))
    assert TBXLoggerCallback in [type(callback) for callback in again]


def test_mlflow_store_defaults_to_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tmp_path, "experiment=e1").with_absolute_paths()
    assert mlflow_tracking_uri(config) == f"sqlite:///{tmp_path}/runs/e1/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert mlflow_tracking_uri(config) == "http://tracking:5000"
    pinned = _config(tmp_path, "tracking.mlflow_tracking_uri=http://other:80")
    assert mlflow_tracking_uri(pinned) == "http://other:80"


def test_mlflow_on_without_mlflow_installed_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    config = _config(tmp_path, "tracking.mlflow=true", "tracking.mlflow_tracking_uri=http://127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"pip install 'whisper-lora\[tracking\]'"):
        tracking_callbacks(config, "sweep")
    with pytest.raises(TrackingError, match="mlflow is not installed"):
        link_published(config, "sweep", None)
    assert link_published(_config(tmp_path), "sweep", None) == 0  # tracking off: nothing asked of mlflow


def test_loggers_plot_against_the_optimizer_step():
    result = {"step": 12, "loss": 0.5, "timesteps_total": None, "training_iteration": 3}
    OptimizerStepAxis().on_trial_result(3, [], None, result)
    assert result["timesteps_total"] == 12
    untouched = {"training_iteration": 1}
    OptimizerStepAxis().on_trial_result(1, [], None, untouched)
    assert "timesteps_total" not in untouched


class _Trial:
    def __init__(self, trial_id: str, language: str) -> None:
        self.trial_id, self.config = trial_id, {"language": language}


def _train_row(step: int) -> dict:
    return {"report_kind": "train", "step": step, "loss": 1.0 / step, "learning_rate": 1e-3, "training_iteration": step}


def _evaluation(step: int, primary: float) -> dict:
    return {"report_kind": "evaluation", "step": step, METRIC: primary, "loss": 0.5}


def test_training_rows_pass_tunes_metric_check_and_asha(tmp_path):
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.basic_variant import BasicVariantGenerator

    config = _config(tmp_path, "tune.asha.enabled=true", "tune.asha.grace_period_steps=2", "train.max_steps=8")
    asha = scheduler(config)
    assert isinstance(asha, PerLanguageASHA)
    controller = SimpleNamespace(_metric=None, _scheduler_alg=asha, _search_alg=BasicVariantGenerator())
    good, bad = _Trial("a", "hi"), _Trial("b", "hi")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    stream = [(good, _train_row(1)), (good, _train_row(2)), (good, _evaluation(2, 0.3))]
    stream += [(bad, _train_row(1)), (bad, _train_row(2))]
    for trial, row in stream:
        TuneController._validate_result_metrics(controller, row)  # raises on a row the check refuses
        assert asha.on_trial_result(None, trial, row) == "CONTINUE"
    # the bad trial's training rows took no rung: its evaluation is the one compared, and it loses
    assert asha.on_trial_result(None, bad, _evaluation(2, 0.9)) == "STOP"
    # Had the sweep named its metric to Tune, every training row would stop it:
    with pytest.raises(ValueError, match="did not include the specified metric"):
        named = SimpleNamespace(**{**vars(controller), "_metric": METRIC})
        TuneController._validate_result_metrics(named, _train_row(3))


def test_the_mlflow_logger_carries_the_sweeps_tags(tmp_path):
    config = _config(tmp_path, "experiment=e2", "tracking.mlflow=true")
    logger = SweepMLflowLogger(config, "e2-tune-abc")
    assert logger.experiment_name == "e2" and logger.tags == {"experiment": "e2", "sweep": "e2-tune-abc"}
    named = SweepMLflowLogger(_config(tmp_path, "tracking.mlflow_experiment=whisper"), "s")
    assert named.experiment_name == "whisper"


def _checkpoints(storage: Path) -> dict[str, list[str]]:
    return {run.name: sorted(c.name for c in run.glob("checkpoint_*")) for run in storage.glob("*-train-trial_id=*")}


@pytest.fixture(scope="module")
def tracked(tracked_job):
    """The session's main job (conftest ``tracked_job``: hi and ta, one rank, logged to a real MLflow server) and its
    MLflow runs; then its sweep run again with one trial at a time and other CPUs per worker, as someone would rerun
    it on another machine."""
    from mlflow.tracking import MlflowClient

    from whisper_lora.tune.sweep import run_sweep, state_dir, sweep_name

    config = tracked_job.config.with_absolute_paths()
    storage = Path(config.train.storage_path)
    client = MlflowClient(tracked_job.mlflow)
    experiment = client.get_experiment_by_name(config.experiment)
    runs_before = client.search_runs([experiment.experiment_id])
    checkpoints_before = _checkpoints(storage)
    rerun = load_config(tracked_job.config_file, ["tune.max_concurrent_trials=1", "train.cpus_per_worker=0.25"])
    rerun = rerun.with_absolute_paths()
    assert sweep_name(rerun) == sweep_name(config)
    return SimpleNamespace(
        config=config,
        manifest=tracked_job.manifest,
        rerun=run_sweep(rerun, gpu=False),
        client=client,
        experiment=experiment,
        runs_before=runs_before,
        checkpoints_before=checkpoints_before,
        checkpoints_after=_checkpoints(storage),
        sweep=sweep_name(config),
        sweep_dir=state_dir(config) / sweep_name(config),
    )


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_every_trial_is_an_mlflow_run_with_its_params_and_curves(tracked):
    runs = tracked.client.search_runs([tracked.experiment.experiment_id])
    assert len(runs) == 2 and {run.info.status for run in runs} == {"FINISHED"}
    assert sorted((run.data.params["language"], int(run.data.params["rank"])) for run in runs) == [("hi", 2), ("ta", 2)]
    trials = {trial.trial_id: trial for trial in tracked.manifest.trials}
    for run in runs:
        params, tags = run.data.params, run.data.tags
        assert float(params["learning_rate"]) == 1e-3 and params["max_steps"] == "4"
        assert int(params["alpha"]) == 2 * int(params["rank"]) and params["target_modules"] == "q_proj,v_proj"
        assert tags["sweep"] == tracked.sweep and tags["language"] == params["language"]
        trial = trials[tags["trial_id"]]  # the run of a trial the manifest lists
        assert trial.language == params["language"]
        loss = tracked.client.get_metric_history(run.info.run_id, "loss")
        # training rows at steps 1-4 and the evaluations, plotted by optimizer step
        assert len(loss) > 1 and {point.step for point in loss} == {1, 2, 3, 4}
        # the evaluations the manifest's curve holds (the loop's closing report repeats the last: the same point)
        primary = {(p.step, p.value) for p in tracked.client.get_metric_history(run.info.run_id, METRIC)}
        evaluations = {(p.step, p.primary) for p in trial.history if p.primary is not None}
        assert len(evaluations) >= 2 and primary == evaluations
    trial_dirs = [Path(result.path) for result in tracked.rerun]
    assert all(list(directory.glob("events.out.tfevents.*")) for directory in trial_dirs)  # TensorBoard


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_rerun_with_other_concurrency_resumes_without_training_again(tracked):
    from whisper_lora.storage import open_location
    from whisper_lora.tune.sweep import outcomes_of

    # the same experiment, the same trials
    assert all(Path(result.path).parent == tracked.sweep_dir for result in tracked.rerun)
    outcomes = outcomes_of(tracked.rerun, open_location(tracked.config.train.storage_path))
    assert sorted(o.trial_id for o in outcomes) == sorted(t.trial_id for t in tracked.manifest.trials)
    assert len(tracked.checkpoints_before) == 2 and all(tracked.checkpoints_before.values())
    assert tracked.checkpoints_after == tracked.checkpoints_before  # no trial trained again
    again = tracked.client.search_runs([tracked.experiment.experiment_id])
    assert sorted(run.info.run_id for run in again) == sorted(run.info.run_id for run in tracked.runs_before)
    assert all(result.error is None for result in tracked.rerun)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_job_records_each_published_adapter_on_its_trials_run(tracked):
    from whisper_lora.tune.tracking import PUBLISHED_TAG

    published = Path(tracked.config.publish.storage) / tracked.config.experiment / "adapters"
    runs = tracked.client.search_runs([tracked.experiment.experiment_id])
    tagged = {run.data.tags["trial_id"]: run.data.tags.get(PUBLISHED_TAG) for run in runs}
    entries = tracked.manifest.languages.values()
    assert tagged == {entry.trial_id: entry.adapter for entry in entries}  # set by the job, once it published
    assert all(Path(entry.adapter).parent.parent == published for entry in entries)
    assert link_published(tracked.config, "another-sweep", tracked.manifest) == 0  # another sweep's trial: not ours


def _noop(config: dict) -> None:
    pass


def test_a_resumed_sweep_logs_with_the_loggers_configured_now(tmp_path):
    from ray import tune

    from whisper_lora.tune.sweep import _log_with

    tune.Tuner(_noop, run_config=tune.RunConfig(name="s", storage_path=str(tmp_path), callbacks=[OptimizerStepAxis()]))
    restored = tune.Tuner.restore(str(tmp_path / "s"), _noop)

    def given_to_tune() -> list:
        return restored._local_tuner._get_tune_run_arguments(_noop)["callbacks"]

    assert [type(callback) for callback in given_to_tune()] == [OptimizerStepAxis]  # Tune's restore: the first ones
    now = tracking_callbacks(_config(tmp_path, "tracking.tensorboard=false"), "s")
    _log_with(restored, now)
    assert given_to_tune() is now
