"""Whisper's encoder over only the log-mel frames a set of clips needs, instead of its fixed 30-s window.

Whisper pads every clip to 30 s (3000 log-mel frames, 1500 encoder positions). The demo's clips last 1-9 s, so most
of every encoder pass, and of the decoder's cross-attention over its output, is spent on padding. The encoder has
no structural need for 1500 positions: two convolutions (the second of stride 2), learned positional embeddings and
self-attention layers. Run over the first ``frames`` frames with the first ``frames / 2`` positional embeddings it
gives what whisper.cpp calls a shorter ``audio_ctx``. transformers' ``WhisperEncoder.forward`` refuses any length
but 3000, so ``encode_frames`` runs the same submodules in the same order itself (adapters, gradient checkpointing
and dropout of the modules included); at 3000 frames it equals the standard encoder.

It is not the same function at fewer frames: every position attends to every other, so positions inside the clip
see less trailing silence than at 30 s and come out different (the convolutions alone would agree). A model trained
on short encoder output may therefore score differently under the standard 30-s input every other tool uses; that
is measured (``benchmarks/audio_context.py``), never assumed.

Frame counts (``frames_for``) are whole seconds: the longest clip plus ``TRAILING_S`` of silence, rounded up to a
multiple of ``FRAME_STEP``. Whole seconds keep the number of distinct shapes small (≤ 30: kernels and allocator
blocks are reused) and are even, as the stride-2 convolution needs; the trailing silence keeps the end of speech
inside the window, followed by the silence after which Whisper has always predicted the end of the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # the modeling module (torch's compiler with it) loads where a model is built, not here
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

AudioContext = Literal["full", "clip"]
WHISPER_FRAMES = 3000
"""Log-mel frames of Whisper's 30-s window (100 per second: a 160-sample hop at 16 kHz)."""
FRAMES_PER_SECOND = 100
FRAME_STEP = 100
"""Granularity of a shortened window: one second, 50 encoder positions."""
TRAILING_S = 0.5
"""Silence kept after the longest clip's end."""
_STFT_HALF_WINDOW_FRAMES = 1.25
"""A clip of N samples spans ceil((N + n_fft / 2) / hop) frames: 200 / 160 frames beyond its duration."""


def frames_for(durations_s: Iterable[float], step: int = FRAME_STEP, trailing_s: float = TRAILING_S) -> int:
    """Log-mel frames an encoder run needs for clips of ``durations_s``: the longest one's frames plus
    ``trailing_s`` of silence, rounded up to a multiple of ``step`` (even), at most Whisper's 3000."""
    if step <= 0 or step % 2:
        raise ValueError(f"the frame step must be a positive even number, not {step}")
    longest = max(durations_s, default=0.0)
    if longest <= 0:
        raise ValueError("frames_for needs at least one clip with a positive duration")
    needed = (longest + trailing_s) * FRAMES_PER_SECOND + _STFT_HALF_WINDOW_FRAMES
    return min(WHISPER_FRAMES, step * math.ceil(needed / step))


def context_frames(durations_s: Iterable[float], context: AudioContext) -> int:
    """Frames the encoder runs over under ``context``: Whisper's 3000 (``full``) or ``frames_for`` (``clip``)."""
    if context == "full":
        return WHISPER_FRAMES
    if context == "clip":
        return frames_for(durations_s)
    raise ValueError(f"unknown audio context {context!r}: expected 'full' or 'clip'")


BUCKET_MIN_ROWS = 32
"""Fewest rows a length bucket of the frozen-encoder cache holds (``length_buckets``): few enough buckets that the
rows an epoch leaves out (each bucket's remainder of a global batch) stay a few percent of a split."""


def length_buckets(durations_s: Sequence[float], min_rows: int = BUCKET_MIN_ROWS) -> list[int]:
    """Frame counts to encode clips of ``durations_s`` over, ascending: each clip's own ``frames_for`` (whole
    seconds), neighbouring lengths merged from the shortest up until a bucket holds ``min_rows`` clips; the
    longest clips left over make a bucket of their own if they are at least ``min_rows / 2``, else join the one
    before. A clip goes to the first bucket at least as long as it needs (``bucket_of``)."""
    needed = sorted(frames_for([duration]) for duration in durations_s)
    if not needed:
        raise ValueError("length_buckets needs at least one clip")
    buckets, held = [], 0
    for index, frames in enumerate(needed):
        held += 1
        last_of_length = index + 1 == len(needed) or needed[index + 1] != frames
        if last_of_length and held >= min_rows:
            buckets.append(frames)
            held = 0
    if held:  # the longest clips: a bucket of their own, or with the last one when they are too few for one
        buckets[-1 if held < min_rows // 2 and buckets else len(buckets) :] = [needed[-1]]
    return buckets


def bucket_of(duration_s: float, buckets: Sequence[int]) -> int:
    """Frames of the shortest bucket that holds a clip of ``duration_s`` (the longest bucket for a longer clip)."""
    needed = frames_for([duration_s])
    return next((frames for frames in buckets if frames >= needed), buckets[-1])


def encode_frames(encoder: WhisperEncoder, input_features: torch.Tensor) -> torch.Tensor:
    """Last hidden state (B, frames / 2, d_model) of ``encoder`` over ``input_features`` (B, mels, frames), for any
    even ``frames`` up to the encoder's window: ``WhisperEncoder.forward`` with its positional embeddings sliced to
    the positions the frames give (layer drop and dropout apply in training mode, as there)."""
    stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
    window = encoder.config.max_source_positions * stride
    frames = input_features.shape[-1]
    if frames <= 0 or frames % stride or frames > window:
        raise ValueError(f"the encoder takes a positive multiple of {stride} frames up to {window}, not {frames}")
    embeds = torch.nn.functional.gelu(encoder.conv1(input_features))
    embeds = torch.nn.functional.gelu(encoder.conv2(embeds)).permute(0, 2, 1)
    hidden = embeds + encoder.embed_positions.weight[: embeds.shape[1]]
    hidden = torch.nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        if encoder.training and encoder.layerdrop > 0.0 and torch.rand([]) < encoder.layerdrop:
            continue
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


def encoder_of(model: torch.nn.Module) -> WhisperEncoder:
    """The Whisper encoder inside ``model``: a ``WhisperForConditionalGeneration``, or one wrapped by peft and DDP."""
    return getattr(model, "module", model).get_encoder()


def run_short_encoder(model: torch.nn.Module, inputs: dict) -> dict:
    """``inputs`` (model keyword arguments) with ``input_features`` shorter than Whisper's window replaced by the
    output of ``encode_frames`` over them, which the model's forward takes as ``encoder_outputs`` (it would refuse
    the short features). Inputs of the full window, or already encoded, are returned as they are."""
    features = inputs.get("input_features")
    if features is None or features.shape[-1] == WHISPER_FRAMES:
        return inputs
    rest = {name: value for name, value in inputs.items() if name != "input_features"}
    return {**rest, "encoder_outputs": (encode_frames(encoder_of(model), features),)}
