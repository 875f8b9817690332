"""A base Whisper, with or without a published peft adapter, loaded for decoding: the one loader behind
zero-shot scores, ``whisper-lora evaluate`` and ``transcribe``, so a before/after comparison never mixes two
precisions. Training evaluates the model it is training, in the precision it trains in."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedModel, WhisperForConditionalGeneration


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """fp16 on a GPU (Whisper's released precision), fp32 on CPU (half matmuls are slow or missing there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_for_inference(
    base_path: str, adapter_dir: str | None = None, device: torch.device | None = None
) -> PreTrainedModel:
    """``base_path`` (+ the adapter in ``adapter_dir``) on ``device`` (default: a GPU when there is one), eval mode."""
    device = device or inference_device()
    model = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=inference_dtype(device)).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()
