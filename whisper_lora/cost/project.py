"""From a measured comparison to a target workload: GPU-hours, money and memory, full fine-tuning vs LoRA.

The model, stated so a reader can disagree with it (every number lands in ``assumptions``):
- Full fine-tuning time on a GPU = training FLOPs / (peak dense 16-bit TFLOP/s × utilisation). Training FLOPs
  per utterance are counted from the architecture (``forward_flops``) × 3 (forward, backward for activations
  and weights), plus one forward more with gradient checkpointing.
- LoRA time = full time × the LoRA/full step-time ratio measured here (× ``int8_slowdown`` where the card needs
  int8 weights to fit).
- Memory per GPU = weights and training state by bytes per parameter + activations with gradient checkpointing
  (layer inputs kept, one layer recomputed, SDPA attention: no 1500² matrices) + a fixed runtime overhead.
  Full fine-tuning keeps fp32 weights, gradients and two Adam moments (16 bytes per parameter); LoRA keeps the
  frozen base in 16 bits (int8 for linear weights on cards the trainer would give int8) and 16 bytes per adapter
  parameter. No ZeRO/FSDP sharding: data parallel, each GPU holds the whole state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from whisper_lora.config import CostConfig, InstanceConfig
from whisper_lora.cost.measure import Measurement
from whisper_lora.cost.parameters import ParameterBudget
from whisper_lora.models.sizes import ENCODER_POSITIONS, SIZES
from whisper_lora.train.precision import Device, choose_precision

PEFT_T4_SAMPLES_PER_SECOND = 0.897
"""The one published throughput this projection can be held against (large-v2, int8 LoRA, T4, batch 8)."""
FULL_STATE_BYTES = 16
"""fp32 weight + fp32 gradient + AdamW's two fp32 moments, per trained parameter."""
RUNTIME_OVERHEAD_GIB = 1.5
"""CUDA context, cuBLAS workspaces and allocator slack per GPU."""
ACTIVATION_BYTES = 2
"""bf16/fp16 activations under autocast."""
INPUT_FRAMES = 2 * ENCODER_POSITIONS
"""Log-mel frames of a 30-s window (the first convolution's input length)."""


def forward_flops(size: str, tokens: float) -> float:
    """Multiply-adds × 2 of one utterance's forward pass: convolutions, encoder over 1500 positions, decoder over
    ``tokens`` (with cross-attention keys/values over the encoder output) and the output projection."""
    shape = SIZES[size]
    d, layers, ffn, vocab, mels = shape["d_model"], shape["layers"], shape["ffn"], shape["vocab"], shape["mels"]
    positions = ENCODER_POSITIONS
    convolutions = 2 * 3 * (INPUT_FRAMES * mels * d + positions * d * d)
    encoder_layer = 2 * positions * (4 * d * d + 2 * d * ffn) + 2 * 2 * positions * positions * d
    decoder_layer = (
        2 * tokens * (4 * d * d + 2 * d * d + 2 * d * ffn)  # self-attention, cross q/out, MLP
        + 2 * positions * 2 * d * d  # cross-attention keys and values over the encoder output
        + 2 * 2 * tokens * tokens * d
        + 2 * 2 * tokens * positions * d
    )
    return convolutions + layers * (encoder_layer + decoder_layer) + 2 * tokens * d * vocab


def train_flops(size: str, tokens: float, gradient_checkpointing: bool) -> float:
    return forward_flops(size, tokens) * (4 if gradient_checkpointing else 3)


def activation_bytes(size: str, tokens: float, batch_size: int) -> float:
    """Activations held with gradient checkpointing: each layer's input, one layer's internals during its
    recomputation, and the logits (fp32 for the loss, with their gradient)."""
    shape = SIZES[size]
    d, layers, ffn, vocab = shape["d_model"], shape["layers"], shape["ffn"], shape["vocab"]
    kept = ACTIVATION_BYTES * layers * (ENCODER_POSITIONS + tokens) * d
    one_layer = ACTIVATION_BYTES * ENCODER_POSITIONS * (10 * d + 2 * ffn)
    logits = 3 * 4 * tokens * vocab
    return batch_size * (kept + one_layer + logits)


def state_bytes(budget: ParameterBudget, lora_budget: ParameterBudget, mode: str, precision: str) -> float:
    """Weights plus training state on one GPU."""
    if mode == "full":
        return FULL_STATE_BYTES * budget.base
    if precision == "int8":
        base = budget.linear * 1 + (budget.base - budget.linear) * 2
    else:
        base = budget.base * (4 if precision == "fp32" else 2)
    return base + FULL_STATE_BYTES * lora_budget.trainable


@dataclass(frozen=True)
class Projection:
    instance: str
    gpu: str
    mode: str
    precision: str
    memory_gib: float
    fits: bool
    samples_per_second_per_gpu: float
    gpu_hours: float | None
    """None where the mode does not fit the card's memory."""
    instance_hours: float | None
    cost_usd: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    utterances: float
    seconds_per_utterance: float
    tokens_per_utterance: float


def workload(cost: CostConfig, measured: Measurement, tokens_per_utterance: float) -> Workload:
    """The target's utterances (hours × epochs), with this corpus's mean utterance length and label tokens."""
    seconds = measured.audio_seconds_per_second / measured.samples_per_second
    return Workload(cost.audio_hours * 3600 / seconds * cost.epochs, seconds, tokens_per_utterance)


def project_instance(
    cost: CostConfig,
    instance: InstanceConfig,
    full_budget: ParameterBudget,
    lora_budget: ParameterBudget,
    work: Workload,
    lora_over_full_step: float,
    gradient_checkpointing: bool,
) -> list[Projection]:
    """Full and LoRA on one instance type."""
    size = cost.target_size
    activations = activation_bytes(size, work.tokens_per_utterance, cost.batch_size)
    full_seconds = train_flops(size, work.tokens_per_utterance, gradient_checkpointing) / (
        instance.dense_tflops * 1e12 * cost.utilisation
    )
    capability = (8, 0) if instance.bf16 else (7, 5)  # what the precision choice reads of a card: bf16 or not
    lora_precision = choose_precision("auto", Device("cuda", instance.gpu_memory_gib, capability)).precision
    full_precision = "bf16" if instance.bf16 else "fp16"
    lora_seconds = full_seconds * lora_over_full_step * (cost.int8_slowdown if lora_precision == "int8" else 1.0)
    rows = []
    for mode, precision, seconds in (("full", full_precision, full_seconds), ("lora", lora_precision, lora_seconds)):
        memory = (state_bytes(full_budget, lora_budget, mode, precision) + activations) / 2**30 + RUNTIME_OVERHEAD_GIB
        fits = memory <= instance.gpu_memory_gib
        gpu_hours = work.utterances * seconds / 3600 if fits else None
        instance_hours = gpu_hours / instance.gpus if gpu_hours is not None else None
        rows.append(
            Projection(
                instance=instance.name,
                gpu=instance.gpu,
                mode=mode,
                precision=precision,
                memory_gib=memory,
                fits=fits,
                samples_per_second_per_gpu=1 / seconds,
                gpu_hours=gpu_hours,
                instance_hours=instance_hours,
                cost_usd=instance_hours * instance.hourly_usd if instance_hours is not None else None,
            )
        )
    return rows


def assumptions(cost: CostConfig, work: Workload, ratio: float, measured_on: str, checkpointing: bool) -> list[str]:
    return [
        f"workload: {cost.audio_hours:g} h of audio × {cost.epochs:g} epochs = {work.utterances:,.0f} utterances "
        f"of {work.seconds_per_utterance:.2f} s and {work.tokens_per_utterance:.0f} label tokens on average "
        "(this corpus's means)",
        f"target model: whisper-{cost.target_size}; batch {cost.batch_size} per GPU; data parallel, each GPU holds "
        "the whole training state (no ZeRO/FSDP); linear scaling over an instance's GPUs",
        f"full fine-tuning runs at {cost.utilisation:.0%} of the card's peak dense 16-bit TFLOP/s; training FLOPs = "
        f"{'4' if checkpointing else '3'} × forward FLOPs counted from the architecture"
        f"{' (gradient checkpointing recomputes one forward)' if checkpointing else ''}",
        f"LoRA step time = full × {ratio:.3f}, the LoRA/full ratio measured on {measured_on}; "
        f"× {cost.int8_slowdown:g} where the card needs int8 weights (assumed, not measured here)",
        f"memory: full {FULL_STATE_BYTES} bytes per parameter (fp32 weights, gradients, two AdamW moments); LoRA "
        f"base weights in 16 bits (int8 linear weights on cards under 20 GiB, as the trainer chooses), "
        f"{FULL_STATE_BYTES} bytes per adapter parameter; activations {ACTIVATION_BYTES}-byte with gradient "
        f"checkpointing and SDPA attention; {RUNTIME_OVERHEAD_GIB} GiB runtime overhead per GPU",
        "prices: on-demand list prices in the config (edit cost.instances for spot, reserved or other regions)",
        f"a published point to compare with: {PEFT_T4_SAMPLES_PER_SECOND} samples/s for large-v2 int8 LoRA on a T4 at "
        "batch 8 (the PEFT int8 Whisper notebook)",
    ]
