"""``whisper-lora transcribe --adapter <published adapter dir> FILE…``: what a downstream job does with a
published adapter — find its manifest, copy the adapter into a private directory, check that copy against the
recorded hashes and load exactly it (no gap between check and use), resolve the base model the manifest pins
(checked before any conversion), and transcribe in the adapter's language.

Whisper hears 30 s at a time. A longer recording is cut into 30-s windows that overlap by ``OVERLAP_S`` (a word
cut at one window's edge is whole in the next), each window is decoded (windows of several files share a
batch), and consecutive transcripts are joined where they agree: the longest run of words that ends one and
begins the next is kept once.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperTokenizer

from whisper_lora.data.audio import SAMPLE_RATE, load_audio
from whisper_lora.data.collate import stack_features
from whisper_lora.data.features import Featurizer
from whisper_lora.evaluate import greedy_transcripts
from whisper_lora.manifest import ADAPTER_FILES, MANIFEST, Manifest, PublishedAdapter, adapter_files, read_manifest
from whisper_lora.models.inference import default_precision, inference_device, load_for_inference
from whisper_lora.models.resolve import ModelMismatch, resolve_base_model
from whisper_lora.storage import Location, StorageOptions, open_location
from whisper_lora.train.precision import Device, Precision, recorded_precision, scoring_precision

WINDOW_S = 30.0
"""What Whisper hears at once."""
OVERLAP_S = 5.0
"""Seconds consecutive windows share: a window starts every ``WINDOW_S - OVERLAP_S`` seconds."""
MAX_SECONDS = 3 * 3600.0
"""The longest recording read (3 h: ~690 MB of 16 kHz samples); anything after it is not transcribed."""
MAX_NEW_TOKENS = 440
"""Tokens one window may produce: Whisper's decoder holds 448 positions, 4 of them the prompt."""
log = logging.getLogger(__name__)


class PublishedAdapterError(ValueError):
    """The adapter directory is not what its manifest says (missing entry, hash mismatch, other base)."""


def find_entry(adapter: Location) -> tuple[Manifest, PublishedAdapter]:
    """The manifest and its entry for ``adapter`` (``<experiment>/adapters/<lang>/<name>``)."""
    parts = adapter.uri.rstrip("/").split("/")
    if len(parts) < 4 or parts[-3] != "adapters":
        raise PublishedAdapterError(f"{adapter.uri} is not a published adapter (…/adapters/<lang>/<name>)")
    experiment_dir = adapter.parent.parent.parent
    manifest = read_manifest(experiment_dir)
    if manifest is None:
        raise PublishedAdapterError(f"no {MANIFEST} at {experiment_dir.uri}: publish with `whisper-lora tune` first")
    entry = manifest.languages.get(parts[-2])
    if entry is None or not entry.adapter.rstrip("/").endswith("/".join(parts[-3:])):
        raise PublishedAdapterError(f"{experiment_dir.join(MANIFEST).uri} does not list {adapter.uri} (superseded?)")
    return manifest, entry


def verified_copy(adapter: Location, entry: PublishedAdapter, directory: Path) -> Path:
    """The adapter's files copied into ``directory`` and checked there against the manifest's hashes: what is
    loaded is what was checked, whatever happens to the published copy meanwhile."""
    for name in ADAPTER_FILES:
        adapter.join(name).copy_to(open_location(str(directory / name)))
    if adapter_files(open_location(str(directory))) != entry.files:
        raise PublishedAdapterError(f"{adapter.uri}: files do not match the sha256 recorded in its {MANIFEST}")
    return directory


def windows(audio: np.ndarray, window_s: float = WINDOW_S, overlap_s: float = OVERLAP_S) -> list[np.ndarray]:
    """``audio`` (16 kHz) as windows of ``window_s`` seconds, one starting every ``window_s - overlap_s``; the
    last one ends with the audio. A clip of at most ``window_s`` seconds is one window."""
    size, hop = int(window_s * SAMPLE_RATE), int((window_s - overlap_s) * SAMPLE_RATE)
    starts = range(0, max(len(audio) - (size - hop), 1), hop)
    return [audio[start : start + size] for start in starts]


def _common_run(left: list[str], right: list[str]) -> tuple[int, int, int]:
    """(start in ``left``, start in ``right``, length) of the longest run of equal words in both."""
    best = (len(left), 0, 0)
    previous = [0] * (len(right) + 1)
    for i in range(1, len(left) + 1):
        current = [0] * (len(right) + 1)
        for j in range(1, len(right) + 1):
            if left[i - 1] == right[j - 1]:
                current[j] = previous[j - 1] + 1
                if current[j] > best[2]:
                    best = (i - current[j], j - current[j], current[j])
        previous = current
    return best


def join_overlapping(texts: list[str], overlap_words: int = 24) -> str:
    """Transcripts of consecutive overlapping windows as one text. The last ``overlap_words`` words of the text so
    far and the first ``overlap_words`` of the next are aligned on their longest common run of words: the text
    so far is kept up to the run, the next from the run on (the overlap is heard twice, written once; a word cut
    at a window's edge is dropped in favour of the whole one). Without a common word the texts are concatenated."""
    words: list[str] = []
    for text in texts:
        following = text.split()
        tail = words[-overlap_words:]
        start_left, start_right, length = _common_run(tail, following[:overlap_words])
        if length:
            words = words[: len(words) - len(tail) + start_left] + following[start_right:]
        else:
            words += following
    return " ".join(words)


def _file_windows(
    files: list[str], featurizer: Featurizer, storage: StorageOptions | None
) -> Iterator[tuple[int, np.ndarray]]:
    """(file index, log-mel) of every window of every file, one file's audio in memory at a time."""
    for index, path in enumerate(files):
        audio = load_audio(open_location(path, storage), max_seconds=MAX_SECONDS)
        for window in windows(audio):
            yield index, featurizer.log_mel(window)


def transcribe_audio(
    model: torch.nn.Module,
    tokenizer: WhisperTokenizer,
    features: Iterator[tuple[int, np.ndarray]],
    language: str,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[int, str]:
    """Each file's transcript from its windows' log-mel (``(file index, features)`` in order), decoded greedily
    ``batch_size`` windows at a time in ``language`` and joined where consecutive windows overlap."""
    texts: dict[int, list[str]] = {}
    batch: list[tuple[int, np.ndarray]] = []

    def decode() -> None:
        inputs = {"input_features": stack_features([np.asarray(f) for _, f in batch])}
        with torch.no_grad():
            decoded = greedy_transcripts(model, tokenizer, inputs, language, max_new_tokens)
        for (index, _), text in zip(batch, decoded, strict=True):
            texts.setdefault(index, []).append(text)
        batch.clear()

    for item in features:
        batch.append(item)
        if len(batch) == batch_size:
            decode()
    if batch:
        decode()
    return {index: join_overlapping(parts) for index, parts in texts.items()}


def _device(name: str | None) -> torch.device:
    try:
        return inference_device(name)
    except ValueError as exc:
        raise PublishedAdapterError(f"--{exc}") from None


def decoding_precision(requested: str | None, entry: PublishedAdapter, device: torch.device) -> Precision:
    """``requested`` (``--precision``), else the precision the manifest says the adapter's scores were decoded in,
    else what training would choose on ``device``. A recorded precision this device cannot run (bf16 or fp16 on a
    CPU) gives way to that default, with a warning: transcripts then come from another decoding than the scores."""
    if requested:
        try:
            return scoring_precision(requested, Device.of(device)).precision
        except ValueError as exc:
            raise PublishedAdapterError(f"--precision {requested}: {exc}") from None
    recorded = recorded_precision(entry.precision or (entry.test_scoring.precision if entry.test_scoring else None))
    if recorded:
        try:
            return scoring_precision(recorded, Device.of(device)).precision
        except ValueError as exc:
            log.warning("the adapter was scored in %s, which %s cannot decode in (%s): using %s", recorded, device,
                        exc, default_precision(device))  # fmt: skip
    return default_precision(device)


def transcribe_files(
    adapter: str,
    files: list[str],
    cache_dir: Path,
    base: str | None = None,
    batch_size: int = 8,
    storage: StorageOptions | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> list[tuple[str, str]]:
    """(file, transcript) for every file, with the published ``adapter`` (local path or ``s3://…``), on ``device``
    (``cpu``, ``cuda``, ``cuda:1``; default a GPU when there is one) in ``precision`` (default: the adapter's, see
    ``decoding_precision``); both choices are logged. ``base`` replaces the manifest's base model (unchecked: said
    in a warning)."""
    location = open_location(adapter, storage)
    manifest, entry = find_entry(location)
    pinned = manifest.base_model
    if base is None:
        try:
            resolved = resolve_base_model(pinned.id, cache_dir, expected_sha256=pinned.sha256, revision=pinned.revision)
        except ModelMismatch as exc:
            raise PublishedAdapterError(f"the adapter was trained on other weights: {exc}") from None
    else:
        resolved = resolve_base_model(base, cache_dir)
        log.warning(
            "--base %s replaces the manifest's base %s (sha256 %s…)%s: transcripts are only as good as that match",
            base, pinned.id, pinned.sha256[:12],
            "" if resolved.sha256 == pinned.sha256 else f" with OTHER weights (sha256 {resolved.sha256[:12]}…)",
        )  # fmt: skip
    target = _device(device)
    chosen = decoding_precision(precision, entry, target)
    log.info("transcribing in %s on %s (%s)", entry.language, target, chosen)
    featurizer = Featurizer(resolved.path)
    tokenizer = WhisperTokenizer.from_pretrained(resolved.path)
    with tempfile.TemporaryDirectory(prefix="adapter-") as directory:
        model = load_for_inference(resolved.path, str(verified_copy(location, entry, Path(directory))), target, chosen)
    texts = transcribe_audio(model, tokenizer, _file_windows(files, featurizer, storage), entry.language, batch_size)
    return [(path, texts.get(index, "")) for index, path in enumerate(files)]
