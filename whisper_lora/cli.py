"""``whisper-lora``: one command per stage; every stage takes ``--config CFG`` and ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import get_args

from whisper_lora.config import ConfigError, ModelConfig, TrainConfig, explain, load_config
from whisper_lora.data.sources import SourceError
from whisper_lora.demo.corpus import DEFAULT_PER_SPLIT
from whisper_lora.manifest import ManifestError
from whisper_lora.models.ctranslate2 import CTranslate2FormatError
from whisper_lora.models.resolve import ModelNotFound
from whisper_lora.storage import StorageError, StorageOptions
from whisper_lora.tune.state import TuneStateError

PRECISIONS = tuple(name for name in get_args(TrainConfig.model_fields["precision"].annotation) if name != "auto")
"""What ``--precision`` takes: ``train.precision``'s choices."""


def _with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML run config (see `whisper-lora config`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.languages=mr,hi")
    return parser


def _with_model_cache_and_storage(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--cache-dir`` and the storage section's flags, for a command without a config."""
    cache_dir = ModelConfig.model_fields["cache_dir"]
    parser.add_argument("--cache-dir", default=str(cache_dir.default), help=f"model.cache_dir: {cache_dir.description}")
    for field in ("s3_endpoint", "s3_region"):
        parser.add_argument(f"--{field.replace('_', '-')}", default=None,
                            help=f"storage.{field}: {StorageOptions.model_fields[field].description}")  # fmt: skip
    return parser


def _prepare(args: argparse.Namespace) -> None:
    from whisper_lora.data.prepared import prepared_dir
    from whisper_lora.prepare import prepare

    config = load_config(args.config, args.overrides)
    stats = prepare(config)
    print(json.dumps({"prepared": str(prepared_dir(config)), **stats["total"]}, indent=2, ensure_ascii=False))


def _evaluate(args: argparse.Namespace) -> None:
    from whisper_lora.models.inference import inference_device
    from whisper_lora.score import score

    config = load_config(args.config, args.overrides)
    try:
        device = inference_device(args.device)
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None
    print(json.dumps(score(config, args.split, args.adapter, device, args.precision), indent=2, ensure_ascii=False))


def _train(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from whisper_lora.prepare import ensure_prepared
    from whisper_lora.ray_runtime import init_ray
    from whisper_lora.train.trainer import train_one_language, train_rows, worker_plan

    config = load_config(args.config, args.overrides)
    init_ray(config.ray)
    ensure_prepared(config)
    try:  # the plan every worker would follow, checked before any worker starts
        worker_plan(config, "", config.train_language, train_rows(config, config.train_language), "", "")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    outcome = train_one_language(config)
    summary = {key: value for key, value in asdict(outcome).items() if key != "reported"}
    print(json.dumps({"adapter": outcome.adapter_dir, **summary}, indent=2, ensure_ascii=False, default=str))


def _tune(args: argparse.Namespace) -> None:
    from whisper_lora.console import summary_table
    from whisper_lora.job import tune_languages

    config = load_config(args.config, args.overrides)
    manifest = tune_languages(config)
    print(summary_table(manifest, f"{config.publish.storage.rstrip('/')}/{config.experiment}/manifest.json"))


def _compare_cost(args: argparse.Namespace) -> None:
    from whisper_lora.cost.run import compare_cost

    result = compare_cost(load_config(args.config, args.overrides))
    print(json.dumps({"measured": result["measured"], "ratios_lora_over_full": result["ratios_lora_over_full"]},
                     indent=2, ensure_ascii=False))  # fmt: skip


def _transcribe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from whisper_lora.transcribe import PublishedAdapterError, transcribe_files

    storage = StorageOptions(s3_endpoint=args.s3_endpoint, s3_region=args.s3_region)
    try:
        results = transcribe_files(
            args.adapter, args.files, Path(args.cache_dir), args.base, storage=storage, device=args.device,
            precision=args.precision,
        )  # fmt: skip
    except PublishedAdapterError as exc:
        raise ConfigError(str(exc)) from None
    for path, text in results:
        print(f"{path}\t{text}")


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from whisper_lora.export import ExportError, export_adapter

    storage = StorageOptions(s3_endpoint=args.s3_endpoint, s3_region=args.s3_region)
    try:
        out, record = export_adapter(args.adapter, args.to, Path(args.out) if args.out else None, args.quantization,
                                     args.language, args.base, Path(args.cache_dir), storage)  # fmt: skip
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps({"exported": str(out), **record.model_dump(mode="json", exclude={"files"})}, indent=2))


def _config(args: argparse.Namespace) -> None:
    if args.config or args.overrides:
        print(load_config(args.config, args.overrides).model_dump_json(indent=2))
    else:
        print("\n".join(explain()))


def _demo_corpus(args: argparse.Namespace) -> None:
    from whisper_lora.demo.corpus import build_corpus

    summary = build_corpus(args.out, [code.strip() for code in args.languages.split(",")], args.per_split, args.seed)
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-lora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    _with_config(
        commands.add_parser("prepare", help="run the audio pipeline, write Parquet + stats.json")
    ).set_defaults(run=_prepare)
    _with_config(commands.add_parser("train", help="train one language's adapter with Ray Train")).set_defaults(
        run=_train
    )
    _with_config(
        commands.add_parser("tune", help="the main job: sweep languages × ranks × rates, select, publish")
    ).set_defaults(run=_tune)
    _with_config(
        commands.add_parser("compare-cost", help="full fine-tuning vs LoRA: measured, then projected to GPU-hours")
    ).set_defaults(run=_compare_cost)
    transcribe = commands.add_parser("transcribe", help="transcribe audio files with a published adapter")
    transcribe.add_argument("--adapter", required=True, help="published language directory (path or s3://)")
    transcribe.add_argument("--base", default=None, help="base model spec (default: the manifest's)")
    transcribe.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    transcribe.add_argument("--precision", default=None, choices=PRECISIONS,
                            help="decode in (default: what the manifest says the adapter was scored in)")  # fmt: skip
    _with_model_cache_and_storage(transcribe)
    transcribe.add_argument("files", nargs="+", metavar="FILE", help="audio files or URIs (any format soundfile reads)")
    transcribe.set_defaults(run=_transcribe)
    export = commands.add_parser("export", help="an adapter merged into its base, or converted for faster-whisper")
    export.add_argument("--adapter", required=True, help="published adapter directory, or a checkpoint's adapter")
    export.add_argument("--to", required=True, help="merged (transformers) or ctranslate2 (faster-whisper)")
    export.add_argument("--quantization", default=None, help="ctranslate2: int8_float16, float16 (default), int8, "
                        "float32; merged: float32 (default) or float16")  # fmt: skip
    export.add_argument("--out", default=None, help="directory to write (default artifacts/exports/<lang>-<name>-…)")
    export.add_argument("--language", default=None, help="a checkpoint's language (a published one's is known)")
    export.add_argument("--base", default=None, help="a checkpoint's base model spec (default: the manifest's)")
    _with_model_cache_and_storage(export)
    export.set_defaults(run=_export)
    evaluate = _with_config(commands.add_parser("evaluate", help="score the base model (or base + adapter)"))
    evaluate.add_argument("--split", default=None, help="split to score (default: data.test_split)")
    evaluate.add_argument("--adapter", default=None, help="peft adapter directory; omit for zero-shot")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    evaluate.add_argument("--precision", default=None, choices=PRECISIONS,
                          help="decode in (default: what train.precision trains in there, as jobs score)")  # fmt: skip
    evaluate.set_defaults(run=_evaluate)
    _with_config(commands.add_parser("config", help="print the validated config, or every field's documentation"))
    commands.choices["config"].set_defaults(run=_config)
    corpus = commands.add_parser("demo-corpus", help="write the espeak-ng demo corpus (Common Voice layout)")
    corpus.add_argument("--out", required=True, help="release directory to write")
    corpus.add_argument("--languages", default="mr,hi,ta,te,kn,ml", help="comma-separated codes")
    corpus.add_argument(
        "--per-split", default=DEFAULT_PER_SPLIT, help=f"clips per split and language (default {DEFAULT_PER_SPLIT})"
    )
    corpus.add_argument("--seed", type=int, default=0)
    corpus.set_defaults(run=_demo_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        from whisper_lora.console import quiet

        quiet()
    try:
        args.run(args)
    except (
        ConfigError, SourceError, ModelNotFound, CTranslate2FormatError, ManifestError, StorageError, FileNotFoundError,
        TuneStateError,
    ) as exc:  # fmt: skip
        print(f"whisper-lora: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
