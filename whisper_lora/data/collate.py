"""Batches for the model: stacked log-mel features, decoder inputs, and labels padded with -100.

Label ids hold the whole sequence ``<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|> text
<|endoftext|>``. The decoder reads it without its last token and predicts it without its first, so every
prompt token after ``<|startoftranscript|>`` is a target: the language and task tokens are learned too.
Padding is ignored by the loss (-100) and is the end token in the decoder input. Trimmed log-mel features
are padded back to Whisper's 30-s window, or to the shorter window ``frames`` names
(``models.audio_context``: ``train.audio_context=clip``); cached encoder output is taken at the length it was
encoded with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from whisper_lora.data.features import pad_log_mel
from whisper_lora.models.audio_context import WHISPER_FRAMES

IGNORE_INDEX = -100
PAD_TOKEN_ID = 50257


def stack_features(features: Sequence[np.ndarray], frames: int = WHISPER_FRAMES) -> torch.Tensor:
    """Trimmed log-mel features of a batch, padded (or cut) to ``frames`` and stacked: (B, mels, frames)."""
    return torch.from_numpy(np.stack([pad_log_mel(np.asarray(f, dtype=np.float32), frames) for f in features]))


def encoder_input(batch: dict[str, np.ndarray], frames: int = WHISPER_FRAMES) -> dict[str, torch.Tensor]:
    """``input_features`` (B, mels, ``frames``) from log-mel, or ``encoder_hidden_states`` (B, positions, d_model)
    from the frozen-encoder cache (every row of a split has its positions), as float32."""
    if "encoder_hidden_states" in batch:
        hidden = np.stack([np.asarray(h) for h in batch["encoder_hidden_states"]]).astype(np.float32)
        return {"encoder_hidden_states": torch.from_numpy(hidden)}
    return {"input_features": stack_features(batch["input_features"], frames)}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """A collated batch on ``device``, as the model's keyword arguments (cached encoder output wrapped the way
    Whisper's forward takes it)."""
    inputs: dict = {name: tensor.to(device) for name, tensor in batch.items()}
    if "encoder_hidden_states" in inputs:
        inputs["encoder_outputs"] = (inputs.pop("encoder_hidden_states"),)
    return inputs


def collate(
    batch: dict[str, np.ndarray], pad_token_id: int = PAD_TOKEN_ID, frames: int = WHISPER_FRAMES
) -> dict[str, torch.Tensor]:
    """Encoder input (see ``encoder_input``), ``decoder_input_ids`` and ``labels`` (B, longest - 1)."""
    sequences: Sequence[np.ndarray] = [np.asarray(ids, dtype=np.int64) for ids in batch["label_ids"]]
    width = max(len(ids) for ids in sequences) - 1
    decoder_input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens = torch.from_numpy(ids)
        decoder_input_ids[row, : len(ids) - 1] = tokens[:-1]
        labels[row, : len(ids) - 1] = tokens[1:]
    return {
        **encoder_input(batch, frames),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }
