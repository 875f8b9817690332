"""Which precision a worker trains in, and why: a pure function of the request and the device.

- CPU: fp32. bitsandbytes' int8 runs there (the tests use it) but is slower and larger than fp32
  (whisper-base LoRA: 5.8-11 s/step and 3.4 GiB vs 3.5 s and 2.2 GiB), and fp16 autocast is not a CPU path.
- GPU under ``INT8_BELOW_GIB`` of memory: int8 weights (bitsandbytes) make large-v2 LoRA fit a 16 GiB card.
- Larger GPU: bf16 where the card computes it natively (compute capability 8.0 and up: A100, A10G, L4, H100;
  int8 matmuls are several times slower), else fp16 with loss scaling. ``torch.cuda.is_bf16_supported()`` is no
  guide: it counts emulation, so a T4 or V100 answers yes and would train bf16 at a fraction of fp16's speed.

Scores are decoded in the same precision (``scoring_precision``): zero-shot, the trials' dev evaluations and the
test split all run as the adapters train, int8 weights included on a 16-GiB card, so an improvement measures
adaptation, not the difference between two quantisations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["int8", "bf16", "fp16", "fp32"]
Requested = Literal["auto", "int8", "bf16", "fp16", "fp32"]
INT8_BELOW_GIB = 20.0
"""16-GiB-class cards (T4, V100-16) need int8 for large-v2 LoRA; 24 GiB (A10G, L4) fits bf16 with checkpointing."""
BF16_FROM_CAPABILITY = (8, 0)
"""Ampere and later compute bf16 in their tensor cores; Volta (7.0) and Turing (7.5) do not."""


@dataclass(frozen=True)
class Device:
    """What precision choice needs to know about a worker's accelerator."""

    kind: Literal["cpu", "cuda"]
    memory_gib: float = 0.0
    capability: tuple[int, int] = (0, 0)
    """CUDA compute capability (major, minor)."""

    @property
    def bf16(self) -> bool:
        """Native bf16 compute (not emulated)."""
        return self.kind == "cuda" and self.capability >= BF16_FROM_CAPABILITY

    @classmethod
    def current(cls) -> Device:
        """This process's device: the CUDA device Ray Train assigned it, else the CPU."""
        return cls.of(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")

    @classmethod
    def of(cls, device: torch.device | str) -> Device:
        """What ``device`` (``cpu``, ``cuda``, ``cuda:1``) is."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls("cpu")
        properties = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        return cls("cuda", properties.total_memory / 2**30, (properties.major, properties.minor))


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype the frozen base weights are loaded in (int8 keeps fp16 for the non-quantised parts)."""
        return {"int8": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            self.precision
        ]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Mixed-precision compute dtype on GPU; ``None`` trains in fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float16}.get(self.precision)

    @property
    def needs_loss_scaling(self) -> bool:
        return self.precision in ("fp16", "int8")


def choose_precision(requested: Requested, device: Device) -> PrecisionChoice:
    """The precision to train in on ``device``; an explicit request is honoured where it can run at all."""
    if requested != "auto":
        if device.kind == "cpu" and requested in ("fp16", "bf16"):
            raise ValueError(f"precision {requested} needs a GPU; on CPU use fp32 (or int8 to test the int8 path)")
        if requested == "bf16" and not device.bf16:
            raise ValueError(
                f"this GPU (compute capability {device.capability[0]}.{device.capability[1]}) has no native bf16 "
                "(it needs 8.0, Ampere or later): use fp16 or int8"
            )
        return PrecisionChoice(requested, f"requested {requested}")
    if device.kind == "cpu":
        return PrecisionChoice("fp32", "CPU: int8 (bitsandbytes) is slower and larger than fp32 there")
    if device.memory_gib < INT8_BELOW_GIB:
        return PrecisionChoice(
            "int8", f"GPU with {device.memory_gib:.0f} GiB < {INT8_BELOW_GIB:.0f} GiB: int8 weights to fit memory"
        )
    if device.bf16:
        return PrecisionChoice(
            "bf16", f"GPU with {device.memory_gib:.0f} GiB and bf16: fastest (int8 matmuls are slower)"
        )
    major, minor = device.capability
    return PrecisionChoice(
        "fp16",
        f"GPU with {device.memory_gib:.0f} GiB, compute capability {major}.{minor} (no native bf16): fp16 "
        "with loss scaling",
    )


PRECISION_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
"""How manifests before ``scoring_precision`` named a scoring precision (the weights' dtype)."""


def scoring_precision(requested: Requested, device: Device) -> PrecisionChoice:
    """The precision every score of a run is decoded in on ``device``: the one its adapters train in
    (``choose_precision`` of ``train.precision``), for the base model's zero-shot scores as for the trials' dev
    evaluations and the test split, so an adapter's improvement over its base compares like with like (int8
    weights on both sides on a T4, bf16 on an A100, fp32 on CPU)."""
    choice = choose_precision(requested, device)
    return PrecisionChoice(choice.precision, f"as the adapters train: {choice.reason}")


def recorded_precision(name: str | None) -> Precision | None:
    """A precision as a manifest records it (``fp32``, or ``float32`` before the names were unified), or None."""
    name = PRECISION_NAMES.get(name, name) if name else None
    return name if name in ("int8", "bf16", "fp16", "fp32") else None


def device_label(device: torch.device) -> str:
    """How scores and reports name a device: ``cpu (N cores)`` or ``cuda (<accelerator name>)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"
