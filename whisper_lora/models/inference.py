"""A base Whisper, with or without a published peft adapter, loaded for decoding in a given precision: the one
loader behind zero-shot and test scores, ``whisper-lora evaluate`` and ``transcribe``. The job passes the
precision its adapters train in (``train.precision.scoring_precision``), so the base model and each adapter are
scored as the trials evaluated them; int8 is bitsandbytes' 8-bit weights, placed as training places them."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import BitsAndBytesConfig, PreTrainedModel, WhisperForConditionalGeneration

from whisper_lora.train.precision import Device, Precision, scoring_precision

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inference_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``) as a torch device, or a GPU when there is one; ``ValueError`` for a
    name torch does not know or a CUDA device that is not there."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r}: {exc}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name}: no such CUDA device is visible here")
    return device


def default_precision(device: torch.device) -> Precision:
    """What ``train.precision: auto`` trains in on ``device``: the precision to decode in when none is given."""
    return scoring_precision("auto", Device.of(device)).precision


def load_for_inference(
    base_path: str,
    adapter_dir: str | None = None,
    device: torch.device | None = None,
    precision: Precision | None = None,
) -> PreTrainedModel:
    """``base_path`` (+ the adapter in ``adapter_dir``) on ``device`` (default: a GPU when there is one) in
    ``precision`` (default: ``default_precision``), eval mode."""
    device = device or inference_device()
    precision = precision or default_precision(device)
    if precision == "int8":
        model = WhisperForConditionalGeneration.from_pretrained(
            base_path,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map={"": (device.index or 0) if device.type == "cuda" else "cpu"},
            dtype=torch.float16 if device.type == "cuda" else torch.float32,
        )
    else:
        model = WhisperForConditionalGeneration.from_pretrained(base_path, dtype=WEIGHT_DTYPES[precision]).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()
