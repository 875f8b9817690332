"""The worker loop's parts, without Ray: one optimizer step on a tiny random Whisper, when evaluations happen, how
an epoch of the split becomes steps, and what a checkpoint stores to resume exactly (position, generators)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from tests.builders import write_split
from whisper_lora.config import EvalConfig, TrainConfig
from whisper_lora.data.epochs import EpochReader
from whisper_lora.storage import open_location
from whisper_lora.train import timing
from whisper_lora.train.checkpoint import STATE, save_checkpoint, save_rng_states
from whisper_lora.train.loop import epoch_groups
from whisper_lora.train.plan import Progress, Rows, WorkerPlan
from whisper_lora.train.step import Worker, build_worker, restore, should_evaluate, train_step
from whisper_lora.train.timing import AttemptClock, figures

PROMPT = [50258, 50276, 50359, 50363]  # <|startoftranscript|> <|hi|> <|transcribe|> <|notimestamps|>
END = 50257


def _rows(*seeds: int, label_tokens: int = 6) -> Rows:
    """One random utterance per seed, every one with as many label tokens: a batch's mean loss is then the mean
    of its rows' losses, however the rows are grouped."""
    rows = {"id": [], "duration_s": [], "input_features": [], "label_ids": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        rows["id"].append(f"u{seed}")
        rows["duration_s"].append(1.0 + seed)
        rows["input_features"].append(rng.standard_normal((80, 100)).astype(np.float32))
        rows["label_ids"].append(np.array([*PROMPT, *rng.integers(220, 50000, label_tokens), END]))
    return rows


def _plan(tiny_model_dir: str, micro_batches_per_epoch: int = 4, **train: object) -> WorkerPlan:
    settings = {"precision": "fp32", "gradient_checkpointing": False, "warmup_steps": 0, "lora": {"dropout": 0.0}}
    return WorkerPlan(
        train=TrainConfig(**{**settings, **train}),
        eval=EvalConfig(),
        base_path=tiny_model_dir,
        language="hi",
        micro_batches_per_epoch=micro_batches_per_epoch,
        train_dir="unused",
        eval_dir="unused",
    )


def _worker(tiny_model_dir: str, rank: int = 0, world: int = 1, **train: object) -> Worker:
    return build_worker(_plan(tiny_model_dir, **train), torch.device("cpu"), rank, world)


def _weights(worker: Worker) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in worker.trainable]


@pytest.mark.parametrize(
    ("train", "step", "epoch_end", "expected"),
    [
        ({}, 3, False, False),
        ({}, 3, True, True),  # eval_each_epoch
        ({"eval_each_epoch": False}, 3, True, False),
        ({"eval_each_epoch": False, "eval_every_steps": 3}, 3, False, True),
        ({"eval_each_epoch": False, "eval_every_steps": 3}, 4, False, False),
        ({"eval_each_epoch": False, "max_steps": 5}, 5, False, True),  # the last step always
    ],
)
def test_should_evaluate(train, step, epoch_end, expected):
    assert should_evaluate(TrainConfig(**train), step, epoch_end) is expected


def test_two_accumulated_micro_batches_step_as_their_concatenation(tiny_model_dir):
    accumulated, whole = _worker(tiny_model_dir, grad_accum=2), _worker(tiny_model_dir, grad_accum=1)
    before = _weights(accumulated)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(whole), strict=True))  # same seed, same start
    stepped = {}  # the gradients each optimizer steps with (Adam's first step is about their signs only)
    for name, worker in [("accumulated", accumulated), ("whole", whole)]:
        worker.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs, name=name, worker=worker: stepped.update(
                {name: [parameter.grad.clone() for parameter in worker.trainable]}
            )
        )

    split = train_step(accumulated, [_rows(0, 1), _rows(2, 3)])
    joined = train_step(whole, [_rows(0, 1, 2, 3)])

    assert split.loss == pytest.approx(joined.loss, rel=1e-5)
    assert split.grad_norm == pytest.approx(joined.grad_norm, rel=1e-4)  # the mean gradient, not the sum
    for a, b in zip(stepped["accumulated"], stepped["whole"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert any(not torch.equal(start, after) for start, after in zip(before, _weights(accumulated), strict=True))
    assert accumulated.scheduler.last_epoch == whole.scheduler.last_epoch == 1  # one optimizer step each
    assert all(parameter.grad is None for parameter in accumulated.trainable)  # nothing leaks into the next step
    assert split.seconds > 0


def test_under_ddp_gradients_are_reduced_once_per_step_not_per_micro_batch(tiny_model_dir, monkeypatch):
    import torch.distributed as dist

    from tests.builders import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        worker, plain = _worker(tiny_model_dir, grad_accum=3), _worker(tiny_model_dir, grad_accum=3)
        worker.model = torch.nn.parallel.DistributedDataParallel(worker.model)
        unsynced = []
        no_sync = torch.nn.parallel.DistributedDataParallel.no_sync
        monkeypatch.setattr(
            torch.nn.parallel.DistributedDataParallel,
            "no_sync",
            lambda model: unsynced.append(model) or no_sync(model),
        )
        micro_batches = [_rows(0, 1), _rows(2, 3), _rows(4, 5)]
        reduced, local = train_step(worker, micro_batches), train_step(plain, micro_batches)
    finally:
        dist.destroy_process_group()
    assert len(unsynced) == 2  # the first two of three micro-batches
    assert reduced.grad_norm == pytest.approx(local.grad_norm, rel=1e-5)


def test_a_loss_that_is_not_finite_stops_the_run_before_the_optimizer_steps(tiny_model_dir):
    worker = _worker(tiny_model_dir, learning_rate=3e-4)
    train_step(worker, [_rows(0)])
    before = _weights(worker)
    broken = _rows(1)
    broken["input_features"][0][:] = np.nan
    diverged = r"^hi: loss is nan at step 2: the run diverged \(learning rate 0\.0003;"
    with pytest.raises(FloatingPointError, match=diverged):
        train_step(worker, [broken])
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(worker), strict=True))


def test_progress_round_trips_the_checkpoint_and_restores_the_worker(tiny_model_dir, tmp_path):
    worker = _worker(tiny_model_dir)
    micro_batches = [_rows(0, 1)]
    train_step(worker, micro_batches)
    progress = Progress()
    progress.count(micro_batches, waited=0.25, world=2, computed=1.25)
    assert (progress.step, progress.batches_done, progress.samples, progress.audio_seconds) == (1, 1, 4, 6.0)
    assert (progress.compute_seconds, progress.data_wait_seconds) == (1.25, 0.25)
    save_checkpoint(tmp_path, worker.model, worker.optimizer, worker.scheduler, worker.scaler, asdict(progress))
    saved = json.loads((tmp_path / STATE).read_text())["progress"]
    assert list(saved) == [
        "step", "epoch", "batches_done", "samples", "audio_seconds", "compute_seconds", "data_wait_seconds"
    ]  # fmt: skip

    fresh = _worker(tiny_model_dir)
    assert restore(fresh, str(tmp_path)) == progress
    assert fresh.scheduler.last_epoch == 1
    for a, b in zip(_weights(worker), _weights(fresh), strict=True):
        torch.testing.assert_close(a, b)

    del saved["data_wait_seconds"]  # checkpoints written before the loop timed its data
    (tmp_path / STATE).write_text(json.dumps({**json.loads((tmp_path / STATE).read_text()), "progress": saved}))
    assert restore(fresh, str(tmp_path)).data_wait_seconds == 0.0

    older = {**saved, "data_wait_seconds": 0.25, "train_seconds": 2.0}  # before compute was summed apart
    del older["compute_seconds"]
    (tmp_path / STATE).write_text(json.dumps({**json.loads((tmp_path / STATE).read_text()), "progress": older}))
    assert restore(fresh, str(tmp_path)).compute_seconds == 1.75


def test_the_training_figures_agree_with_each_other_by_construction():
    """The issue's demo report: a median step time of 6.9 s beside 37 accelerator-seconds for 20 steps and 2.1
    samples/s at batch 4. Every figure now comes from the same two sums, over the same steps."""
    progress = Progress()
    for step in range(20):
        progress.count([{"id": ["a"] * 4, "duration_s": [5.0] * 4}], waited=0.1, world=2, computed=6.0 + step % 3)
    whole = figures(progress, world=2)
    assert whole["compute_seconds"] == pytest.approx(sum(6.0 + step % 3 for step in range(20)))
    assert whole["step_seconds"] * progress.step == pytest.approx(whole["compute_seconds"])
    assert whole["train_seconds"] == pytest.approx(whole["compute_seconds"] + 20 * 0.1)
    assert whole["samples_per_second"] * whole["train_seconds"] == pytest.approx(progress.samples) == 160
    assert whole["audio_seconds_per_second"] * whole["train_seconds"] == pytest.approx(progress.audio_seconds)
    assert whole["accelerator_seconds"] == pytest.approx(2 * whole["train_seconds"])

    halfway = Progress(step=10, samples=80, audio_seconds=400.0, compute_seconds=70.0, data_wait_seconds=1.0)
    window = figures(progress, world=2, since=halfway)
    assert window["compute_seconds"] == pytest.approx(whole["compute_seconds"] - 70.0)
    assert window["step_seconds"] == pytest.approx(window["compute_seconds"] / 10)
    assert window["samples_per_second"] == pytest.approx(80 / window["train_seconds"])


def test_an_attempts_clock_counts_its_own_steps_and_phases_from_where_it_resumed(monkeypatch):
    now = iter([100.0, 103.0, 104.5, 150.0])  # loop entry, model built, reader ready, report
    monkeypatch.setattr(timing.time, "time", lambda: next(now))
    ticks = iter([0.0, 2.5, 10.0, 11.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    clock = AttemptClock(started=next(now))
    resumed = Progress(step=10, samples=40, compute_seconds=30.0, data_wait_seconds=2.0)
    clock.stamp_model(resumed)
    clock.stamp_data()
    progress = replace(resumed)
    progress.count([{"id": ["a"], "duration_s": [1.0]}], waited=0.5, world=1, computed=4.0)
    with clock.phase("evaluation"):
        pass
    with pytest.raises(OSError), clock.phase("checkpoint"):  # a failed save still took its time
        raise OSError("disk full")
    assert resumed.compute_seconds == 30.0  # the clock copied it, and counts from it
    metrics = clock.metrics(progress)
    assert metrics == {
        "time_attempt": 100.0, "time_model_ready": 103.0, "time_data_ready": 104.5, "time_at": 150.0,
        "time_compute": 4.0, "time_data_wait": 0.5, "time_evaluation": 2.5, "time_checkpoint": 1.0,
        "time_reporting": 0.0,
    }  # fmt: skip


def _ids(groups) -> list[list[str]]:
    return [[str(i) for rows in group for i in rows["id"]] for group, _ in groups]


def test_an_epoch_is_read_in_steps_of_grad_accum_and_skips_what_a_restart_already_trained(tiny_model_dir, tmp_path):
    reader = EpochReader(open_location(str(write_split(tmp_path / "split", [10]))), 2**30)
    plan = _plan(tiny_model_dir, grad_accum=2, batch_size=1)  # micro_batches_per_epoch=4
    whole = _ids(epoch_groups(reader, plan, rank=0, world=2, epoch=0))
    assert [len(group) for group in whole] == [2, 2]  # 4 micro-batches of 1 row: 2 optimizer steps
    assert _ids(epoch_groups(reader, plan, rank=0, world=2, epoch=0, skip=2)) == whole[1:]
    other_rank = _ids(epoch_groups(reader, plan, rank=1, world=2, epoch=0))
    next_epoch = _ids(epoch_groups(reader, plan, rank=0, world=2, epoch=1))
    assert not {i for group in whole for i in group} & {i for group in other_rank for i in group}
    assert next_epoch != whole
    assert all(waited >= 0 for _, waited in epoch_groups(reader, plan, rank=0, world=2, epoch=0))


def _train(worker: Worker, batches: list[Rows]) -> None:
    for rows in batches:
        train_step(worker, [rows])


def test_a_restored_worker_draws_the_dropout_masks_an_uninterrupted_one_draws(tiny_model_dir, tmp_path):
    batches = [_rows(2 * step, 2 * step + 1) for step in range(6)]
    dropout = {"lora": {"dropout": 0.3}, "max_steps": 6}
    for rank in (0, 1):  # each rank has its own dropout stream, and its own generator file
        uninterrupted = _worker(tiny_model_dir, rank=rank, world=2, **dropout)
        _train(uninterrupted, batches)

        first = _worker(tiny_model_dir, rank=rank, world=2, **dropout)
        _train(first, batches[:3])
        progress = Progress(step=3, batches_done=3)
        checkpoint = tmp_path / f"rank{rank}"
        save_checkpoint(checkpoint, first.model, first.optimizer, first.scheduler, first.scaler, asdict(progress))
        save_rng_states(checkpoint, rank)
        torch.rand(1000)  # the interrupted process went on drawing before it died

        resumed = _worker(tiny_model_dir, rank=rank, world=2, **dropout)
        assert restore(resumed, str(checkpoint)) == progress
        _train(resumed, batches[3:])
        for a, b in zip(_weights(uninterrupted), _weights(resumed), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # without the generator file (an older checkpoint), the masks differ: the test above can fail
    lost = _worker(tiny_model_dir, **dropout)
    (tmp_path / "rank0" / "rng" / "rank-0.json").unlink()
    restore(lost, str(tmp_path / "rank0"))
    _train(lost, batches[3:])
    reference = _worker(tiny_model_dir, **dropout)
    _train(reference, batches)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(reference), _weights(lost), strict=True))


def test_ranks_start_from_the_same_adapter_but_draw_different_dropout(tiny_model_dir):
    dropout = {"lora": {"dropout": 0.3}}
    workers, streams = [], []
    for rank in (0, 1, 0):
        workers.append(_worker(tiny_model_dir, rank, 2, **dropout))
        streams.append(torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(_weights(workers[0]), _weights(workers[1]), strict=True))
    assert not torch.equal(streams[0], streams[1])
    assert torch.equal(streams[0], streams[2])
