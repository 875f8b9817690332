"""The main job submitted with ``ray job submit`` to a ``ray start --head`` cluster, on a tiny random Whisper: a
sweep over 2 languages × 1 rank run one trial at a time (so that stopping it after the first trial is sure to stop
it midway), stopped there and submitted again, publishes one verified adapter per language with its manifest and
report; a downstream job transcribes with it. And what names a sweep: settings that change results start a new
one, scheduling, resource and logging settings resume the old one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.builders import free_port, sha256, write_clip, write_common_voice
from whisper_lora.config import load_config
from whisper_lora.manifest import MANIFEST, SCHEMA_VERSION, read_manifest
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.storage import open_location

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = {
    "hi": ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह"],
    "ta": ["ஒன்று இரண்டு", "மூன்று நான்கு", "ஐந்து", "ஆறு ஏழு"],
}


def _overrides(root: Path, tiny_model_dir: str) -> list[str]:
    for language, sentences in SENTENCES.items():
        rows = []
        for index, sentence in enumerate(sentences):
            write_clip(root / "cv" / language / "clips" / f"{language}{index}.mp3", 1.0 + 0.2 * index)
            rows.append((f"{language}{index}.mp3", sentence))
        write_common_voice(root / "cv", language, {"train": rows, "dev": rows[:2], "test": rows[:2]})
    return [
        f"data.source.path={root}/cv",
        "data.languages=hi,ta",
        f"model.base={tiny_model_dir}",
        f"model.cache_dir={root}/models",
        f"output_dir={root}/runs",
        f"train.storage_path={root}/ray",
        f"publish.storage={root}/published",
        "experiment=sweep",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.learning_rate=1e-2",
        "train.gradient_checkpointing=false",
        "train.freeze_encoder=true",
        "eval.batch_size=2",
        "tune.ranks=2",
        "tune.max_concurrent_trials=1",  # the second trial starts once the first is done: the stop falls between
    ]


def _as_tree(overrides: list[str]) -> dict:
    from whisper_lora.config import parse_overrides

    return parse_overrides(overrides)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate local cluster (``ray start --head``), as the job-submission path needs; stopped with SIGTERM,
    which shuts down only its own processes (``ray stop`` would stop every Ray on the machine), without the 30 s
    that a SIGTERMed node otherwise spends draining (for Serve proxies; there are none here)."""
    gcs, dashboard, agent, runtime_env_agent, metrics = (free_port() for _ in range(5))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            # the agent ports default to fixed numbers that the session's other local Ray already holds
            f"--dashboard-agent-listen-port={agent}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}",
            "--include-dashboard=true",
            "--num-cpus=4",
            f"--object-store-memory={2**30}",
        ],
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)


def _finished_train_runs(storage: Path, max_steps: int) -> dict[str, list[str]]:
    """Train runs (one per trial) whose last step's checkpoint Ray has registered (its snapshot names it: a
    checkpoint directory can exist before Ray takes the report, and one it never took is not finished), with the
    checkpoints it registered."""
    done = {}
    for snapshot in storage.glob("*-train-trial_id=*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError):
            continue  # being written
        if any(result["metrics"]["step"] == max_steps for result in results):
            done[snapshot.parent.name] = sorted(result["checkpoint_dir_name"] for result in results)
    return done


@pytest.fixture(scope="module")
def swept(ray_head, tiny_model_dir, tmp_path_factory):
    """The main job, submitted with ``ray job submit`` as its docstring says, on the tiny model; stopped with
    ``ray job stop`` once its first trial (of two, run one at a time) has finished and submitted again, as an
    operator would after a driver failure. Returns the config, the manifest, the second submission's output, and
    the Train runs that had finished before the stop (with their checkpoints then, and now)."""
    address, env = ray_head
    env = {**env, "RAY_AUTH_MODE": "token"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    root = tmp_path_factory.mktemp("tune")
    config_file = root / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(_as_tree(_overrides(root, tiny_model_dir))))
    config = load_config(config_file)
    job = ["--address", address, "--working-dir", ".", "--", "python", "ray_jobs/tune_languages.py"]
    job += ["--config", str(config_file)]

    def submit(*options: str) -> subprocess.CompletedProcess:
        for _ in range(15):  # the dashboard answers before the node's job agent is up
            submitted = subprocess.run([ray_cli, "job", "submit", *options, *job], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=900)  # fmt: skip
            if "No available agent" not in submitted.stdout + submitted.stderr:
                return submitted
            time.sleep(2)
        return submitted

    first = submit("--submission-id", "sweep-1", "--no-wait")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    storage, steps = Path(config.train.storage_path), config.train.max_steps
    deadline = time.monotonic() + 600
    while not _finished_train_runs(storage, steps) and time.monotonic() < deadline:
        time.sleep(0.5)
    finished_before = _finished_train_runs(storage, steps)
    stopped = subprocess.run([ray_cli, "job", "stop", "--address", address, "sweep-1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert len(finished_before) == 1, finished_before  # stopped in the middle of the sweep: one trial of two
    assert not (Path(config.publish.storage) / config.experiment / MANIFEST).exists()

    second = submit("--submission-id", "sweep-2")
    output = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in output, output[-8000:]
    finished_after = _finished_train_runs(storage, steps)
    runs = {name: (checkpoints, finished_after.get(name)) for name, checkpoints in finished_before.items()}
    return config, read_manifest(open_location(config.publish.storage).join(config.experiment)), output, runs


@pytest.mark.ray
@pytest.mark.reliability
@pytest.mark.timeout(900)
def test_a_stopped_job_resumes_its_sweep_without_retraining_finished_trials(swept):
    _, manifest, output, runs = swept
    assert "resuming sweep" in output
    for name, (before, after) in runs.items():
        assert after == before, name  # no new checkpoint: the finished trial was not trained again
    assert len(manifest.trials) == 2 and not manifest.failed_trials


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_publishes_one_verified_adapter_per_language(swept):
    config, manifest, _, _ = swept
    published = Path(config.publish.storage).resolve() / config.experiment
    assert sorted(manifest.languages) == ["hi", "ta"]
    assert len(manifest.trials) == 2 and not manifest.failed_trials
    assert manifest.base_model.sha256 == resolve_base_model(config.model.base, config.model.cache_dir).sha256
    for language, entry in manifest.languages.items():
        trials = [t for t in manifest.trials if t.language == language]
        assert entry.value == min(t.primary for t in trials)  # the selection is the language's best trial
        assert entry.metric == {"hi": "wer", "ta": "cer"}[language]
        assert entry.zero_shot.primary >= 0 and entry.eval.utterances == 2
        adapter = Path(entry.adapter)
        assert adapter.parent.parent.parent == published
        for name, recorded in entry.files.items():
            assert sha256(adapter / name) == recorded.sha256
            assert (adapter / name).stat().st_size == recorded.bytes
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == entry.rank
    assert json.loads((published / MANIFEST).read_text()) == json.loads(manifest.to_json())
    assert manifest.schema_version == SCHEMA_VERSION and all(t.best_step for t in manifest.trials)
    for name in ("report.md", "error_by_rank.png", "best_vs_zero_shot.png"):
        assert (published / name).stat().st_size > 0
    assert "| hi | WER |" in (published / "report.md").read_text()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_downstream_job_transcribes_with_the_published_adapter(swept, tmp_path):
    from whisper_lora.transcribe import PublishedAdapterError, transcribe_files

    config, manifest, _, _ = swept
    clip = write_clip(tmp_path / "a.wav", 1.5, rate=16_000, fmt="WAV")
    adapter = manifest.languages["hi"].adapter
    [(path, text)] = transcribe_files(adapter, [str(clip)], config.model.cache_dir)
    assert path == str(clip) and isinstance(text, str)
    tampered = tmp_path / "sweep" / "adapters" / "hi" / "x"
    tampered.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tampered / name).write_bytes((Path(adapter) / name).read_bytes())
    hindi = manifest.languages["hi"].model_copy(update={"adapter": str(tampered)})
    (tmp_path / "sweep" / MANIFEST).write_bytes(manifest.model_copy(update={"languages": {"hi": hindi}}).to_json())
    with open(tampered / "adapter_model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PublishedAdapterError, match="sha256"):
        transcribe_files(str(tampered), [str(clip)], config.model.cache_dir)


def _named(tmp_path: Path, *overrides: str) -> str:
    from whisper_lora.tune.sweep import sweep_name

    return sweep_name(load_config(None, [f"data.source.path={tmp_path}", "tune.ranks=4,8", *overrides]))


@pytest.mark.parametrize(
    "override",
    [
        "tune.max_concurrent_trials=3",
        "train.cpus_per_worker=1",
        "train.torch_threads=2",
        "train.max_failures=5",
        "train.log_every_steps=1",
        "train.checkpoints_to_keep=4",
        "train.storage_path=s3://bucket/ray",
        "tune.state_dir=/elsewhere/tune",
        "eval.batch_size=1",
        "tracking.mlflow=true",
        "tracking.tensorboard=false",
        "train.seed=0",  # a default written out is the same plan
        "train.learning_rate=0.5",  # every trial takes its own from tune.learning_rates
    ],
)
def test_scheduling_resources_and_logging_keep_the_sweep(tmp_path, override):
    assert _named(tmp_path, override) == _named(tmp_path)


@pytest.mark.parametrize(
    "override",
    [
        "tune.learning_rates=1e-3,3e-4",
        "tune.ranks=4,16",
        "train.seed=1",
        "train.max_steps=50",
        "train.batch_size=2",
        "train.lora.target_modules=all-linear",
        "data.languages=hi",
        "eval.max_utterances=10",
        "tune.asha.enabled=true",
    ],
)
def test_what_changes_results_starts_a_new_sweep(tmp_path, override):
    assert _named(tmp_path, override) != _named(tmp_path)


def test_every_exclusion_names_a_config_field():
    from pydantic import BaseModel

    from whisper_lora.config import JobConfig
    from whisper_lora.tune.sweep import NOT_IDENTITY

    for dotted in NOT_IDENTITY:
        model: type[BaseModel] = JobConfig
        *parents, leaf = dotted.split(".")
        for name in parents:
            model = model.model_fields[name].annotation
        assert leaf in model.model_fields, dotted
