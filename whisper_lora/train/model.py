"""The model a worker trains: base Whisper in the chosen precision on the worker's own device, plus LoRA.

int8 weights are placed with ``device_map={"": device}`` — never ``"auto"``, which spreads one worker's model
over every visible GPU and breaks DDP (the known 8-bit multi-GPU trap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

from whisper_lora.config import LoraConfigSection
from whisper_lora.train.precision import PrecisionChoice

Mode = Literal["lora", "full"]


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters; int8 weights count by element, as in their fp16 original."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCount(trainable, sum(p.numel() for p in model.parameters()))


def _conv_output_requires_grad(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def load_for_training(
    base_path: str,
    choice: PrecisionChoice,
    device: torch.device,
    mode: Mode = "lora",
    lora: LoraConfigSection | None = None,
    gradient_checkpointing: bool = True,
    freeze_encoder: bool = False,
) -> torch.nn.Module:
    """Base model (+ LoRA of shape ``lora``, the config's default when None, in ``lora`` mode) ready for the
    optimizer, on ``device``.

    ``freeze_encoder``: only the decoder learns (adapters in decoder modules only; in full mode the encoder's
    weights are frozen), so the encoder's output can be computed once and cached (``whisper_lora.encode``).
    """
    if mode == "full" and choice.precision == "int8":
        raise ValueError("full fine-tuning cannot update int8 weights: use bf16, fp16 or fp32 with mode=full")
    if choice.precision == "int8":
        model = WhisperForConditionalGeneration.from_pretrained(
            base_path,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map={"": device.index if device.type == "cuda" else "cpu"},
            dtype=torch.float16 if device.type == "cuda" else torch.float32,
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        # Full fine-tuning keeps fp32 master weights (autocast computes in bf16/fp16); LoRA freezes the base in
        # the compute dtype, and peft keeps the adapter weights in fp32.
        dtype = torch.float32 if mode == "full" else choice.weight_dtype
        model = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=dtype).to(device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if mode == "full":
        if freeze_encoder:
            model.model.encoder.requires_grad_(False)
        return model
    if gradient_checkpointing and not freeze_encoder:
        # Frozen conv weights give the encoder's input no grad; checkpointed blocks then see no grad to pass back.
        model.model.encoder.conv1.register_forward_hook(_conv_output_requires_grad)
    lora = lora or LoraConfigSection()
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.resolved_alpha,
        lora_dropout=lora.dropout,
        target_modules=decoder_targets(model, lora.target_modules) if freeze_encoder else lora.target_modules,
        bias="none",
    )
    return get_peft_model(model, config)


def decoder_targets(model: torch.nn.Module, names: list[str] | str) -> list[str]:
    """Full names of the decoder's linear layers matching ``names`` (or all of them for ``"all-linear"``).
    A name matches as peft matches it: by its last dotted segments (``v_proj``, ``encoder_attn.v_proj``)."""
    wanted = None if names == "all-linear" else set(names)
    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith("model.decoder.")
        and isinstance(module, torch.nn.Linear)
        and (wanted is None or any(name.endswith(f".{suffix}") for suffix in wanted))
    ]
    if not targets:
        raise ValueError(f"no decoder linear layer matches target modules {names!r}")
    return targets
