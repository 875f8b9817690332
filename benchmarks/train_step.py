"""LoRA step time: the Ray Train worker loop vs its own ``train_step`` called in a plain loop, and int8 vs fp32.

    .venv/bin/python benchmarks/train_step.py --config ray_jobs/configs/demo.yaml --steps 8

Needs prepared data (``make demo`` or ``whisper-lora prepare``). Plain loops build the worker Ray Train builds (same
plan: model, optimizer, schedule, accumulation) without Ray, in a child process, and call the product's
``train_step`` over batches of the prepared split read up front; the Ray Train loop runs one CPU worker over it.
Two figures each: ``step_s``, the mean compute time of an optimizer step (the loop's own cost), and
``wall_step_s``, wall time per step with data loading and the first step included (evaluation excluded).
Peak memory: RSS high-water mark of the process that trains (each plain mode runs in a fresh child process so
the marks do not mix).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import resource
import statistics
import tempfile

import torch

from whisper_lora.config import load_config
from whisper_lora.data.prepared import iter_batches, prepared_dir, split_dir
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.train.plan import WorkerPlan
from whisper_lora.train.step import build_worker, train_step
from whisper_lora.train.trainer import train_rows, worker_plan


def plain_loop(plan: dict, train_dir: str, precision: str, steps: int, queue) -> None:
    """``steps`` optimizer steps of the product's ``train_step`` on a worker built outside Ray, in ``precision``,
    over the split's first batches (read before the clock starts; cycled when there are fewer)."""
    plan = WorkerPlan.model_validate({**plan, "train": {**plan["train"], "precision": precision}})
    train = plan.train
    worker = build_worker(plan, torch.device("cpu"))
    batches = list(itertools.islice(iter_batches(train_dir, train.batch_size), steps * train.grad_accum))
    groups = [batches[start : start + train.grad_accum] for start in range(0, len(batches), train.grad_accum)]
    times = [train_step(worker, groups[step % len(groups)]).seconds for step in range(steps)]
    wall_step = sum(times) / steps
    queue.put(
        {
            "mode": f"plain {precision}",
            "step_s": round(statistics.fmean(times), 2),
            "wall_step_s": round(wall_step, 2),
            "samples_per_s": round(train.batch_size * train.grad_accum / wall_step, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "trainable": worker.facts["trainable_parameters"],
        }
    )


def in_child(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=plain_loop, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def ray_loop(config) -> dict:
    from whisper_lora.ray_runtime import init_ray
    from whisper_lora.train.trainer import train_one_language

    init_ray(config.ray)
    outcome = train_one_language(config)
    metrics = outcome.final_metrics
    return {
        "mode": "ray train fp32 (1 worker)",
        "step_s": round(metrics["step_seconds"], 2),
        "wall_step_s": round(config.train.batch_size / metrics["samples_per_second"], 2),
        "samples_per_s": round(metrics["samples_per_second"], 3),
        "data_wait_s": round(metrics["data_wait_seconds"], 2),
        "peak_rss_gib": round(metrics["peak_memory_bytes"] / 2**30, 2),
        "trainable": metrics["trainable_parameters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ray_jobs/configs/demo.yaml")
    parser.add_argument("--language", default="hi")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for whisper-lora")
    args = parser.parse_args()
    config = load_config(
        args.config,
        [
            f"train.language={args.language}",
            f"train.batch_size={args.batch_size}",
            f"train.max_steps={args.steps}",
            "train.num_workers=1",
            "train.precision=fp32",
            "train.warmup_steps=0",
            "eval.max_utterances=2",
            f"train.eval_every_steps={args.steps}",
            "train.eval_each_epoch=false",
            # adapters on encoder and decoder over the prepared log-mel, checkpointing, torch's default threads
            "train.freeze_encoder=false",
            "train.lora.target_modules=[q_proj,v_proj]",
            "train.lora.rank=8",
            "train.lora.alpha=16",
            "train.gradient_checkpointing=true",
            f"train.torch_threads={torch.get_num_threads()}",
            # a fresh run every time: the same run name in the same storage would resume the previous benchmark
            f"train.storage_path={tempfile.mkdtemp(prefix='train-step-bench-')}",
            *args.overrides,
        ],
    )
    base = resolve_base_model(config.model.base, config.model.cache_dir).path
    train_dir = str(split_dir(prepared_dir(config), args.language, config.data.train_split))
    eval_dir = str(split_dir(prepared_dir(config), args.language, config.data.eval_split))
    rows = train_rows(config, args.language)
    plan = worker_plan(config, base, args.language, rows, train_dir, eval_dir).model_dump(mode="json")
    results = [in_child(plan, train_dir, precision, args.steps) for precision in ("fp32", "int8")]
    results.append(ray_loop(config))
    for result in results:
        print(json.dumps(result))
    plain, ray_result = results[0], results[2]
    print(
        f"Ray Train overhead vs plain fp32 loop: {ray_result['step_s'] / plain['step_s'] - 1:+.1%} step time, "
        f"{ray_result['wall_step_s'] / plain['wall_step_s'] - 1:+.1%} wall time per step"
    )
    print(
        f"int8 / fp32 plain: step time {results[1]['step_s'] / plain['step_s']:.2f}x, "
        f"peak RSS {results[1]['peak_rss_gib'] / plain['peak_rss_gib']:.2f}x"
    )


if __name__ == "__main__":
    main()
