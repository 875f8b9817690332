"""Ray Train stage on a tiny random Whisper with 2 CPU workers (gloo DDP): int8 LoRA learns, checkpoints hold
only the adapter, and a run that dies after step k resumes at k and ends at exactly the planned step count."""

import json
from pathlib import Path

import pytest
import ray.train
from safetensors.torch import load_file

from tests.conftest import write_clip, write_common_voice
from whisper_lora.config import load_config
from whisper_lora.prepare import prepare
from whisper_lora.train.loop import train_loop_per_worker
from whisper_lora.train.trainer import build_trainer, outcome_of, train_language

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
SENTENCES = ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह"]


@pytest.fixture(scope="module")
def prepared(ray_local, tiny_model_dir, tmp_path_factory):
    """Four training utterances (one optimizer step per epoch with 2 workers × batch 2) and two eval ones."""
    root = tmp_path_factory.mktemp("train")
    rows = []
    for index, sentence in enumerate(SENTENCES):
        write_clip(root / "cv" / "hi" / "clips" / f"c{index}.mp3", 1.0 + 0.25 * index)
        rows.append((f"c{index}.mp3", sentence))
    write_common_voice(root / "cv", "hi", {"train": rows, "dev": rows[:2], "test": rows[:2]})
    overrides = [
        f"data.source.path={root}/cv",
        "data.languages=hi",
        f"model.base={tiny_model_dir}",
        f"output_dir={root}/runs",
        f"train.storage_path={root}/ray",
        "train.num_workers=2",
        "train.batch_size=2",
        "train.warmup_steps=2",
        "train.gradient_checkpointing=false",
        "eval.batch_size=2",
        "experiment=t",
    ]
    prepare(load_config(None, overrides))
    return overrides


def test_int8_lora_learns_a_fixed_batch_and_checkpoints_only_the_adapter(prepared):
    config = load_config(
        None,
        [
            *prepared,
            "train.precision=int8",
            "train.max_steps=30",
            "train.learning_rate=1e-2",
            "train.lora.target_modules=all-linear",
            "train.lora.dropout=0",
            "train.checkpoints_to_keep=100",
        ],
    )
    outcome = train_language(config)
    assert outcome.final_metrics["step"] == 30
    losses = [metrics["loss"] for metrics in sorted(outcome.reported, key=lambda m: m["step"])]
    assert len(losses) == 30 and losses[-1] <= 0.5 * losses[0]
    tensors = load_file(Path(outcome.adapter_dir) / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)
    lora_params = sum(t.numel() for t in tensors.values())
    assert lora_params == outcome.final_metrics["trainable_parameters"]
    size = (Path(outcome.adapter_dir) / "adapter_model.safetensors").stat().st_size
    assert lora_params * 4 <= size <= lora_params * 4 + 64_000
    assert not list(Path(outcome.best_checkpoint).rglob("model.safetensors"))


def test_run_killed_after_step_k_resumes_at_k_and_meets_the_plan(prepared, tmp_path):
    marker, steps_log = tmp_path / "crashed", tmp_path / "steps.jsonl"
    # batch 1 on 2 workers: two optimizer steps per epoch, so step 3 ends in the middle of the second epoch
    config = load_config(
        None, [*prepared, "train.max_steps=6", "train.max_failures=1", "train.batch_size=1", "train.eval_every_steps=1"]
    )

    def crash_once_after_step_3(plan: dict) -> None:
        report = ray.train.report

        def report_then_maybe_crash(metrics, checkpoint=None, **kwargs):
            report(metrics, checkpoint=checkpoint, **kwargs)
            if ray.train.get_context().get_world_rank() == 0:
                with open(steps_log, "a") as handle:
                    handle.write(json.dumps([metrics["step"], metrics["epoch"]]) + "\n")
            if metrics["step"] == 3 and not marker.exists():
                marker.touch()
                raise RuntimeError("injected worker failure after step 3")

        ray.train.report = report_then_maybe_crash
        train_loop_per_worker(plan)

    trainer = build_trainer(config, "hi", "resume-run")
    trainer.train_loop_per_worker = crash_once_after_step_3
    result = trainer.fit()
    outcome = outcome_of(result, "hi", 8)
    assert marker.exists()
    steps = [tuple(json.loads(line)) for line in steps_log.read_text().splitlines()]
    assert steps == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3)]  # (step, epochs completed): no step repeated
    assert outcome.final_metrics["step"] == 6
