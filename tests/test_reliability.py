"""What clusters do to a long job, on a local Ray instance with a tiny random Whisper: a worker process killed
mid-run, a node preemption announced by Ray, a trial that fails once or always, the driver stopped and started
again, publishing interrupted at each step; plus what must never leak or be unpickled. Run alone with
``pytest -m reliability`` (the bad-input cases live beside the pipeline and config tests, marked the same)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.train
import torch
from safetensors.torch import load_file

from tests.builders import write_clip, write_common_voice
from whisper_lora.config import ConfigError, load_config
from whisper_lora.train.loop import train_loop_per_worker
from whisper_lora.train.trainer import best_of_run, build_trainer

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parent.parent
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Train workers cannot import this test module
REPORT_COLLECTED_S = 5
"""Ray Train collects reports when it polls the workers (every 2 s): a worker that dies sooner after a report takes
that report with it, and the run resumes from the checkpoint before. Real steps take longer than the tiny model's."""


def _adapter(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "adapter" / "adapter_model.safetensors")


def _last_checkpoint(result) -> str:
    return max(result.best_checkpoints, key=lambda pair: pair[1]["step"])[0].path


def _deterministic(corpus: list[str], *extra: str):
    # dropout on, 2 workers: a resumed run computes what an uninterrupted one does only when the data order and
    # every worker's generators are restored exactly
    return load_config(None, [*corpus, "train.max_steps=6", "train.lora.dropout=0.2", "train.max_failures=2", *extra])


def _faulty(plan: dict, resumed: Path, fault) -> None:
    """The real worker loop, instrumented inside the worker process: ``fault(step)`` runs after every optimizer
    step, and its return value is what the loop hears next when it asks Ray whether a node is being preempted
    (after the steps not followed by an evaluation); every resume appends the step it starts from to ``resumed``."""
    import whisper_lora.train.loop as loop

    restore, train_step = loop.restore, loop.train_step
    steps, answer = [0], [None]  # optimizer steps taken; the fault's last answer

    def record_restore(worker, directory):
        progress = restore(worker, directory)
        steps[0] = progress.step
        with open(resumed, "a") as handle:
            handle.write(f"{progress.step}\n")
        return progress

    def step_then_fault(worker, micro_batches):
        result = train_step(worker, micro_batches)
        steps[0] += 1
        answer[0] = fault(steps[0])
        return result

    loop.restore, loop.train_step = record_restore, step_then_fault
    ray.train.get_preemption_info = lambda: answer[0]
    train_loop_per_worker(plan)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_worker_process_killed_mid_epoch_resumes_and_ends_where_a_clean_run_ends(two_worker_corpus, tmp_path):
    marker, resumed = tmp_path / "killed", tmp_path / "resumed"
    # batch 1 on 2 workers: 2 steps per epoch; checkpoints at steps 3 (mid-epoch) and 6; the kill after step 5
    steps = ["train.batch_size=1", "train.eval_each_epoch=false", "train.eval_every_steps=3"]
    config = _deterministic(two_worker_corpus, *steps)

    def kill_after_step_5(step: int):
        if step == 5 and ray.train.get_context().get_world_rank() == 1 and not marker.exists():
            marker.touch()
            time.sleep(REPORT_COLLECTED_S)
            os.kill(os.getpid(), signal.SIGKILL)  # the process dies: no exception, no cleanup
        return None

    interrupted = build_trainer(config, "hi", "killed-run")
    interrupted.train_loop_per_worker = lambda plan: _faulty(plan, resumed, kill_after_step_5)
    result = interrupted.fit()
    clean = build_trainer(config, "hi", "clean-run").fit()

    assert marker.exists() and set(resumed.read_text().split()) == {"3"}  # both workers restarted from step 3
    assert result.metrics["step"] == clean.metrics["step"] == 6
    killed, reference = _adapter(_last_checkpoint(result)), _adapter(_last_checkpoint(clean))
    assert killed.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(killed[name], tensor, rtol=1e-4, atol=1e-6)
    assert best_of_run(result, "hi", 8).metrics["step"] == best_of_run(clean, "hi", 8).metrics["step"]
    for checkpoint, _ in result.best_checkpoints:  # safetensors and JSON only (and peft's README.md model card)
        suffixes = {path.suffix for path in Path(checkpoint.path).rglob("*") if path.is_file()}
        assert suffixes <= {".safetensors", ".json", ".md"}, suffixes


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_announced_preemption_checkpoints_at_once_and_the_run_resumes_from_there(two_worker_corpus, tmp_path):
    marker, resumed = tmp_path / "preempted", tmp_path / "resumed"
    # one evaluation, at the end: without the preemption checkpoint a restart would begin again at step 0
    config = _deterministic(two_worker_corpus, "train.eval_each_epoch=false")

    def preempt_at_step_4(step: int):
        if step == 4 and not marker.exists():
            return ray.train.PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"node": [0, 1]})
        if step == 5 and not marker.exists():  # the checkpoint is stored: now the node goes
            time.sleep(REPORT_COLLECTED_S)
            if ray.train.get_context().get_world_rank() == 0:
                marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return None

    trainer = build_trainer(config, "hi", "preempted-run")
    trainer.train_loop_per_worker = lambda plan: _faulty(plan, resumed, preempt_at_step_4)
    result = trainer.fit()
    assert marker.exists() and set(resumed.read_text().split()) == {"4"}
    reasons = {metrics["step"]: metrics["checkpoint_reason"] for _, metrics in result.best_checkpoints}
    assert reasons == {4: "preemption", 6: "evaluation"}
    preemption = next(metrics for _, metrics in result.best_checkpoints if metrics["step"] == 4)
    assert preemption["primary"] == float("inf")  # no score yet: never selected over an evaluated checkpoint
    assert best_of_run(result, "hi", 8).metrics["step"] == 6 == result.metrics["step"]


# --- security: nothing pickled, no credential written -------------------------------------------------------


def test_the_product_never_unpickles_or_executes_data():
    sources = "\n".join(path.read_text() for path in (ROOT / "whisper_lora").rglob("*.py"))
    forbidden = [
        r"torch\.load\(",
        r"import pickle|pickle\.loads?\(",
        r"yaml\.load\(",
        r"yaml\.unsafe_load",
        r"(?<![\w.])eval\(",
        r"(?<![\w.])exec\(",
    ]
    for pattern in forbidden:
        assert not re.search(pattern, sources), pattern
    assert "use_safetensors=False" not in sources and "safe_serialization=False" not in sources


def test_config_files_are_data_not_code(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(f"experiment: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(hostile)
    assert not (tmp_path / "pwned").exists()


# --- the sweep: trials that fail, a driver that stops -------------------------------------------------------


def _sweep_corpus(root: Path, tiny_model_dir: str, rows: dict[str, int]) -> list[str]:
    """hi and ta clips; ``rows`` train utterances per language (dev and test: 2 each)."""
    for language, count in rows.items():
        lines = []
        for index in range(max(count, 2)):
            write_clip(root / "cv" / language / "clips" / f"{language}{index}.mp3", 1.0 + 0.2 * index)
            lines.append((f"{language}{index}.mp3", f"{language} वाक्य {index}"))
        write_common_voice(root / "cv", language, {"train": lines[:count], "dev": lines[:2], "test": lines[:2]})
    return [
        f"data.source.path={root}/cv",
        f"data.languages={','.join(rows)}",
        f"model.base={tiny_model_dir}",
        f"model.cache_dir={root}/models",
        f"output_dir={root}/runs",
        f"train.storage_path={root}/ray",
        f"publish.storage={root}/published",
        "experiment=rel",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.gradient_checkpointing=false",
        "eval.batch_size=2",
        "tune.ranks=2",
    ]


def _train_worker_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_trial_failing_once_is_retried_and_one_failing_always_is_reported(ray_local, tiny_model_dir, tmp_path):
    from whisper_lora.job import tune_languages

    # ta has one training utterance for batches of 2: its trial fails on every attempt. hi's Train workers are
    # killed from here at its first checkpoint (no Train-level restarts): the trial fails once and Tune retries it.
    overrides = _sweep_corpus(tmp_path, tiny_model_dir, {"hi": 4, "ta": 1})
    steps = ["train.max_steps=20", "train.eval_each_epoch=false", "train.eval_every_steps=10"]
    config = load_config(None, [*overrides, *steps, "train.max_failures=0", "tune.trial_max_failures=1"])
    before, killed, stop = _train_worker_pids(), [], threading.Event()

    def kill_workers_at_the_first_checkpoint():
        while not stop.is_set() and not any((tmp_path / "ray").glob("rel-train-trial_id=*/checkpoint_*")):
            time.sleep(0.1)
        for pid in _train_worker_pids() - before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_workers_at_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        manifest = tune_languages(config)
    finally:
        stop.set()
    assert killed, "the hi trial's worker was never seen"
    assert set(manifest.languages) == {"hi"}
    assert manifest.languages["hi"].train_steps in (10, 20)
    states = (tmp_path / "ray").glob("rel-train-trial_id=*/checkpoint_*/trainer_state.json")
    assert max(json.loads(state.read_text())["progress"]["step"] for state in states) == 20  # the retry finished
    [failed] = manifest.failed_trials
    assert failed.language == "ta" and failed.error.startswith("ValueError: ta: 1 training rows cannot give each")
    assert [t.failed for t in sorted(manifest.trials, key=lambda t: t.language)] == [False, True]


# The driver stopped and started again (`ray job stop`, `ray job submit`) is tested on the job-submitted sweep in
# tests/test_sweep.py (test_a_stopped_job_resumes_its_sweep_without_retraining_finished_trials).
