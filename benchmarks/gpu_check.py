"""What to run first on a GPU node: a Whisper size in int8 and bf16 LoRA for a few optimizer steps, measured.

    make gpu-check                                              # whisper-large-v2, int8 and bf16, batch 8
    .venv/bin/python benchmarks/gpu_check.py --model medium --precisions auto,fp16 --steps 20 --json check.json
    .venv/bin/python benchmarks/gpu_check.py --tiny --steps 3   # a random tiny Whisper on CPU (what CI runs)

Each precision trains as a Ray Train worker would: the same precision rule (``train.precision``), model and LoRA
setup and optimizer step (``whisper_lora.train.step.build_worker`` and ``train_step``), without Ray, on synthetic
30-s log-mel batches with real Marathi token labels (Whisper pads every clip to 30 s, so a step costs what it costs
on real audio). A precision the device cannot run is skipped with the rule's reason. Printed and written
(``--json``): samples/s over the timed steps (the first step, with its kernel selection and allocations, is left
out), median step time, peak memory (``torch.cuda.max_memory_allocated`` on a GPU; on CPU the process's RSS
high-water mark, reset before each precision where Linux allows it), trainable parameters, and beside them the
PEFT int8-asr notebook's 0.897 samples/s (whisper-large-v2, int8, LoRA r=32 on q/v, batch 8, one T4).

``--model`` takes a Whisper size (``large-v2`` is ``openai/whisper-large-v2``) or anything ``model.base`` takes;
it is resolved as a run resolves it, into ``model.cache_dir``. ``--tiny`` trains a random d_model-64, 2+2-layer
Whisper with the tokenizer and feature extractor of ``--model`` (default: the demo's base, no download).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import transformers
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

from whisper_lora.config import EvalConfig, LoraConfigSection, ModelConfig, TrainConfig
from whisper_lora.data.audio import SAMPLE_RATE
from whisper_lora.data.features import Featurizer
from whisper_lora.models.resolve import resolve_model
from whisper_lora.models.sizes import SIZES, TINY_RANDOM, config_of, size_of
from whisper_lora.train.plan import Rows, WorkerPlan
from whisper_lora.train.precision import Device, PrecisionChoice, Requested, choose_precision, device_label
from whisper_lora.train.step import build_worker, train_step

LANGUAGE = "mr"
"""The reference notebook's language (Common Voice 11 Marathi)."""
SENTENCES = (
    "आज हवामान खूप छान आहे",
    "मी रोज सकाळी शाळेत जातो",
    "पुण्यात कालपासून पाऊस सुरू झाला आहे",
    "या गावात एक जुने मंदिर आहे आणि लोक तिथे दर्शनासाठी येतात",
)
CLIP_SECONDS = 30.0
REFERENCE = {
    "samples_per_second": 0.897,
    "device": "Tesla T4 (16 GB)",
    "model": "openai/whisper-large-v2",
    "precision": "int8",
    "batch_size": 8,
    "lora": "r=32, alpha 64, q_proj/v_proj",
    "trainable_parameters": 15_728_640,
    "source": "huggingface/peft examples/int8_training/peft_bnb_whisper_large_v2_training.ipynb: Seq2SeqTrainer "
    "train_samples_per_second over 3 epochs of Common Voice 11 Marathi (3,927 clips, fp16 autocast, gradient "
    "checkpointing), its per-epoch evaluation included",
}


@dataclass
class Run:
    """One precision's outcome: ``ran`` with its figures, ``skipped`` (the device cannot run it) or ``failed``."""

    requested: str
    status: str
    reason: str
    """Why this precision (the precision rule's words), why it was skipped, or the error."""
    precision: str | None = None
    samples_per_second: float | None = None
    step_seconds_median: float | None = None
    timed_steps: int = 0
    peak_memory_bytes: int | None = None
    peak_memory_source: str | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    losses: list[float] = field(default_factory=list)


def model_spec(name: str) -> str:
    """A Whisper size's hub id (``large-v2`` → ``openai/whisper-large-v2``); anything else unchanged."""
    return f"openai/whisper-{name}" if name in SIZES else name


def pick_device(name: str | None) -> torch.device:
    """``--device``, else the current CUDA device when there is one, else the CPU; CUDA always with its index
    (int8 weights are placed on ``device.index``)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_check: --device {name} but torch sees no CUDA device (torch {torch.__version__})")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"gpu_check: --device {name}: only cpu and cuda[:N] are trained on")
    return device


def decide(requested: Requested, device: Device) -> PrecisionChoice | str:
    """The precision rule's choice for ``requested`` on ``device``, or its reason why the device cannot run it."""
    try:
        return choose_precision(requested, device)
    except ValueError as exc:
        return str(exc)


def tiny_model(source_dir: str, out: Path) -> str:
    """A random tiny Whisper in ``out`` with the tokenizer and feature extractor of ``source_dir``."""
    extractor = WhisperFeatureExtractor.from_pretrained(source_dir)
    config = config_of({**TINY_RANDOM, "mels": extractor.feature_size})
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    WhisperTokenizer.from_pretrained(source_dir).save_pretrained(out)
    extractor.save_pretrained(out)
    return str(out)


def synthetic_audio(rng: np.random.Generator, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A voiced, syllable-rate modulated signal: what the features hold does not change a step's cost."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140.0 + 40.0 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(harmonic * phase) / harmonic for harmonic in range(1, 11))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)))
    return (0.1 * voiced * envelope + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def synthetic_batch(model_dir: str, batch_size: int) -> Rows:
    """``batch_size`` rows as the prepared split holds them: 30-s log-mel and label ids of Marathi sentences, made
    by the product's own featurizer."""
    featurizer = Featurizer(model_dir)
    rng = np.random.default_rng(0)
    sentences = [SENTENCES[index % len(SENTENCES)] for index in range(batch_size)]
    return {
        "id": np.array([f"synthetic-{index}" for index in range(batch_size)]),
        "input_features": [featurizer.log_mel(synthetic_audio(rng)) for _ in sentences],
        "label_ids": [featurizer.label_ids(sentence, LANGUAGE) for sentence in sentences],
        "duration_s": np.full(batch_size, CLIP_SECONDS),
    }


class PeakMemory:
    """Peak memory of what one precision trains: CUDA's allocator high-water mark on a GPU; on CPU the process's
    RSS high-water mark (VmHWM), reset first where Linux allows it, else the whole process's (ru_maxrss)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5 resets the high-water mark to the current RSS
        except OSError:
            self.source = "process peak RSS since start (ru_maxrss)"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        status = Path("/proc/self/status")
        if status.is_file() and (match := re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE)):
            return int(match[1]) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(plan: WorkerPlan, device: torch.device, batch: Rows, steps: int, reason: str) -> Run:
    """``steps`` + 1 optimizer steps of the worker ``plan`` builds; the first is warm-up, the rest are timed."""
    memory = PeakMemory(device)
    worker = build_worker(plan, device)
    try:
        results = [train_step(worker, [batch])]
        synchronize(device)
        started = time.perf_counter()
        results += [train_step(worker, [batch]) for _ in range(steps)]
        synchronize(device)
        elapsed = time.perf_counter() - started
        rows = len(batch["id"])
        return Run(
            requested=plan.train.precision,
            status="ran",
            reason=reason,
            precision=worker.precision.precision,
            samples_per_second=steps * rows / elapsed,
            step_seconds_median=statistics.median(result.seconds for result in results[1:]),
            timed_steps=steps,
            peak_memory_bytes=memory.peak_bytes(),
            peak_memory_source=memory.source,
            trainable_parameters=worker.facts["trainable_parameters"],
            total_parameters=worker.facts["total_parameters"],
            losses=[round(result.loss, 4) for result in results],
        )
    finally:
        del worker
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_precision(requested: Requested, plan: WorkerPlan, device: torch.device, batch: Rows, steps: int) -> Run:
    """One precision: skipped with the rule's reason where the device cannot run it, a failure (out of memory, a
    missing kernel, a loss that is not finite) recorded with its message rather than ending the check."""
    choice = decide(requested, Device.of(device))
    if isinstance(choice, str):
        return Run(requested=requested, status="skipped", reason=choice)
    plan = plan.model_copy(update={"train": plan.train.model_copy(update={"precision": requested})})
    try:
        return measure(plan, device, batch, steps, choice.reason)
    except Exception as exc:  # a check reports every precision; the traceback still goes to stderr
        traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Run(requested=requested, status="failed", reason=f"{type(exc).__name__}: {message}")


def device_facts(device: torch.device) -> dict:
    here = Device.of(device)
    auto = choose_precision("auto", here)
    return {
        "name": device_label(device),
        "kind": here.kind,
        "memory_gib": round(here.memory_gib, 1),
        "capability": f"{here.capability[0]}.{here.capability[1]}" if here.kind == "cuda" else None,
        "native_bf16": here.bf16,
        "auto_precision": auto.precision,
        "auto_reason": auto.reason,
    }


def versions() -> dict:
    found = {"python": sys.version.split()[0], "cuda": torch.version.cuda}
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def gib(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**30:.2f} GiB"


def table(report: dict) -> str:
    """The check as a person reads it: the setting, the precision rule's choice here, one row per precision."""
    device, setting = report["device"], report["setting"]
    capability = f", compute capability {device['capability']}" if device["capability"] else ""
    memory = f" {device['memory_gib']} GiB" if device["kind"] == "cuda" else ""
    lines = [
        f"{report['model']['name']} ({report['model']['spec']}) on {device['name']}{memory}{capability}",
        f"train.precision=auto here: {device['auto_precision']} ({device['auto_reason']})",
        f"LoRA r={setting['lora_rank']} alpha {setting['lora_alpha']} on {','.join(setting['lora_targets'])}, "
        f"batch {setting['batch_size']} x 30-s log-mel, labels {setting['label_tokens_mean']:.0f} tokens, "
        f"{setting['timed_steps']} steps timed after 1 warm-up step",
        "",
        f"{'precision':<10} {'samples/s':>9} {'vs T4':>7} {'step s':>7} {'peak memory':>12} {'trainable':>12}  status",
    ]
    reference = report["reference"]["samples_per_second"]
    for run in report["runs"]:
        if run["status"] == "ran":
            auto = "; train.precision=auto's choice here" if run["precision"] == device["auto_precision"] else ""
            lines.append(
                f"{run['precision']:<10} {run['samples_per_second']:>9.3f} "
                f"{run['samples_per_second'] / reference:>6.2f}x {run['step_seconds_median']:>7.2f} "
                f"{gib(run['peak_memory_bytes']):>12} {run['trainable_parameters']:>12,}  ran: {run['reason']}{auto}"
            )
        else:
            lines.append(
                f"{run['requested']:<10} {'-':>9} {'-':>7} {'-':>7} {'-':>12} {'-':>12}  "
                f"{run['status']}: {run['reason']}"
            )
    trainable = report["reference"]["trainable_parameters"]
    lines.append(
        f"{'T4 ref':<10} {reference:>9.3f} {1:>6.2f}x {'-':>7} {'-':>12} {trainable:>12,}  PEFT int8-asr notebook: "
        "whisper-large-v2, int8, batch 8, one T4"
    )
    sources = sorted({run["peak_memory_source"] for run in report["runs"] if run["peak_memory_source"]})
    lines.append(f"peak memory: {', '.join(sources) or '-'}. The reference: {report['reference']['source']}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        help=f"a Whisper size ({', '.join(SIZES)}) or any model.base; default large-v2, with --tiny the demo's "
        f"base ({ModelConfig().base})",
    )
    parser.add_argument("--tiny", action="store_true", help="a random tiny Whisper (CPU; what CI runs)")
    parser.add_argument("--precisions", default="int8,bf16", help="comma-separated: auto, int8, bf16, fp16, fp32")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 1 warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per step (the reference: 8)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank on q_proj/v_proj (the reference: 32)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N; default the GPU when there is one")
    parser.add_argument("--threads", type=int, help="train.torch_threads (CPU); default torch's own choice")
    parser.add_argument("--revision", help="model.revision: hub commit, branch or tag (default main)")
    parser.add_argument("--cache-dir", type=Path, default=ModelConfig().cache_dir, help="model.cache_dir")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    args.precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    unknown = [name for name in args.precisions if name not in get_args(Requested)]
    if unknown or not args.precisions:
        parser.error(f"--precisions: {unknown or 'none given'}; choose from {', '.join(get_args(Requested))}")
    if min(args.steps, args.batch_size, args.rank, args.threads or 1) < 1:
        parser.error("--steps, --batch-size, --rank and --threads must be at least 1")
    args.model = args.model or (ModelConfig().base if args.tiny else "large-v2")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every precision ran or was skipped for a stated reason, 1 when one failed."""
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # one bar per model load and save; the table is the output
    device = pick_device(args.device)
    spec = model_spec(args.model)
    try:
        base = resolve_model(ModelConfig(base=spec, revision=args.revision, cache_dir=args.cache_dir)).path
    except ValueError as exc:  # ModelNotFound, or a spec the config refuses: one line, as the CLI says it
        raise SystemExit(f"gpu_check: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        if args.tiny:
            base = tiny_model(base, Path(scratch) / "tiny-whisper")
        train = TrainConfig(
            precision="auto",
            lora=LoraConfigSection(rank=args.rank),
            batch_size=args.batch_size,
            max_steps=args.steps + 1,
            warmup_steps=0,
            torch_threads=args.threads,
        )
        plan = WorkerPlan(
            train=train,
            eval=EvalConfig(),
            base_path=base,
            language=LANGUAGE,
            micro_batches_per_epoch=args.steps + 1,
            train_dir="",  # the check feeds its own batches: no prepared split is read
            eval_dir="",
        )
        batch = synthetic_batch(base, args.batch_size)
        runs = [run_precision(requested, plan, device, batch, args.steps) for requested in args.precisions]
        architecture = WhisperConfig.from_pretrained(base)
    report = {
        "model": {
            "name": "tiny random Whisper" if args.tiny else f"whisper-{size_of(architecture) or 'custom'}",
            "spec": spec,
            "size": size_of(architecture),
            "tiny": args.tiny,
        },
        "device": device_facts(device),
        "setting": {
            "batch_size": args.batch_size,
            "timed_steps": args.steps,
            "warmup_steps_excluded": 1,
            "clip_seconds": CLIP_SECONDS,
            "language": LANGUAGE,
            "label_tokens_mean": float(np.mean([len(ids) for ids in batch["label_ids"]])),
            "lora_rank": args.rank,
            "lora_alpha": train.lora.resolved_alpha,
            "lora_targets": train.lora.target_modules,
            "gradient_checkpointing": train.gradient_checkpointing,
            "torch_threads": torch.get_num_threads(),
        },
        "runs": [asdict(run) for run in runs],
        "reference": REFERENCE,
        "versions": versions(),
    }
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"written: {args.json}")
    return 1 if any(run.status == "failed" for run in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
