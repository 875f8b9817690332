"""The console a person reads: Ray Data's progress condensed to a line, the known library notices silenced at
their own loggers (and nothing else), one line per trial event and a trial table, domain errors as one line."""

import logging
import warnings
from types import SimpleNamespace

import pytest

from tests.builders import TRIAL_TIME, outcome
from whisper_lora.console import RayDataProgress, TrialProgress, quiet, table, time_lines
from whisper_lora.manifest import BaseModelRecord, Manifest


def _records(lines: list[str]) -> list[logging.LogRecord]:
    return [logging.LogRecord("ray.data.x", logging.INFO, "f.py", 1, line, (), None) for line in lines]


NOTICE_LOGGERS = ("transformers.generation.utils", "bitsandbytes.autograd._functions")
BLOCK = [
    "======= Running Dataset: ds_1 =======",
    "Total Progress: 3/?",
    "Active & requested resources: 1/4 CPU, 0.0B/512.0MiB object store",
    "",
    "ReadFilesParquetV2: 6/6",
    "  Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B object store",
    "MapBatches(EncodeBatch): 2/8",
    "  Tasks: 1; Actors: 2 (running=1)",
    "=================================================================",
]


def test_a_ray_data_progress_block_becomes_one_line_at_most_every_interval():
    progress = RayDataProgress(every_s=3600)
    passed = [record.getMessage() for record in _records(BLOCK * 2) if progress.filter(record)]
    assert passed == ["ds_1: Total Progress 3/? · ReadFilesParquetV2 6/6 · MapBatches(EncodeBatch) 2/8"]
    plan, done = _records(["Execution plan of Dataset ds_1: InputDataBuffer[Input] -> ...", "Data sink finished."])
    assert not progress.filter(plan) and not progress.filter(done)
    warning = logging.LogRecord("ray.data.x", logging.WARNING, "f.py", 1, "Operator X is slow", (), None)
    assert progress.filter(warning)
    unthrottled = RayDataProgress(every_s=0)
    assert sum(unthrottled.filter(record) for record in _records(BLOCK * 3)) == 3


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_drops_the_known_notices_and_nothing_else():
    quiet()
    quiet()  # idempotent: one filter per logger
    generation, cast = (logging.getLogger(name) for name in NOTICE_LOGGERS)
    assert len(generation.filters) == 1
    kept = _Kept()
    for logger in (generation, cast):
        logger.addHandler(kept)
    try:
        generation.warning("The attention mask is not set with a batched input, and cannot be inferred")
        cast.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        generation.warning("A new generation problem nobody has seen")
    finally:
        for logger in (generation, cast):
            logger.removeHandler(kept)
    assert kept.messages == ["A new generation problem nobody has seen"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning, stacklevel=1
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_trial_progress_prints_one_line_per_event_and_the_table(capsys):
    trial = SimpleNamespace(trial_id="t1", config={"language": "hi", "rank": 4, "learning_rate": 0.001}, status="")
    progress = TrialProgress(every_s=3600)
    progress.on_trial_start(0, [trial], trial)
    for step in (5, 10):
        progress.on_trial_result(0, [trial], trial, {"report_kind": "train", "step": step, "loss": 2.0})
    progress.on_trial_result(
        0,
        [trial],
        trial,
        {"report_kind": "evaluation", "step": 10, "loss": 1.5, "wer": 0.5, "cer": 0.2, "primary": 0.5},
    )
    # the trial's clock: nothing a person reads while it runs
    progress.on_trial_result(0, [trial], trial, {"report_kind": "trial_time", "trainable_started": 1.0})
    progress.on_trial_complete(0, [trial], trial)
    trial.status = "TERMINATED"
    progress.on_experiment_end([trial])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "trial t1 (hi r=4 lr=0.001) started",
        "trial t1 step 5: loss 2.000",
        "trial t1 step 10: loss 1.500, wer 0.500, cer 0.200",
        "trial t1 done: best 0.500 at step 10",
    ]
    assert lines[4].split() == ["trial", "configuration", "status", "step", "wer", "cer", "primary"]
    assert lines[6].split() == ["t1", "hi", "r=4", "lr=0.001", "TERMINATED", "10", "0.500", "0.200", "0.500"]


def test_the_summary_splits_each_trials_time_in_one_line():
    trials = [outcome("a", "hi", 4, 0.4, lr=2e-3).summary(), outcome("b", "mr", 16, 0.5, lr=2e-3).summary()]
    manifest = Manifest(experiment="x", created="now", base_model=BaseModelRecord(id="m", sha256="0" * 64),
                        trials=[trials[0].model_copy(update={"time": TRIAL_TIME}), trials[1]])  # fmt: skip
    assert time_lines(manifest) == [
        "trial time, s: wall = start-up + compute + data wait + evaluation + checkpoint + bookkeeping",
        "  hi r=4 lr=0.002  100 = 31 + 40 + 1 + 20 + 3 + 5  (compute 40%)",
    ]
    assert time_lines(manifest.model_copy(update={"trials": trials[1:]})) == []


def test_table_pads_columns():
    assert table(["a", "bb"], [["ccc", 1]]).splitlines() == ["a    bb", "---  --", "ccc  1"]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_an_impossible_batch_plan_is_one_line_and_exit_2(two_worker_corpus, capsys):
    from whisper_lora.cli import main

    assert main(["train", *two_worker_corpus, "train.batch_size=4"]) == 2
    error = capsys.readouterr().err
    assert "whisper-lora: hi: 4 training rows cannot give each of 2 workers" in error
    assert "Traceback" not in error
