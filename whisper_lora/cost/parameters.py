"""What full fine-tuning and LoRA train of each Whisper size, counted from configs alone: models are built on the
meta device, so no weights are downloaded or allocated.

    >>> parameter_budget("large-v2", LoraConfigSection(rank=32, target_modules=["q_proj", "v_proj"])).trainable
    15728640
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from peft import LoraConfig, get_peft_model
from transformers import WhisperForConditionalGeneration

from whisper_lora.config import LoraConfigSection
from whisper_lora.models.sizes import SIZES, whisper_config


@dataclass(frozen=True)
class ParameterBudget:
    """Parameters of one size: the base model's, split by stack, and what LoRA adds and trains."""

    size: str
    base: int
    """Base model parameters (the output projection is tied to the token embedding and counted once)."""
    encoder: int
    decoder: int
    linear: int
    """Weights of the linear layers: what int8 quantises (embeddings, convolutions and norms stay 16-bit)."""
    trainable: int
    """LoRA parameters (all trainable); ``base`` for full fine-tuning."""
    d_model: int
    layers: int
    heads: int
    ffn: int

    @property
    def total(self) -> int:
        """Parameters of the adapted model, base plus adapters (what peft's ``print_trainable_parameters`` shows)."""
        return self.base + self.trainable

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total

    def adapter_bytes(self, bytes_per_parameter: int = 4) -> int:
        """Adapter tensor bytes (fp32 by default, as peft saves them), without file headers."""
        return self.trainable * bytes_per_parameter


@cache
def _meta_counts(size: str) -> tuple[int, int, int, int]:
    """Base parameters, encoder's, decoder's (with the token embedding), linear layers' weights."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(whisper_config(size))
    encoder = sum(p.numel() for p in model.model.encoder.parameters())
    decoder = sum(p.numel() for p in model.model.decoder.parameters())
    linear = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "proj_out"  # proj_out is the tied embedding
    )
    return sum(p.numel() for p in model.parameters()), encoder, decoder, linear


def parameter_budget(size: str, lora: LoraConfigSection | None = None) -> ParameterBudget:
    """Counts for ``size``; ``lora=None`` means full fine-tuning (every parameter trains)."""
    base, encoder, decoder, linear = _meta_counts(size)
    shape = SIZES[size]
    trainable = base if lora is None else _lora_parameters(size, lora)
    return ParameterBudget(
        size, base, encoder, decoder, linear, trainable, shape["d_model"], shape["layers"], shape["heads"], shape["ffn"]
    )


def _lora_parameters(size: str, lora: LoraConfigSection) -> int:
    """Adapter parameters, counted by peft itself on a meta-device model (so module matching is peft's own)."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(whisper_config(size))
        config = LoraConfig(r=lora.rank, lora_alpha=lora.resolved_alpha, target_modules=lora.target_modules)
        peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return trainable
