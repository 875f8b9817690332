"""A race on one wall-clock budget: the PEFT int8-ASR guide's recipe (transformers ``Seq2SeqTrainer``) against this
project's path (the demo job's recipe), on the same base, language, train and dev rows, and scorer.

    .venv/bin/python benchmarks/vs_seq2seq_trainer.py --budget-s 600 --eval-every-s 120 --json race.json

Needs prepared data (``make demo`` or ``whisper-lora prepare --config ray_jobs/configs/demo.yaml``).

The recipe is peft's ``examples/int8_training/peft_bnb_whisper_large_v2_training.ipynb`` on this base: the model
loaded in 8 bits (bitsandbytes; ``--recipe-precision fp32`` loads it in fp32 instead),
``prepare_model_for_kbit_training`` (gradient checkpointing), LoRA r=32, alpha 64, dropout 0.05 on every
``q_proj``/``v_proj`` (encoder and decoder), the guide's ``DataCollatorSpeechSeq2SeqWithPadding`` over 30-s
padded log-mel and the tokenizer's labels (language and task prefix), batch 8, AdamW at 1e-3 after 50 warm-up
steps, fp16 on a GPU, run by ``Seq2SeqTrainer.train``. Its log-mel are the prepared split's, padded back to 30 s
(``pad_log_mel``: equal to ``WhisperFeatureExtractor``'s).

This project's path is what ``ray_jobs/configs/demo.yaml`` trains, through the product's own functions: the frozen
encoder's output cached once inside the budget (``encode.encode``, Ray Data, as the job does; ``--encoder-cache
in-process`` runs its ``EncodeBatch`` in the training process instead, without starting Ray), then decoder LoRA
on the configured modules at the rank the demo sweep published for the language (``--rank`` overrides),
``build_worker`` and ``train_step`` over the epochs ``data.epochs`` orders (as ``benchmarks/train_step.py``,
without the Ray Train wrapper, +1.5% step time there).

Both sides: the same torch threads; a schedule of linear warm-up over the recipe's own warm-up steps, then linear
decay to zero at the end of the budget (the linear schedule both recipes use, with the budget as its horizon: a
step count cannot be known ahead). The training clock starts before the model is loaded (Python imports
excluded) and counts everything but evaluation: model loading, data, the project's Ray start and encoder cache.
A step never stops half-way: training ends at the first step past the budget. Dev WER/CER come from the project's
scorer (``evaluate.score_split``: greedy, language forced, its normaliser) on the same dev rows, once before the
first step and then every ``--eval-every-s`` seconds of training and at the end; evaluation time is off the clock.
The time a side needs to reach the other's final WER is interpolated linearly between its evaluations.
Each side runs in a fresh child process, one after the other: its peak RSS is its own (``peak_tree_rss_gib``
adds its child processes, Ray's during the project's encoding, sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from whisper_lora.config import JobConfig, load_config
from whisper_lora.data.prepared import prepared_dir, split_dir
from whisper_lora.manifest import read_manifest
from whisper_lora.models.resolve import ResolvedModel, resolve_base_model
from whisper_lora.storage import open_location

SIDES = ("recipe", "project")
RECIPE = {
    "rank": 32,
    "alpha": 64,
    "dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 50,
}
"""The guide's settings (its ``LoraConfig`` and ``Seq2SeqTrainingArguments``)."""


class Clock:
    """Training seconds: wall time since the start, less the time spent evaluating."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.off = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.off

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.off += time.perf_counter() - paused


class TreeMemory:
    """Peak RSS of this process and all its descendants, sampled every ``every`` seconds in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Race:
    """One side's run: its training clock, evaluation schedule and (training seconds, dev WER) curve."""

    budget_s: float
    eval_every_s: float
    score: Callable[[torch.nn.Module], dict] | None = None
    """The dev scorer; set once the side has its tokenizer and dev split."""
    clock: Clock = field(default_factory=Clock)
    curve: list[dict] = field(default_factory=list)
    eval_seconds: float = 0.0

    def over(self) -> bool:
        return self.clock.seconds() >= self.budget_s

    def due(self) -> bool:
        """Whether an evaluation is due: every ``eval_every_s`` of training since the first, and at the end."""
        if self.over():
            return True
        return self.clock.seconds() >= self.curve[-1]["train_s"] + self.eval_every_s

    def evaluate(self, model: torch.nn.Module, step: int, samples: int) -> None:
        """Score ``model`` on the dev rows with the clock stopped; one point of the curve."""
        with self.clock.stopped():
            at = self.clock.seconds()
            started = time.perf_counter()
            scores = self.score(model)
            self.eval_seconds += time.perf_counter() - started
        point = {
            "train_s": round(at, 2),
            "step": step,
            "samples": samples,
            "wer": scores["wer"],
            "cer": scores["cer"],
            "utterances": int(scores["utterances"]),
        }
        self.curve.append(point)
        print(f"  {point['train_s']:7.1f} s  step {step:4d}  dev WER {scores['wer']:.3f}  CER {scores['cer']:.3f}",
              flush=True)  # fmt: skip


def budget_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, race: Race
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_steps`` optimizer steps (``get_linear_schedule_with_warmup``'s ramp), then linear
    decay to zero when the training clock reaches the budget."""

    def factor(step: int) -> float:
        ramp = step / max(1, warmup_steps) if step < warmup_steps else 1.0
        return ramp * max(0.0, 1.0 - race.clock.seconds() / race.budget_s)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def dev_scorer(tokenizer, dev_dir: str, setup: dict) -> Callable[[torch.nn.Module], dict]:
    """The project's one split scorer, as training evaluation calls it (cache on, generators untouched)."""
    from whisper_lora.evaluate import score_split

    def score(model: torch.nn.Module) -> dict:
        model.config.use_cache = True
        with torch.random.fork_rng(devices=[]):
            scores = score_split(model, tokenizer, dev_dir, setup["language"], setup["eval_batch_size"],
                                 setup["dev_utterances"], 3, setup["normalizer"])  # fmt: skip
        model.config.use_cache = False
        model.train()
        return scores

    return score


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def figures(race: Race, side: str, steps: int, samples: int, setup_s: float, memory: TreeMemory, **facts) -> dict:
    """What a side reports: its curve and the figures of the table."""
    train_s = race.clock.seconds()
    return {
        "side": side,
        "final_wer": race.curve[-1]["wer"],
        "final_cer": race.curve[-1]["cer"],
        "zero_shot_wer": race.curve[0]["wer"],
        "steps": steps,
        "samples": samples,
        "train_s": round(train_s, 2),
        "setup_s": round(setup_s, 2),
        "samples_per_s": round(samples / train_s, 3),
        "step_samples_per_s": round(samples / max(train_s - setup_s, 1e-9), 3),
        "eval_s": round(race.eval_seconds, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_tree_rss_gib": round(memory.stop() / 2**30, 2),
        "curve": race.curve,
        **facts,
    }


# The recipe: peft's int8 Whisper guide.


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """The guide's collator: features padded by the feature extractor, labels by the tokenizer with -100 on padding,
    a leading decoder-start token dropped (the model prepends it again). The peft notebook compares with the
    tokenizer's ``bos_token_id``, which for Whisper is ``<|endoftext|>`` and never matches; the Whisper
    fine-tuning guide it follows compares with ``decoder_start_token_id``, as here."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_features = [{"input_features": feature["input_features"]} for feature in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": feature["labels"]} for feature in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def recipe_model(base: str, precision: str, where: torch.device) -> torch.nn.Module:
    """The guide's model: int8 (or fp32), prepared for k-bit training, LoRA r=32 on q_proj/v_proj."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    placement = {"": where.index if where.type == "cuda" else "cpu"}
    if precision == "int8":
        model = WhisperForConditionalGeneration.from_pretrained(
            base, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=placement
        )
    else:
        model = WhisperForConditionalGeneration.from_pretrained(base, dtype=torch.float32, device_map=placement)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model.model.encoder.conv1.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    config = LoraConfig(r=RECIPE["rank"], lora_alpha=RECIPE["alpha"], target_modules=RECIPE["target_modules"],
                        lora_dropout=RECIPE["dropout"], bias="none")  # fmt: skip
    model = get_peft_model(model, config)
    model.config.use_cache = False
    return model


def recipe_rows(train_dir: str, tokenizer) -> list[dict]:
    """The train rows as the guide's ``prepare_dataset`` makes them: 30-s log-mel and the tokenizer's labels."""
    from whisper_lora.data.features import pad_log_mel
    from whisper_lora.data.prepared import iter_batches

    rows = []
    for batch in iter_batches(train_dir, 64):
        for features, sentence in zip(batch["input_features"], batch["sentence"], strict=True):
            labels = tokenizer(str(sentence)).input_ids
            rows.append({"input_features": pad_log_mel(features.astype("float32")), "labels": labels})
    return rows


def run_recipe(setup: dict) -> dict:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback, WhisperProcessor
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(setup["threads"])
    memory = TreeMemory()
    processor = WhisperProcessor.from_pretrained(setup["base"], language=setup["language"], task="transcribe")
    race = Race(setup["budget_s"], setup["eval_every_s"], dev_scorer(processor.tokenizer, setup["dev_dir"], setup))
    where = device()
    precision = setup["recipe_precision"]
    model = recipe_model(setup["base"], precision, where)
    rows = recipe_rows(setup["train_dir"], processor.tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=RECIPE["learning_rate"], weight_decay=0.0)  # the Trainer's default
    scheduler = budget_schedule(optimizer, setup["recipe_warmup_steps"], race)
    progress = {"steps": 0}

    class Budget(TrainerCallback):
        """Evaluates when due and stops the Trainer at the end of the budget."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            progress["steps"] = state.global_step
            if race.due():
                seen = _samples_seen(state.global_step, len(rows), args.per_device_train_batch_size)
                race.evaluate(model, state.global_step, seen)
            control.should_training_stop = race.over()
            return control

    with tempfile.TemporaryDirectory(prefix="recipe-") as output_dir:
        args = Seq2SeqTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=RECIPE["batch_size"],
            gradient_accumulation_steps=1,
            learning_rate=RECIPE["learning_rate"],
            warmup_steps=setup["recipe_warmup_steps"],
            max_steps=10**6,  # the budget stops it
            fp16=where.type == "cuda" and precision == "int8",
            remove_unused_columns=False,
            label_names=["labels"],
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=setup["seed"],
            use_cpu=where.type == "cpu",
        )
        trainer = Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
            optimizers=(optimizer, scheduler),
            callbacks=[Budget()],
        )
        trainer.remove_callback(PrinterCallback)  # its summary line; the race prints its own
        setup_s = race.clock.seconds()
        race.evaluate(model, 0, 0)
        trainer.train()
    samples = _samples_seen(progress["steps"], len(rows), RECIPE["batch_size"])
    settings = {**RECIPE, "warmup_steps": setup["recipe_warmup_steps"], "precision": precision}
    return figures(race, "recipe", progress["steps"], samples, setup_s, memory, settings=settings,
                   trainable_parameters=sum(p.numel() for p in trainable))  # fmt: skip


def _samples_seen(steps: int, rows: int, batch_size: int) -> int:
    """Utterances trained on in ``steps`` steps of a Trainer over ``rows`` rows (each epoch's last batch is short)."""
    per_epoch = -(-rows // batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * rows + min(rest * batch_size, rows)


# This project's path: the demo job's recipe through the product's functions.


def encoder_cache(config: JobConfig, base: ResolvedModel, language: str, how: str, threads: int) -> Path:
    """The frozen encoder's output for the train and dev splits, in a fresh run directory: built by the job's own
    ``encode.encode`` (Ray Data actors; ``how="ray"``), or by its ``EncodeBatch`` over the splits in this process
    (``"in-process"``: no Ray start, for small machines and the smoke test). Returns the encoded root."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from whisper_lora.data.prepared import PARQUET_WRITE_ARGS, iter_batches
    from whisper_lora.encode import ENCODE_BATCH, EncodeBatch, encode, encoded_root
    from whisper_lora.ray_runtime import init_ray

    splits = [config.data.train_split, config.data.eval_split]
    if how == "ray":
        init_ray(config.ray)
        try:
            return encode(config, base, [(language, split) for split in splits], torch.cuda.is_available())
        finally:
            ray.shutdown()  # training needs no Ray here: its processes' memory is given back
    root = encoded_root(config, base)
    encoder = EncodeBatch(base.path, threads)
    for split in splits:
        tables = []
        for rows in iter_batches(split_dir(prepared_dir(config), language, split), ENCODE_BATCH):
            count = len(rows["id"])
            tables.append(encoder({**rows, "language": np.full(count, language), "split": np.full(count, split)}))
        directory = split_dir(root, language, split)
        directory.mkdir(parents=True)
        table = pa.concat_tables(tables).drop_columns(["language", "split"])  # in the path, as encode writes them
        pq.write_table(table, directory / "part-0.parquet", use_dictionary=PARQUET_WRITE_ARGS["use_dictionary"])
    return root


def run_project(setup: dict) -> dict:
    from whisper_lora.data.epochs import EpochReader
    from whisper_lora.train.loop import epoch_groups
    from whisper_lora.train.plan import Progress
    from whisper_lora.train.step import build_worker, train_step
    from whisper_lora.train.trainer import worker_plan

    torch.set_num_threads(setup["threads"])
    memory = TreeMemory()
    race = Race(setup["budget_s"], setup["eval_every_s"])
    config = JobConfig.model_validate(setup["config"])
    base = ResolvedModel(**setup["resolved"])
    language, train_split, eval_split = setup["language"], config.data.train_split, config.data.eval_split
    where = device()
    root = encoder_cache(config, base, language, setup["encoder_cache"], setup["threads"])
    encode_s = race.clock.seconds()
    train_dir, dev_dir = (str(split_dir(root, language, split)) for split in (train_split, eval_split))
    reader = EpochReader(open_location(train_dir), config.train.data_cache_mib * 2**20)
    plan = worker_plan(config, base.path, language, reader.bucket_rows, train_dir, dev_dir)
    worker = build_worker(plan, where)
    torch.set_num_threads(setup["threads"])
    worker.scheduler = budget_schedule(worker.optimizer, config.train.warmup_steps, race)
    race.score = dev_scorer(worker.tokenizer, dev_dir, setup)
    progress = Progress()
    setup_s = race.clock.seconds()
    race.evaluate(worker.model, 0, 0)
    while not race.over():
        for micro_batches, waited in epoch_groups(reader, plan, 0, 1, progress.epoch):
            step = train_step(worker, micro_batches)
            progress.count(micro_batches, waited, 1, step.seconds)
            if race.due():
                race.evaluate(worker.model, progress.step, progress.samples)
            if race.over():
                break
        else:
            progress.next_epoch()
    lora = config.train.lora
    settings = {"rank": lora.rank, "alpha": lora.resolved_alpha, "dropout": lora.dropout,
                "target_modules": lora.target_modules, "decoder_only": config.train.freeze_encoder,
                "batch_size": config.train.batch_size, "learning_rate": config.train.learning_rate,
                "warmup_steps": config.train.warmup_steps, "precision": worker.precision.precision,
                "encoder_cache": setup["encoder_cache"]}  # fmt: skip
    return figures(race, "project", progress.step, progress.samples, setup_s, memory, settings=settings,
                   encode_s=round(encode_s, 2), trainable_parameters=worker.facts["trainable_parameters"])  # fmt: skip


def child(side: str, setup: dict, queue) -> None:
    from whisper_lora.console import quiet

    quiet()
    # peft's prepare_model_for_kbit_training still calls the name transformers 5 deprecates
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.* is deprecated", category=FutureWarning)
    print(f"{side}: training for {setup['budget_s']:g} s", flush=True)
    queue.put((run_recipe if side == "recipe" else run_project)(setup))


def run_side(side: str, setup: dict) -> dict:
    """One side in a fresh child process (its own memory high-water mark)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(side, setup, queue))
    process.start()
    while process.is_alive() or not queue.empty():
        with contextlib.suppress(Exception):
            return queue.get(timeout=1)
    raise RuntimeError(f"the {side} run failed (exit status {process.exitcode}); its error is printed above")


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds at which ``curve`` first reaches WER ``target``, linear between evaluations; None if never."""
    for index, point in enumerate(curve):
        if point["wer"] <= target:
            if index == 0:
                return point["train_s"]
            before = curve[index - 1]
            fraction = (before["wer"] - target) / (before["wer"] - point["wer"])
            return round(before["train_s"] + fraction * (point["train_s"] - before["train_s"]), 2)
    return None


def verdict(recipe: dict, project: dict) -> dict:
    """The issue's goal: the project reaches the recipe's final dev WER in at most a third of the recipe's time, or
    ends the same budget at no more than half the recipe's WER. Reaching a WER the project already had before its
    first step is no race won: the time criterion then does not count (``time_counts``)."""
    reached = project["reaches_other_s"]
    time_ratio = None if reached is None else round(reached / recipe["train_s"], 3)
    time_counts = recipe["final_wer"] < project["zero_shot_wer"]
    wer_ratio = round(project["final_wer"] / recipe["final_wer"], 3) if recipe["final_wer"] else None
    by_time = time_counts and time_ratio is not None and time_ratio <= 1 / 3
    met = by_time or (wer_ratio is not None and wer_ratio <= 0.5)
    return {"time_ratio": time_ratio, "time_counts": time_counts, "wer_ratio": wer_ratio, "met": met}


def demo_rank(config: JobConfig, language: str) -> int | None:
    """The rank the demo sweep published for ``language``, when it published one."""
    manifest = read_manifest(open_location(config.publish.storage, config.storage).join(config.experiment))
    adapter = manifest.languages.get(language) if manifest else None
    return adapter.rank if adapter else None


def print_table(result: dict) -> None:
    sides = result["sides"]
    rows = [
        ("dev WER, final", lambda s: f"{s['final_wer']:.3f}"),
        ("dev CER, final", lambda s: f"{s['final_cer']:.3f}"),
        ("dev WER before training", lambda s: f"{s['zero_shot_wer']:.3f}"),
        ("optimizer steps", lambda s: str(s["steps"])),
        ("utterances trained", lambda s: str(s["samples"])),
        ("samples/s (whole budget)", lambda s: f"{s['samples_per_s']:.3f}"),
        ("samples/s (after setup)", lambda s: f"{s['step_samples_per_s']:.3f}"),
        ("setup s (load, data, cache)", lambda s: f"{s['setup_s']:.1f}"),
        ("training s", lambda s: f"{s['train_s']:.1f}"),
        ("evaluation s (off the clock)", lambda s: f"{s['eval_s']:.1f}"),
        ("peak RSS GiB (process)", lambda s: f"{s['peak_rss_gib']:.2f}"),
        ("peak RSS GiB (with children)", lambda s: f"{s['peak_tree_rss_gib']:.2f}"),
        ("trainable parameters", lambda s: f"{s['trainable_parameters']:,}"),
        ("s to reach the other's final WER", lambda s: _seconds(s["reaches_other_s"])),
    ]
    recipe_name = f"recipe ({sides['recipe']['settings']['precision']})"
    print(f"\n{'':34} {recipe_name:>16} {'this project':>16}")
    for label, value in rows:
        print(f"{label:34} {value(sides['recipe']):>16} {value(sides['project']):>16}")
    goal = result["verdict"]
    ratio = "not reached" if goal["time_ratio"] is None else f"{goal['time_ratio']:.2f}x"
    trivial = "" if goal["time_counts"] else ": not counted, the project started there"
    print(f"\nproject's time to the recipe's final WER / the recipe's time: {ratio} (goal ≤ 0.33{trivial})")
    print(f"project's final WER / the recipe's: {goal['wer_ratio']} (goal ≤ 0.5)")
    print(f"goal {'met' if goal['met'] else 'NOT met'}")


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ray_jobs/configs/demo.yaml", help="this project's recipe and data")
    parser.add_argument("--language", default="hi")
    parser.add_argument("--base", help="base model for both sides (default: the config's model.base)")
    parser.add_argument("--prepared", help="prepared data root (default: the config's <run_dir>/prepared)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per side")
    parser.add_argument("--eval-every-s", type=float, default=120.0, help="training seconds between evaluations")
    parser.add_argument("--rank", type=int, help="the project's LoRA rank (default: the demo sweep's published one)")
    parser.add_argument("--recipe-precision", choices=["int8", "fp32"], default="int8")
    parser.add_argument(
        "--encoder-cache",
        choices=["ray", "in-process"],
        default="ray",
        help="the project's encoder cache: the job's encode (Ray Data), or its EncodeBatch in the training process",
    )
    parser.add_argument("--recipe-warmup-steps", type=int, default=RECIPE["warmup_steps"])
    parser.add_argument("--dev-utterances", type=int, help="score at most this many dev rows (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--json", type=Path, help="write every figure and both curves here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for whisper-lora")
    args = parser.parse_intermixed_args()

    config = load_config(args.config, [*([f"model.base={args.base}"] if args.base else []), *args.overrides])
    rank = args.rank or demo_rank(config, args.language) or config.train.lora.rank
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    prepared = Path(args.prepared or prepared_dir(config)).resolve()
    for split in (config.data.train_split, config.data.eval_split):
        if not split_dir(prepared, args.language, split).is_dir():
            parser.error(f"no prepared {args.language}/{split} under {prepared}: run `whisper-lora prepare` first")
    with tempfile.TemporaryDirectory(prefix="race-") as scratch:
        # the project encodes into a fresh run directory: its encoder cache is built inside its budget, never reused
        run_dir = Path(scratch) / config.experiment
        run_dir.mkdir()
        (run_dir / "prepared").symlink_to(prepared)
        project_config = load_config(args.config, [
            *([f"model.base={args.base}"] if args.base else []), *args.overrides,
            f"output_dir={scratch}", f"train.language={args.language}", f"train.lora.rank={rank}",
            "train.lora.alpha=null", "train.num_workers=1", "train.max_steps=1000000",
            f"train.torch_threads={args.threads}", f"train.storage_path={scratch}/ray",
        ])  # fmt: skip
        setup = {
            "base": base.path,
            "resolved": asdict(base),
            "language": args.language,
            "config": project_config.model_dump(mode="json"),
            "train_dir": str(split_dir(prepared, args.language, config.data.train_split)),
            "dev_dir": str(split_dir(prepared, args.language, config.data.eval_split)),
            "budget_s": args.budget_s,
            "eval_every_s": args.eval_every_s,
            "recipe_precision": args.recipe_precision,
            "encoder_cache": args.encoder_cache,
            "recipe_warmup_steps": args.recipe_warmup_steps,
            "dev_utterances": args.dev_utterances or config.eval.max_utterances,
            "eval_batch_size": config.eval.batch_size,
            "normalizer": config.eval.normalizer,
            "threads": args.threads,
            "seed": config.train.seed,
        }
        sides = {side: run_side(side, setup) for side in SIDES}
    recipe, project = sides["recipe"], sides["project"]
    recipe["reaches_other_s"] = time_to_reach(recipe["curve"], project["final_wer"])
    project["reaches_other_s"] = time_to_reach(project["curve"], recipe["final_wer"])
    result = {
        "language": args.language,
        "base": base.spec,
        "base_sha256": base.sha256,
        "budget_s": args.budget_s,
        "eval_every_s": args.eval_every_s,
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "normalizer": config.eval.normalizer,
        "dev_utterances": recipe["curve"][0]["utterances"],
        "sides": sides,
        "verdict": verdict(recipe, project),
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"figures and curves: {args.json}")


if __name__ == "__main__":
    main()
