"""Plain builders for test inputs (fixtures live in ``conftest.py``): audio clips, Common Voice releases, prepared
splits, random adapters, trial outcomes as Tune reports them."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from ray.data.extensions import ArrowTensorArray

from whisper_lora.manifest import CheckpointScores, Scores, TrialTime
from whisper_lora.tune.select import TrialOutcome


def outcome(
    trial: str,
    language: str,
    rank: int,
    primary: float,
    lr: float = 1e-3,
    step: int = 4,
    checkpoint: str | None = None,
) -> TrialOutcome:
    """A finished trial whose best checkpoint scored ``primary`` (WER = primary, CER = primary / 2)."""
    best = CheckpointScores(primary=primary, wer=primary, cer=primary / 2, raw_wer=primary, utterances=2, step=step)
    return TrialOutcome(trial, language, rank, lr, 2 * rank, best, checkpoint or f"/ckpt/{trial}")


def failed(trial: str, language: str, rank: int, error: str = "RuntimeError: out of memory") -> TrialOutcome:
    return TrialOutcome(trial, language, rank, 1e-3, 2 * rank, None, None, error=error)


ZERO_SHOT = Scores(primary=1.5, wer=1.5, cer=1.2, raw_wer=1.5)
TRIAL_TIME = TrialTime(
    wall=100.0, tune_startup=2.0, train_startup=20.0, model_load=8.0, dataset=1.0, compute=40.0, data_wait=1.0,
    evaluation=20.0, checkpoint=3.0, reporting=2.0, teardown=2.0, other=1.0,
)  # fmt: skip
"""A trial's time split: 31 s of start-up, 40 % optimizer compute."""


def sha256(data: bytes | Path) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tone(seconds: float, rate: int = 48_000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine at ``freq`` with a little noise, shape (frames,) or (frames, channels)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    x = x.astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def write_common_voice(root: Path, language: str, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A Common Voice release: ``root/<language>/<split>.tsv`` rows of (clip file name, sentence)."""
    folder = root / language
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / f"{split}.tsv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            writer.writerow(["client_id", "path", "sentence", "up_votes"])
            writer.writerows([["c", path, sentence, 1] for path, sentence in rows])
    return root


def write_clip(path: Path, seconds: float, rate: int = 48_000, channels: int = 1, fmt: str = "MP3") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, rate, channels=channels), rate, format=fmt)
    return path


def random_adapters(tiny_model_dir: str, root: Path, names: list[str]) -> dict[str, str]:
    """Checkpoint-like directories ``<root>/<name>/adapter/`` holding rank-2 LoRA adapters with random weights
    (one seed per name), for publishing tests; returns name → checkpoint directory."""
    import torch

    from whisper_lora.config import LoraConfigSection
    from whisper_lora.train.model import load_for_training
    from whisper_lora.train.precision import Device, choose_precision

    choice = choose_precision("fp32", Device("cpu"))
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = load_for_training(tiny_model_dir, choice, torch.device("cpu"), "lora", LoraConfigSection(rank=2))
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data.normal_()
        model.save_pretrained(root / name / "adapter")
    return {name: str(root / name) for name in names}


def write_split(directory: Path, files: list[int], row_group_rows: int = 8) -> Path:
    """A prepared-looking split: ``files[i]`` rows in file i, row ids ``r<n>`` numbered through the files."""
    directory.mkdir(parents=True, exist_ok=True)
    number = 0
    for index, rows in enumerate(files):
        ids = [f"r{number + i:03d}" for i in range(rows)]
        table = pa.table(
            {
                "id": ids,
                "duration_s": np.full(rows, 1.5),
                "label_ids": [[50258, 50276, 220 + number + i, 50257] for i in range(rows)],
                "input_features": ArrowTensorArray.from_numpy(
                    np.stack([np.full((4, 6), number + i, dtype=np.float32) for i in range(rows)])
                ),
            }
        )
        pq.write_table(table, directory / f"part-{index}.parquet", row_group_size=row_group_rows)
        number += rows
    return directory


def write_prepared_split(prepared: Path, language: str, split: str, examples: list) -> None:
    """``data.features`` examples written as ``prepare`` lays out one language's split (one Parquet file)."""
    from ray.data.extensions import ArrowVariableShapedTensorArray

    from whisper_lora.data.prepared import split_dir

    features = np.empty(len(examples), dtype=object)
    features[:] = [example.input_features for example in examples]
    table = pa.table(
        {
            "id": [f"{split}-{index:02d}" for index in range(len(examples))],
            "sentence": [example.sentence for example in examples],
            "duration_s": pa.array([example.duration_s for example in examples], pa.float32()),
            "label_ids": pa.array([example.label_ids.tolist() for example in examples], pa.list_(pa.int32())),
            "input_features": ArrowVariableShapedTensorArray.from_numpy(features),
        }
    )
    directory = split_dir(prepared, language, split)
    directory.mkdir(parents=True)
    pq.write_table(table, directory / "part-0.parquet")


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@contextmanager
def benchmark_module(name: str) -> Iterator:
    """``benchmarks/<name>.py`` imported as a module for the duration of the block (registered in ``sys.modules``,
    where its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
