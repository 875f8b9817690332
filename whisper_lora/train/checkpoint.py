"""Training checkpoints: the adapter (a plain peft directory) plus the state to resume — never the base weights.

Everything is safetensors or JSON: nothing is unpickled from shared storage. Layout::

    adapter/adapter_model.safetensors, adapter/adapter_config.json   (peft save_pretrained)
    model.safetensors                                                (full mode: every weight instead)
    optimizer.safetensors                                            (per-parameter moments)
    trainer_state.json                                               (step, epoch position, schedule, scaler)
    rng/rank-<r>.json                                                (every worker's random generators)

Every worker writes its own random-generator states (Python, NumPy, torch CPU and CUDA) into the same checkpoint
(Ray Train merges the files the workers report into one directory): dropout masks after a restart are the ones an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from whisper_lora.metrics import PRIMARY

ADAPTER_DIR = "adapter"
FULL_WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
RNG_DIR = "rng"


def checkpoint_order(metrics: Mapping[str, Any]) -> tuple[float, int]:
    """Sort key of a reported checkpoint's metrics, best first: the lowest primary metric, ties to the later step.
    Ray's keep-the-best policy (``checkpoint_score_order="min"``) ranks them the same way, so what it keeps and
    what is picked from it agree."""
    return metrics[PRIMARY], -metrics["step"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    progress: dict,
) -> Path:
    """Write a resumable checkpoint into ``directory``; ``progress`` holds step and epoch position."""
    from peft import PeftModel  # here, not at import: the Tune trial reads this module's names only

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner = unwrap(model)
    if isinstance(inner, PeftModel):
        inner.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
    else:
        save_model(inner, str(directory / FULL_WEIGHTS))  # stores the tied output projection once
    tensors, optimizer_rest = _optimizer_tensors(optimizer)
    save_file(tensors, directory / OPTIMIZER)
    state = {
        "progress": progress,
        "optimizer": optimizer_rest,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    (directory / STATE).write_text(json.dumps(state, indent=2))
    return directory


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict:
    """Restore weights and training state from ``directory``; returns the saved ``progress``."""
    from peft import PeftModel, set_peft_model_state_dict

    directory = Path(directory)
    inner = unwrap(model)
    device = next(inner.parameters()).device
    if isinstance(inner, PeftModel):
        set_peft_model_state_dict(inner, load_file(directory / ADAPTER_DIR / "adapter_model.safetensors", device="cpu"))
    else:
        load_model(inner, str(directory / FULL_WEIGHTS), device=str(device))
    state = json.loads((directory / STATE).read_text())
    tensors = load_file(directory / OPTIMIZER, device=str(device))
    per_param: dict[int, dict] = {}
    for key, value in [*tensors.items(), *state["optimizer"]["scalars"].items()]:
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return state["progress"]


def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_states() -> dict:
    """This process's random generators, as JSON-ready values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": _bytes(torch.get_rng_state()),
        "cuda": [_bytes(state) for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Put this process's random generators where ``rng_states`` found them."""
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(_tensor(states["torch"]))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(state) for state in states["cuda"]])


def save_rng_states(directory: str | Path, rank: int) -> None:
    """Write worker ``rank``'s generator states into a checkpoint directory."""
    target = Path(directory) / RNG_DIR / f"rank-{rank}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rng_states()))


def load_rng_states(directory: str | Path, rank: int) -> bool:
    """Restore worker ``rank``'s generators from a checkpoint; False when it holds none for this rank (written
    before generator states were saved, or by a larger worker group)."""
    source = Path(directory) / RNG_DIR / f"rank-{rank}.json"
    if not source.is_file():
        return False
    set_rng_states(json.loads(source.read_text()))
    return True
