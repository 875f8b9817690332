"""The worker loop's parts, without Ray: one optimizer step on a tiny random Whisper, when evaluations happen, how
an epoch of the shard becomes steps, and the position a checkpoint stores."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from whisper_lora.config import EvalConfig, TrainConfig
from whisper_lora.train.checkpoint import STATE, save_checkpoint
from whisper_lora.train.loop import epoch_groups
from whisper_lora.train.step import (
    Progress,
    Rows,
    Worker,
    WorkerPlan,
    build_worker,
    restore,
    should_evaluate,
    train_step,
)

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


def _plan(tiny_model_dir: str, **train: object) -> WorkerPlan:
    settings = {"precision": "fp32", "gradient_checkpointing": False, "warmup_steps": 0, "lora": {"dropout": 0.0}}
    return WorkerPlan(
        train=TrainConfig(**{**settings, **train}),
        eval=EvalConfig(),
        base_path=tiny_model_dir,
        language="hi",
        micro_batches_per_epoch=4,
        eval_dir="unused",
    )


def _worker(tiny_model_dir: str, **train: object) -> Worker:
    return build_worker(_plan(tiny_model_dir, **train), torch.device("cpu"))


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
    progress.count(micro_batches, waited=0.25, world=2)
    progress.train_seconds = 1.5
    assert (progress.step, progress.batches_done, progress.samples, progress.audio_seconds) == (1, 1, 4, 6.0)
    save_checkpoint(tmp_path, worker.model, worker.optimizer, worker.scheduler, worker.scaler, asdict(progress))
    saved = json.loads((tmp_path / STATE).read_text())["progress"]
    assert list(saved) == [
        "step", "epoch", "batches_done", "samples", "audio_seconds", "train_seconds", "data_wait_seconds"
    ]  # fmt: skip

    fresh = _worker(tiny_model_dir)
    assert restore(fresh, str(tmp_path)) == progress
    assert fresh.scheduler.last_epoch == 1
    for a, b in zip(_weights(worker), _weights(fresh), strict=True):
        torch.testing.assert_close(a, b)

    del saved["data_wait_seconds"]  # checkpoints written before the loop timed its data
    (tmp_path / STATE).write_text(json.dumps({**json.loads((tmp_path / STATE).read_text()), "progress": saved}))
    assert restore(fresh, str(tmp_path)).data_wait_seconds == 0.0


class _Shard:
    """What ``epoch_groups`` reads of a Ray Data shard: ``iter_batches`` over ``count`` one-row batches."""

    def __init__(self, count: int) -> None:
        self.count = count

    def iter_batches(self, batch_size: int, drop_last: bool):
        return ({"id": [f"u{index}"]} for index in range(self.count))


def _ids(groups) -> list[list[str]]:
    return [[rows["id"][0] for rows in group] for group, _ in groups]


def test_an_epoch_is_read_in_steps_of_grad_accum_and_skips_what_a_restart_already_trained(tiny_model_dir):
    plan = _plan(tiny_model_dir, grad_accum=2, batch_size=1)  # micro_batches_per_epoch=4
    assert _ids(epoch_groups(_Shard(10), plan, rank=0)) == [["u0", "u1"], ["u2", "u3"]]
    assert _ids(epoch_groups(_Shard(10), plan, rank=0, skip=2)) == [["u2", "u3"]]
    assert _ids(epoch_groups(_Shard(3), plan, rank=0)) == [["u0", "u1"]]  # ran out: no partial step
    assert _ids(epoch_groups(_Shard(2), plan, rank=0, skip=2)) == []
    assert all(waited >= 0 for _, waited in epoch_groups(_Shard(4), plan, rank=0))
    with pytest.raises(RuntimeError, match=r"rank 1: the train shard yielded 0 batch\(es\) of 1"):
        list(epoch_groups(_Shard(0), plan, rank=1))
    with pytest.raises(RuntimeError, match="not one optimizer step of 2"):  # would loop over epochs for ever
        list(epoch_groups(_Shard(1), plan, rank=0))
