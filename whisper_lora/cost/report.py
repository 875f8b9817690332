"""``cost.json`` (everything), ``cost.csv`` (one row per quantity: full, LoRA, LoRA/full), ``cost.md`` (the tables and
every assumption) and ``cost.png`` (step time, peak memory, checkpoint size, error rate; full vs LoRA)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure

MEASURED_ROWS = [
    # (label, key in a measurement, scale, format)
    ("trainable parameters", "trainable_parameters", 1, "{:,.0f}"),
    ("total parameters", "total_parameters", 1, "{:,.0f}"),
    ("step time, s (mean compute)", "step_seconds", 1, "{:.2f}"),
    ("samples/s (compute + data wait)", "samples_per_second", 1, "{:.3f}"),
    ("audio-seconds/s", "audio_seconds_per_second", 1, "{:.2f}"),
    ("train time, s", "train_seconds", 1, "{:.1f}"),
    ("accelerator-seconds", "accelerator_seconds", 1, "{:.1f}"),
    ("wall time of the Train run, s", "wall_seconds", 1, "{:.1f}"),
    ("peak memory, GiB", "peak_memory_bytes", 2**-30, "{:.2f}"),
    ("model bytes beside the base, MB", "model_bytes", 1e-6, "{:.2f}"),
    ("checkpoint bytes, MB", "checkpoint_bytes", 1e-6, "{:.2f}"),
    ("WER after", "wer", 1, "{:.3f}"),
    ("CER after", "cer", 1, "{:.3f}"),
]


def measured_table(result: dict) -> list[tuple[str, float, float, float | None]]:
    """(quantity, full, LoRA, LoRA/full) for every measured quantity."""
    full, lora = result["measured"]["full"], result["measured"]["lora"]
    rows = []
    for label, key, scale, _ in MEASURED_ROWS:
        a, b = full[key] * scale, lora[key] * scale
        rows.append((label, a, b, b / a if a else None))
    return rows


def write_csv(path: Path, result: dict) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["section", "quantity", "full", "lora", "lora_over_full"])
        for label, a, b, ratio in measured_table(result):
            writer.writerow(["measured", label, a, b, ratio])
        for size, counts in result["parameters"].items():
            writer.writerow([f"parameters {size}", "trainable", counts["base"], counts["lora_trainable"],
                             counts["lora_trainable"] / counts["base"]])  # fmt: skip
        for row in result["projection"]["rows"]:
            if row["mode"] == "full":
                full = row
                continue
            for key in ("memory_gib", "gpu_hours", "cost_usd"):
                a, b = full[key], row[key]
                ratio = b / a if a and b is not None else None
                writer.writerow([f"projection {row['instance']}", key, a, b, ratio])


def _number(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "does not fit" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    full, lora = result["measured"]["full"], result["measured"]["lora"]
    metric = result["metric"].upper()
    lines = [
        f"# Full fine-tuning vs LoRA — whisper-{result['base_model']['size'] or 'custom'}, {result['language']}",
        "",
        f"Measured through the same Ray Train loop: {full['steps']} optimizer steps of batch {full['batch_size']} × "
        f"{full['workers']} worker(s) on {full['device']}; full at lr {full['learning_rate']:g} in "
        f"{full['precision']}, LoRA r={result['lora']['rank']} (alpha {result['lora']['alpha']}, "
        f"{result['lora']['target_modules']}) at lr {lora['learning_rate']:g} in {lora['precision']}. "
        f"Eval split: {result['eval_split']}; zero-shot {metric} {result['zero_shot']['primary']:.3f}.",
        "",
        "| quantity | full | LoRA | LoRA / full |",
        "|---|---|---|---|",
    ]
    for (label, a, b, ratio), (*_, fmt) in zip(measured_table(result), MEASURED_ROWS, strict=True):
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {'' if ratio is None else f'{ratio:.3f}'} |")
    lines += [
        "",
        "## Parameters by size (meta device, no weights loaded)",
        "",
        "| size | base | LoRA trainable | share | adapter fp32 MB | full fp16 MB |",
        "|---|---|---|---|---|---|",
    ]
    for size, c in result["parameters"].items():
        lines.append(
            f"| {size} | {c['base']:,} | {c['lora_trainable']:,} | {c['trainable_fraction']:.2%} | "
            f"{c['adapter_fp32_bytes'] / 1e6:.1f} | {c['full_fp16_bytes'] / 1e6:,.0f} |"
        )
    projection = result["projection"]
    lines += [
        "",
        f"## Projection: whisper-{projection['target_size']}",
        "",
        "| instance | GPU | mode | precision | GiB/GPU | fits | samples/s/GPU | GPU-hours | instance-hours | USD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in projection["rows"]:
        lines.append(
            f"| {row['instance']} | {row['gpu']} | {row['mode']} | {row['precision']} | {row['memory_gib']:.1f} | "
            f"{'yes' if row['fits'] else 'no'} | {row['samples_per_second_per_gpu']:.2f} | "
            f"{_number(row['gpu_hours'])} | {_number(row['instance_hours'])} | {_number(row['cost_usd'], '{:,.0f}')} |"
        )
    lines += ["", "Assumptions:", "", *[f"- {line}" for line in projection["assumptions"]], ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    full, lora = result["measured"]["full"], result["measured"]["lora"]
    panels = [
        ("step time (s)", full["step_seconds"], lora["step_seconds"]),
        ("peak memory (GiB)", full["peak_memory_bytes"] / 2**30, lora["peak_memory_bytes"] / 2**30),
        ("checkpoint (MB)", full["checkpoint_bytes"] / 1e6, lora["checkpoint_bytes"] / 1e6),
        (f"{result['metric'].upper()} after", full["primary"], lora["primary"]),
    ]
    figure = Figure(figsize=(11, 3))
    for axes, (title, a, b) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        bars = axes.bar(["full", "LoRA"], [a, b], color=["#8c8c8c", "#2a7ab9"])
        axes.bar_label(bars, fmt="%.3g")
        axes.set_title(title)
        axes.margins(y=0.2)
    figure.axes[-1].axhline(result["zero_shot"]["primary"], color="#c44", linestyle="--", label="zero-shot")
    figure.axes[-1].legend(loc="lower right", fontsize="small")
    figure.suptitle(f"whisper-{result['base_model']['size'] or 'custom'}, {result['language']}: full vs LoRA")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_cost_report(directory: Path, result: dict) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in ("cost.json", "cost.csv", "cost.md", "cost.png")]
    paths[0].write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    write_csv(paths[1], result)
    paths[2].write_text(markdown(result), encoding="utf-8")
    plot(result, paths[3])
    return paths
