"""Cost comparison: parameter accounting from configs alone, the FLOP model against torch's own counter, the
projection's arithmetic, and the whole job (full and LoRA through the same Train loop) on a tiny random Whisper."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import WhisperForConditionalGeneration

from tests.builders import write_clip, write_common_voice
from whisper_lora.config import CostConfig, InstanceConfig, LoraConfigSection, load_config
from whisper_lora.cost.measure import Measurement
from whisper_lora.cost.parameters import parameter_budget
from whisper_lora.cost.project import forward_flops, project_instance, workload
from whisper_lora.cost.run import compare_cost
from whisper_lora.models.sizes import SIZES, whisper_config

QV_R32 = LoraConfigSection(rank=32, alpha=64, dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_large_v2_lora_r32_on_q_v_trains_15_7_million_of_1_56_billion():
    budget = parameter_budget("large-v2", QV_R32)
    assert budget.trainable == 15_728_640
    assert budget.total == 1_559_033_600
    assert budget.adapter_bytes() == 62_914_560  # ≈ 63 MB in fp32
    assert budget.trainable_fraction == pytest.approx(0.01009, abs=1e-5)


def test_every_size_is_counted_without_weights():
    expected_base = {
        "tiny": 37_760_640,
        "base": 72_593_920,
        "small": 241_734_912,
        "medium": 763_857_920,
        "large-v2": 1_543_304_960,
        "large-v3": 1_543_490_560,  # one more vocabulary entry, 128 mel bins
    }
    budgets = {size: parameter_budget(size, QV_R32) for size in SIZES}
    assert {size: b.base for size, b in budgets.items()} == expected_base
    for size, budget in budgets.items():
        shape = SIZES[size]
        # q and v in every encoder self-attention, decoder self- and cross-attention: r × (d + d) each
        assert budget.trainable == 3 * shape["layers"] * 2 * 32 * 2 * shape["d_model"]
        assert budget.linear < budget.base
    assert parameter_budget("base").trainable == expected_base["base"]  # full fine-tuning trains everything


@pytest.mark.parametrize("size", ["tiny", "large-v2"])
def test_forward_flops_match_torch_flop_counter(size):
    config = whisper_config(size)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
        with FlopCounterMode(display=False) as counter:
            model(input_features=torch.zeros(1, config.num_mel_bins, 3000), decoder_input_ids=torch.zeros(1, 40).long())
    assert forward_flops(size, 40) == counter.get_total_flops()


def _measurement(mode: str, step_seconds: float) -> Measurement:
    return Measurement(
        mode=mode, precision="fp32", device="CPU", steps=10, batch_size=2, workers=1, learning_rate=1e-3,
        trainable_parameters=1, total_parameters=1, step_seconds=step_seconds, samples_per_second=2 / step_seconds,
        audio_seconds_per_second=5 / step_seconds, train_seconds=1, accelerator_seconds=1, wall_seconds=1,
        peak_memory_bytes=1, model_bytes=1, checkpoint_bytes=1, wer=1, cer=1, primary=1,
    )  # fmt: skip


def test_projection_prices_what_fits_and_scales_with_the_workload():
    a10g = InstanceConfig(name="g5", gpu="A10G", gpu_memory_gib=24, dense_tflops=125, hourly_usd=1.0)
    t4 = InstanceConfig(name="g4dn", gpu="T4", gpu_memory_gib=16, bf16=False, dense_tflops=65, hourly_usd=0.5)
    a100x8 = InstanceConfig(name="p4d", gpu="A100", gpus=8, gpu_memory_gib=40, dense_tflops=312, hourly_usd=32.0)
    cost = CostConfig(target_size="large-v2", audio_hours=100, epochs=2, batch_size=8, int8_slowdown=2.0)
    full, lora = parameter_budget("large-v2"), parameter_budget("large-v2", QV_R32)
    work = workload(cost, _measurement("full", 4.0), tokens_per_utterance=30)
    assert work.seconds_per_utterance == pytest.approx(2.5)
    assert work.utterances == pytest.approx(100 * 3600 / 2.5 * 2)

    def rows(instance, hours=100):
        scaled = workload(cost.model_copy(update={"audio_hours": hours}), _measurement("full", 4.0), 30)
        return {r.mode: r for r in project_instance(cost, instance, full, lora, scaled, 0.8, True)}

    on_a10g = rows(a10g)
    assert not on_a10g["full"].fits and on_a10g["full"].cost_usd is None  # 16 bytes × 1.54 B parameters > 24 GiB
    assert on_a10g["lora"].fits and on_a10g["lora"].precision == "bf16"
    assert on_a10g["full"].memory_gib > 23 > 3 * on_a10g["lora"].memory_gib
    on_a100 = rows(a100x8)
    assert on_a100["full"].fits
    assert on_a100["lora"].gpu_hours == pytest.approx(0.8 * on_a100["full"].gpu_hours)
    assert on_a100["full"].instance_hours == pytest.approx(on_a100["full"].gpu_hours / 8)
    assert on_a100["full"].cost_usd == pytest.approx(on_a100["full"].instance_hours * 32.0)
    assert rows(a100x8, hours=300)["full"].cost_usd == pytest.approx(3 * on_a100["full"].cost_usd)
    on_t4 = rows(t4)
    assert on_t4["lora"].precision == "int8"  # what the trainer picks on a 16 GiB card
    assert not on_t4["full"].fits  # priced by throughput all the same
    assert on_t4["lora"].samples_per_second_per_gpu == pytest.approx(on_t4["full"].samples_per_second_per_gpu / 1.6)
    assert on_t4["lora"].memory_gib < on_a10g["lora"].memory_gib  # int8 base weights


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_compare_cost_measures_full_and_lora_through_the_same_loop(ray_local, tiny_model_dir, tmp_path):
    rows = []
    for index, sentence in enumerate(["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह"]):
        write_clip(tmp_path / "cv" / "hi" / "clips" / f"c{index}.mp3", 1.0 + 0.25 * index)
        rows.append((f"c{index}.mp3", sentence))
    write_common_voice(tmp_path / "cv", "hi", {"train": rows, "dev": rows[:2], "test": rows[:2]})
    config = load_config(
        "ray_jobs/configs/compare_cost.yaml",
        [
            f"data.source.path={tmp_path}/cv",
            f"model.base={tiny_model_dir}",
            f"output_dir={tmp_path}/runs",
            f"train.storage_path={tmp_path}/ray",
            "train.max_steps=3",
            "train.gradient_checkpointing=false",
            "train.lora.rank=4",
            "train.lora.alpha=8",
            "eval.batch_size=2",
        ],
    )
    result = compare_cost(config)
    full, lora = result["measured"]["full"], result["measured"]["lora"]
    assert full["steps"] == lora["steps"] == 3 and full["batch_size"] == lora["batch_size"] == 2
    assert full["trainable_parameters"] == full["total_parameters"]
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 10
    assert lora["total_parameters"] == full["total_parameters"] + lora["trainable_parameters"]
    assert lora["model_bytes"] < full["model_bytes"] < full["checkpoint_bytes"]
    assert full["learning_rate"] == 1e-5 and lora["learning_rate"] == 1e-3
    for measured in (full, lora):
        assert measured["step_seconds"] > 0 and measured["peak_memory_bytes"] > 0 and measured["cer"] >= 0
    assert result["ratios_lora_over_full"]["checkpoint_bytes"] < 1
    assert result["parameters"]["large-v2"]["base"] == 1_543_304_960
    assert {row["instance"] for row in result["projection"]["rows"]} == {"g4dn.xlarge", "g5.2xlarge", "p4d.24xlarge"}

    out = tmp_path / "runs" / "cost-demo" / "cost"
    assert json.loads((out / "cost.json").read_text())["measured"]["lora"] == lora
    table = list(csv.DictReader((out / "cost.csv").open()))
    steps = next(row for row in table if row["quantity"].startswith("step time"))
    assert float(steps["lora_over_full"]) == pytest.approx(result["ratios_lora_over_full"]["step_seconds"])
    report = (out / "cost.md").read_text()
    assert "Assumptions" in report and "does not fit" in report and "15,728,640" not in report  # rank 4 here
    assert (out / "cost.png").stat().st_size > 10_000
    # the full run's checkpoint holds every weight, loadable (the tied output projection stored once)
    checkpoints = sorted((tmp_path / "ray").glob("cost-demo-cost-hi-full-*/checkpoint_*/model.safetensors"))
    weights = load_file(checkpoints[-1])
    assert sum(t.numel() for t in weights.values()) == full["total_parameters"]
