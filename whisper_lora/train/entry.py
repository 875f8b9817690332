"""The function Ray Train runs on every worker, as Ray ships it: the Train controller (and the Tune trial that builds
the trainer) unpickle it by reference and never call it, so the loop and what it imports (torch's models,
transformers, peft, bitsandbytes) load only in the workers. Importing ``train.loop`` in each trial's controller and
trial process cost ~16 s apiece on a loaded 2-core node."""

from __future__ import annotations


def train_loop_per_worker(config: dict) -> None:
    """``train.loop.train_loop_per_worker`` on the plan the driver made (``train.plan.WorkerPlan`` as JSON)."""
    from whisper_lora.train.loop import train_loop_per_worker as loop

    loop(config)
