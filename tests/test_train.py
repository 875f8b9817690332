"""Ray Train stage on a tiny random Whisper with 2 CPU workers (gloo DDP): int8 LoRA learns and checkpoints hold
only the adapter."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from whisper_lora.config import load_config
from whisper_lora.train.trainer import train_one_language

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def test_int8_lora_learns_a_fixed_batch_and_checkpoints_only_the_adapter(two_worker_corpus):
    config = load_config(
        None,
        [
            *two_worker_corpus,
            "train.precision=int8",
            "train.max_steps=30",
            "train.learning_rate=1e-2",
            "train.lora.target_modules=all-linear",
            "train.lora.dropout=0",
            "train.checkpoints_to_keep=100",
            # evaluate (int8 greedy decoding, the slow part) every 3rd step: each report's loss is its window's mean
            "train.eval_each_epoch=false",
            "train.eval_every_steps=3",
        ],
    )
    outcome = train_one_language(config)
    assert outcome.final_metrics["step"] == 30
    losses = [metrics["loss"] for metrics in sorted(outcome.reported, key=lambda m: m["step"])]
    assert len(losses) == 10 and losses[-1] <= 0.5 * losses[0]
    tensors = load_file(Path(outcome.adapter_dir) / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)
    lora_params = sum(t.numel() for t in tensors.values())
    assert lora_params == outcome.final_metrics["trainable_parameters"]
    size = (Path(outcome.adapter_dir) / "adapter_model.safetensors").stat().st_size
    assert lora_params * 4 <= size <= lora_params * 4 + 64_000
    assert not list(Path(outcome.best_checkpoint).rglob("model.safetensors"))


# Resuming after a worker dies (at step k, from the checkpoint before it, ending at exactly the planned step count
# with the weights of an uninterrupted run) is in tests/test_reliability.py.
