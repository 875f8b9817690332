"""The main job on a tiny random Whisper: a sweep over 2 languages × 2 ranks publishes one verified adapter per
language with its manifest and report; selection, early stopping, and publishing (interrupted, not worse, S3)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import random_adapters, write_clip, write_common_voice
from whisper_lora.config import load_config
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.publish import MANIFEST, open_storage, publish_selection, read_manifest
from whisper_lora.tune.search import PerLanguageASHA, max_concurrent_trials, trial_config
from whisper_lora.tune.select import TrialOutcome, select_best, trial_outcome

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
        "tune.ranks=2,4",
    ]


def _as_tree(overrides: list[str]) -> dict:
    from whisper_lora.config import parse_overrides

    return parse_overrides(overrides)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate local cluster (``ray start --head``), as the job-submission path needs; stopped with SIGTERM,
    which shuts down only its own processes (``ray stop`` would stop every Ray on the machine)."""
    gcs, dashboard, agent, runtime_env_agent, metrics = (_free_port() for _ in range(5))
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
        env=env,
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
    ``ray job stop`` once its first trial has finished and submitted again, as an operator would after a
    driver failure. Returns the config, the manifest, the second submission's output, and the Train runs that had
    finished before the stop (with their checkpoints then, and now)."""
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
    assert 1 <= len(finished_before) < 4, finished_before  # stopped in the middle of the sweep
    assert not (Path(config.publish.storage) / config.experiment / MANIFEST).exists()

    second = submit("--submission-id", "sweep-2")
    output = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in output, output[-8000:]
    finished_after = _finished_train_runs(storage, steps)
    runs = {name: (checkpoints, finished_after.get(name)) for name, checkpoints in finished_before.items()}
    return config, read_manifest(open_storage(config.publish.storage), config.experiment), output, runs


@pytest.mark.ray
@pytest.mark.reliability
@pytest.mark.timeout(900)
def test_a_stopped_job_resumes_its_sweep_without_retraining_finished_trials(swept):
    _, manifest, output, runs = swept
    assert "resuming sweep" in output
    for name, (before, after) in runs.items():
        assert after == before, name  # no new checkpoint: the finished trial was not trained again
    assert len(manifest["trials"]) == 4 and not manifest["failed_trials"]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_publishes_one_verified_adapter_per_language(swept):
    config, manifest, _, _ = swept
    published = Path(config.publish.storage).resolve() / config.experiment
    assert sorted(manifest["languages"]) == ["hi", "ta"]
    assert len(manifest["trials"]) == 4 and not manifest["failed_trials"]
    assert manifest["base_model"]["sha256"] == resolve_base_model(config.model.base, config.model.cache_dir).sha256
    for language, entry in manifest["languages"].items():
        trials = [t for t in manifest["trials"] if t["language"] == language]
        assert entry["value"] == min(t["primary"] for t in trials)  # the selection is the language's best trial
        assert entry["metric"] == {"hi": "wer", "ta": "cer"}[language]
        assert entry["zero_shot"]["primary"] >= 0 and entry["eval"]["utterances"] == 2
        adapter = Path(entry["adapter"])
        assert adapter.parent.parent.parent == published
        for name, recorded in entry["files"].items():
            assert _sha256(adapter / name) == recorded["sha256"]
            assert (adapter / name).stat().st_size == recorded["bytes"]
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == entry["rank"]
    assert json.loads((published / MANIFEST).read_text()) == manifest
    for name in ("report.md", "error_by_rank.png", "best_vs_zero_shot.png"):
        assert (published / name).stat().st_size > 0
    assert "| hi | WER |" in (published / "report.md").read_text()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_downstream_job_transcribes_with_the_published_adapter(swept, tmp_path):
    from whisper_lora.transcribe import PublishedAdapterError, transcribe_files

    config, manifest, _, _ = swept
    clip = write_clip(tmp_path / "a.wav", 1.5, rate=16_000, fmt="WAV")
    adapter = manifest["languages"]["hi"]["adapter"]
    [(path, text)] = transcribe_files(adapter, [str(clip)], config.model.cache_dir)
    assert path == str(clip) and isinstance(text, str)
    tampered = tmp_path / "sweep" / "adapters" / "hi" / "x"
    tampered.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tampered / name).write_bytes((Path(adapter) / name).read_bytes())
    (tmp_path / "sweep" / MANIFEST).write_text(
        json.dumps({**manifest, "languages": {"hi": {**manifest["languages"]["hi"], "adapter": str(tampered)}}})
    )
    with open(tampered / "adapter_model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PublishedAdapterError, match="sha256"):
        transcribe_files(str(tampered), [str(clip)], config.model.cache_dir)


def _outcome(trial: str, language: str, rank: int, primary: float, lr: float = 1e-3, step: int = 4, checkpoint=None):
    best = {"primary": primary, "wer": primary, "cer": primary / 2, "raw_wer": primary, "utterances": 2, "step": step}
    return TrialOutcome(trial, language, rank, lr, 2 * rank, best, checkpoint or f"/ckpt/{trial}")


def test_selection_takes_the_lowest_metric_and_ties_go_to_the_smaller_rank():
    outcomes = [
        _outcome("a", "hi", 8, 0.40),
        _outcome("b", "hi", 32, 0.35),
        _outcome("c", "ta", 32, 0.20),
        _outcome("d", "ta", 8, 0.20),
        TrialOutcome("e", "ta", 4, 1e-3, 8, None, None, error="RuntimeError: boom"),
    ]
    selected = select_best(outcomes)
    assert selected["hi"].trial_id == "b"
    assert selected["ta"].trial_id == "d"
    assert outcomes[-1].failed


def test_trial_outcome_uses_the_best_checkpointed_report():
    reports = [
        {"step": 2, "primary": 0.5, "wer": 0.5, "cer": 0.2, "raw_wer": 0.5, "utterances": 2, "checkpoint_path": "/c/2"},
        {
            "step": 4.0,
            "primary": 0.3,
            "wer": 0.3,
            "cer": 0.1,
            "raw_wer": 0.3,
            "utterances": 2.0,
            "checkpoint_path": "/c/4",
        },
        {"step": 4, "primary": 0.1, "loss": 1.0},  # no checkpoint with it: not selectable
    ]
    outcome = trial_outcome("t1", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None)
    assert outcome.checkpoint == "/c/4" and outcome.best["primary"] == 0.3 and outcome.alpha == 16
    assert isinstance(outcome.best["utterances"], int)


def test_best_report_skips_deleted_and_preemption_checkpoints_and_prefers_the_later_tie():
    report = {"wer": 0.5, "cer": 0.2, "raw_wer": 0.5, "utterances": 2}
    reports = [
        {**report, "step": 2, "primary": 0.4, "checkpoint_path": "/c/2"},  # deleted by Ray's keep policy
        {**report, "step": 4, "primary": 0.5, "checkpoint_path": "/c/4"},
        {**report, "step": 6, "primary": 0.5, "checkpoint_path": "/c/6"},
        {**report, "step": 7, "primary": 0.5, "checkpoint_path": "/c/7", "checkpoint_reason": "preemption"},
    ]
    outcome = trial_outcome("t", {"language": "hi", "rank": 8, "learning_rate": 1e-3}, reports, None, "/c/2".__ne__)
    assert outcome.checkpoint == "/c/6" and outcome.best["step"] == 6


class _Trial:
    def __init__(self, trial_id: str, language: str) -> None:
        self.trial_id, self.config = trial_id, {"language": language}


def test_early_stopping_compares_trials_of_one_language_only():
    scheduler = PerLanguageASHA(grace_period=1, reduction_factor=2, max_t=100)
    tamil, hindi, hindi_worse = _Trial("ta1", "ta"), _Trial("hi1", "hi"), _Trial("hi2", "hi")
    for trial in (tamil, hindi, hindi_worse):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, tamil, {"step": 1, "primary": 0.05}) == "CONTINUE"
    # Much worse than Tamil's CER, but the first Hindi result at this rung: nothing to compare with.
    assert scheduler.on_trial_result(None, hindi, {"step": 1, "primary": 0.9}) == "CONTINUE"
    preempted = {"step": 1, "primary": float("inf"), "checkpoint_reason": "preemption"}
    assert scheduler.on_trial_result(None, hindi_worse, preempted) == "CONTINUE"
    assert scheduler.on_trial_result(None, hindi_worse, {"step": 1, "primary": 0.95}) == "STOP"


def test_trial_config_and_concurrency(tmp_path):
    config = load_config(None, [f"data.source.path={tmp_path}", "data.languages=mr,ta", "train.num_workers=2"])
    trial = trial_config(config, {"language": "ta", "rank": 16, "learning_rate": 3e-4})
    assert (trial.train.language, trial.train.lora.rank, trial.train.learning_rate) == ("ta", 16, 3e-4)
    assert max_concurrent_trials(config, {"CPU": 64, "GPU": 8}, gpu=True) == 4
    assert max_concurrent_trials(config, {"CPU": 4}, gpu=False) >= 1
    pinned = load_config(None, [f"data.source.path={tmp_path}", "tune.max_concurrent_trials=3"])
    assert max_concurrent_trials(pinned, {"CPU": 64, "GPU": 8}, gpu=True) == 3


# --- publishing, without a sweep: adapters saved from the tiny model ----------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory) -> Path:
    """Two checkpoint directories (``<name>/adapter/``) with different LoRA weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    random_adapters(tiny_model_dir, root, ["good", "worse"])
    return root


def _publish_config(root: Path, storage: str, tiny_model_dir: str, **extra: str):
    overrides = [
        f"data.source.path={root}",
        "data.languages=hi",
        f"model.base={tiny_model_dir}",
        f"train.storage_path={root}",
        f"publish.storage={storage}",
        "experiment=pub",
        *[f"{key}={value}" for key, value in extra.items()],
    ]
    return load_config(None, overrides)


ZERO_SHOT = {"hi": {"wer": 1.5, "cer": 1.2, "raw_wer": 1.5, "primary": 1.5}}


def test_interrupted_publish_keeps_the_previous_manifest_and_worse_adapters_do_not_replace_better(
    checkpoints, tiny_model_dir, tmp_path, monkeypatch
):
    import whisper_lora.publish as publish

    config = _publish_config(checkpoints, str(tmp_path / "shared"), tiny_model_dir)
    base = resolve_base_model(config.model.base, config.model.cache_dir)
    good = _outcome("t-good", "hi", 2, 0.40, checkpoint=str(checkpoints / "good"))
    first = publish_selection(config, base, {"hi": good}, ZERO_SHOT, [good])
    storage = open_storage(config.publish.storage)

    better = _outcome("t-better", "hi", 2, 0.30, checkpoint=str(checkpoints / "worse"))

    def crash(*args, **kwargs):
        raise OSError("node preempted during publish")

    monkeypatch.setattr(publish, "write_manifest", crash)
    with pytest.raises(OSError, match="preempted"):
        publish_selection(config, base, {"hi": better}, ZERO_SHOT, [better])
    monkeypatch.undo()
    assert read_manifest(storage, "pub") == first  # the reader still sees the old, complete state
    entry = first["languages"]["hi"]
    for name, recorded in entry["files"].items():
        assert _sha256(Path(entry["adapter"]) / name) == recorded["sha256"]

    worse = _outcome("t-worse", "hi", 2, 0.55, checkpoint=str(checkpoints / "worse"))
    again = publish_selection(config, base, {"hi": worse}, ZERO_SHOT, [worse])
    assert again["languages"]["hi"]["trial_id"] == "t-good"
    assert "kept the published adapter" in again["kept_previous"][0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_publish_to_s3_served_on_loopback(checkpoints, tiny_model_dir, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test-key-id",
            "AWS_SECRET_ACCESS_KEY": "test-secret-not-logged",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="models")
        config = _publish_config(
            checkpoints, "s3://models/whisper", tiny_model_dir, **{"publish.s3_endpoint": endpoint}
        )
        base = resolve_base_model(config.model.base, config.model.cache_dir)
        good = _outcome("t-s3", "hi", 2, 0.4, checkpoint=str(checkpoints / "good"))
        manifest = publish_selection(config, base, {"hi": good}, ZERO_SHOT, [good])
        entry = manifest["languages"]["hi"]
        assert entry["adapter"].startswith("s3://models/whisper/pub/adapters/hi/t-s3-")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        stored = json.loads(s3.get_object(Bucket="models", Key="whisper/pub/manifest.json")["Body"].read())
        assert stored == manifest
        key = entry["adapter"].removeprefix("s3://models/") + "/adapter_model.safetensors"
        body = s3.get_object(Bucket="models", Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["files"]["adapter_model.safetensors"]["sha256"]
        assert "test-secret-not-logged" not in json.dumps(manifest)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        from whisper_lora.transcribe import find_entry

        storage = open_storage(entry["adapter"])
        assert find_entry(storage, storage.root).language == "hi"
    finally:
        server.stop()


def test_report_marks_failed_cells_and_keeps_the_best_rate_per_rank(tmp_path):
    from whisper_lora.report import error_grid, write_report

    outcomes = [
        _outcome("a", "hi", 8, 0.40, lr=1e-3),
        _outcome("b", "hi", 8, 0.30, lr=3e-4),
        _outcome("c", "ta", 32, 0.20),
        TrialOutcome("d", "ta", 8, 1e-3, 16, None, None, error="RuntimeError: out of memory"),
    ]
    languages, ranks, grid = error_grid(outcomes)
    assert (languages, ranks) == (["hi", "ta"], [8, 32])
    assert grid[0, 0] == 0.30 and torch.isnan(torch.tensor(grid[1, 0])) and grid[1, 1] == 0.20
    entry = {"zero_shot": {"primary": 1.0}, "value": 0.3, "metric": "wer", "wer": 0.3, "cer": 0.1, "rank": 8}
    manifest = {
        "experiment": "x",
        "base_model": {"id": "tiny", "sha256": "0" * 64},
        "created": "now",
        "languages": {"hi": {**entry, "learning_rate": 3e-4, "train_steps": 4, "trial_id": "b"}},
    }
    files = write_report(tmp_path, manifest, outcomes)
    assert all(path.stat().st_size > 0 for path in files)
    assert "failed: RuntimeError: out of memory" in files[0].read_text()


def test_an_adapter_without_a_manifest_is_a_clear_error(tmp_path):
    from whisper_lora.transcribe import PublishedAdapterError, find_entry

    adapter = tmp_path / "exp" / "adapters" / "hi" / "t-0123"
    adapter.mkdir(parents=True)
    storage = open_storage(str(adapter))
    with pytest.raises(PublishedAdapterError, match=r"no manifest\.json"):
        find_entry(storage, storage.root)
    with pytest.raises(PublishedAdapterError, match="not a published adapter"):
        find_entry(open_storage(str(tmp_path)), str(tmp_path))
