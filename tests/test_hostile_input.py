"""Hostile input: clips built to exhaust memory and rows built to read outside the corpus, every one made here.

Each case is a counted drop with its reason (or one clear error), and ``prepare`` finishes for the good rows.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import soundfile as sf

from tests.builders import tone, write_clip, write_common_voice
from whisper_lora.config import load_config
from whisper_lora.data.audio import AudioError, decode, load_audio
from whisper_lora.data.features import Featurizer, Limits
from whisper_lora.data.pipeline import featurize, featurize_batch
from whisper_lora.data.sources import AudioFolder
from whisper_lora.data.stats import StatsCollector
from whisper_lora.prepare import prepare
from whisper_lora.storage import StorageOptions, open_location

pytestmark = pytest.mark.reliability
SENTENCE = "यह एक छोटा वाक्य है"
MiB, GiB = 2**20, 2**30


def header_bomb_flac() -> bytes:
    """A valid 16-frame 8-channel FLAC whose STREAMINFO then claims 2^36 - 1 frames (the field's largest value):
    2 TiB of float32 to a decoder that sizes its output from the header."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((16, 8), np.float32), 48_000, format="FLAC")
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"fLaC" and data[5:8] == b"\0\0\x22"  # STREAMINFO first, 34 bytes
    # Bytes 18-25 pack sample rate (20 bits), channels - 1 (3), bits per sample - 1 (5), total samples (36).
    data[18:26] = (int.from_bytes(data[18:26], "big") | (2**36 - 1)).to_bytes(8, "big")
    return bytes(data)


def one_hertz_wav(samples: int = 20_000) -> bytes:
    """40 KB of 16-bit WAV whose header says 1 Hz: resampled to 16 kHz it becomes 320 M samples (1.3 GB)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(samples, np.int16), 8_000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"fmt "
    data[24:32] = struct.pack("<II", 1, 2)  # sample rate, byte rate (rate × 2-byte frames)
    return bytes(data)


def silent_flac(seconds: int, channels: int = 8, rate: int = 48_000) -> bytes:
    """Silence compresses ~2,000:1: ten minutes of 8 channels is ~240 KB of FLAC and 920 MB of float32."""
    buffer, block = io.BytesIO(), np.zeros((10 * rate, channels), np.int16)
    with sf.SoundFile(buffer, "w", rate, channels, subtype="PCM_16", format="FLAC") as stream:
        for _ in range(seconds // 10):
            stream.write(block)
    return buffer.getvalue()


def understated_flac(silence: bytes, seconds: int) -> bytes:
    """``silence`` with a header that declares only ``seconds``: the stream holds far more than it says."""
    data = bytearray(silence)
    packed = int.from_bytes(data[18:26], "big") & ~(2**36 - 1) | (seconds * 48_000)
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def nine_channel_wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((1_600, 9), np.float32), 16_000, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    silence = silent_flac(600)
    return {
        "header_bomb.flac": header_bomb_flac(),
        "one_hertz.wav": one_hertz_wav(),
        "nine_channels.wav": nine_channel_wav(),
        "silence_8ch_10min.flac": silence,
        "silence_says_20s.flac": understated_flac(silence, 20),
    }


def _traced_peak(call) -> int:
    """Peak bytes allocated through Python and numpy (tracemalloc sees numpy's buffers) while ``call`` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_bombs_are_what_they_claim(bombs):
    """Sizes on disk against what their headers ask a decoder for."""
    header = sf.info(io.BytesIO(bombs["header_bomb.flac"]))
    assert len(bombs["header_bomb.flac"]) < 200 and header.frames * header.channels * 4 > 2**40
    assert sf.info(io.BytesIO(bombs["one_hertz.wav"])).samplerate == 1 and len(bombs["one_hertz.wav"]) < 41_000
    silence = sf.info(io.BytesIO(bombs["silence_8ch_10min.flac"]))
    assert silence.frames * silence.channels * 4 / len(bombs["silence_8ch_10min.flac"]) > 1_000


@pytest.mark.parametrize(
    ("name", "reason", "detail"),
    [
        ("header_bomb.flac", "bad_header", "68719476735 frames"),
        ("one_hertz.wav", "bad_header", "sample rate 1 Hz"),
        ("nine_channels.wav", "bad_header", "9 channels"),
        ("silence_8ch_10min.flac", "too_long", "600.0 s"),
    ],
)
def test_bombs_are_rejected_from_the_header_before_any_allocation(bombs, name, reason, detail):
    def decode_it():
        with pytest.raises(AudioError) as raised:
            decode(bombs[name])
        assert (raised.value.reason, detail in str(raised.value)) == (reason, True)

    assert _traced_peak(decode_it) < 4 * MiB


def test_a_header_that_understates_the_stream_bounds_the_read(bombs):
    """20 s declared, 10 min inside: 20 s are decoded (31 MB), never the 920 MB the stream holds. soundfile
    clamps every read to the header's count; this pins that the decoder never reads on to the end of the stream."""
    decoded = {}
    peak = _traced_peak(lambda: decoded.update(audio=decode(bombs["silence_says_20s.flac"])))
    samples, rate = decoded["audio"]
    assert (samples.shape, rate) == ((20 * 48_000, 8), 48_000)
    assert peak < 40 * MiB


def test_max_seconds_decodes_only_the_start_of_a_long_clip(bombs):
    """What ``transcribe`` does with a recording longer than Whisper's window: the rest is never decoded."""
    audio = {}
    peak = _traced_peak(lambda: audio.update(mono=load_audio(bombs["silence_8ch_10min.flac"], max_seconds=2.0)))
    assert audio["mono"].shape == (32_000,)
    assert peak < 16 * MiB


def test_a_decoder_out_of_memory_is_one_unreadable_clip(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "a.flac", 1.0, fmt="FLAC")

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 2.00 TiB")

    monkeypatch.setattr(sf.SoundFile, "read", exhausted)
    with pytest.raises(AudioError, match="MemoryError") as raised:
        load_audio(str(path))
    assert raised.value.reason == "unreadable"


def test_references_resolve_inside_the_folder_or_not_at_all(tmp_path):
    """The containment rule alone: by real path on local disks, by ``..``-normalised URI elsewhere; a sibling
    folder sharing the name's prefix is outside."""
    local = AudioFolder(open_location(str(tmp_path / "clips")))
    assert local.resolve("a.wav") == str(tmp_path / "clips" / "a.wav")
    assert local.resolve("x/../a.wav") == str(tmp_path / "clips" / "a.wav")
    for reference in ("../clips2/a.wav", str(tmp_path / "clips2" / "a.wav"), "/etc/passwd", "s3://bucket/a.wav"):
        assert local.resolve(reference) is None, reference
    remote = AudioFolder(open_location("memory://corpus/hi/clips"))
    assert remote.resolve("a.wav") == "memory://corpus/hi/clips/a.wav"
    assert remote.resolve("memory://corpus/hi/clips/x/../a.wav") == "memory://corpus/hi/clips/a.wav"
    for reference in ("../../x.wav", "memory://corpus/hi/clips2/a.wav", "s3://corpus/hi/clips/a.wav", "/etc/passwd"):
        assert remote.resolve(reference) is None, reference
    assert AudioFolder(open_location("memory://corpus/hi/clips"), allow_outside=True).resolve("/etc/passwd")


class TreePeakMemory:
    """Peak resident memory of this process and every descendant (Ray's GCS, raylet and its worker processes)
    above a baseline, while the ``with`` block runs.

    On entry each process's peak (``VmHWM``) is reset to its current RSS (``/proc/<pid>/clear_refs`` ``5``) and
    that RSS is the process's baseline. A sampler then reads ``VmHWM`` of the whole tree every 10 ms, so new
    worker processes are seen too, and counted in full (their baseline is 0). The result sums the peaks of all
    processes: an upper bound of the tree's peak (the processes do not all peak at once), and shared pages (the
    object store) count once per process that maps them. A process that starts, peaks and exits within 10 ms
    would be missed; a Ray worker outlives its tasks.
    """

    def __init__(self) -> None:
        self.baseline: dict[int, int] = {}
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()

    @staticmethod
    def _tree() -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        pids, queue = [], [os.getpid()]
        while queue:
            pid = queue.pop()
            pids.append(pid)
            queue.extend(children.get(pid, []))
        return pids

    @staticmethod
    def _status(pid: int, field: str) -> int | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        for pid in self._tree():
            if (peak := self._status(pid, "VmHWM")) is not None:
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0))

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def __enter__(self) -> TreePeakMemory:
        for pid in self._tree():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError as exc:
                pytest.skip(f"cannot reset the peak RSS of process {pid}: {exc}")
            if (rss := self._status(pid, "VmRSS")) is not None:
                self.baseline[pid] = rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def extra_bytes(self) -> int:
        return sum(max(0, peak - self.baseline.get(pid, 0)) for pid, peak in self.peaks.items())


def _prepare_overrides(root: Path, tiny_model_dir: str, experiment: str, batch_size: int = 4) -> list[str]:
    return [
        f"data.source.path={root}",
        "data.languages=hi",
        f"model.base={tiny_model_dir}",
        f"output_dir={root.parent}/runs",
        f"experiment={experiment}",
        f"data.batch_size={batch_size}",
    ]


def _good_release(root: Path, extra_rows: list[tuple[str, str]] = ()) -> Path:
    """Two good clips in every split, plus ``extra_rows`` in train."""
    for name in ("good1.mp3", "good2.mp3"):
        write_clip(root / "hi" / "clips" / name, 1.0)
    good = [("good1.mp3", SENTENCE), ("good2.mp3", SENTENCE)]
    return write_common_voice(root, "hi", {"train": [*good, *extra_rows], "dev": good, "test": good})


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_prepare_drops_the_bombs_and_stays_under_1_gib_above_baseline(ray_local, tiny_model_dir, bombs, tmp_path):
    """Without the header checks the 1 Hz WAV alone resamples to 1.3 GB, the silence decodes to 920 MB, and the
    FLAC bomb's ``MemoryError`` failed its Ray task, which stopped ``prepare``.

    One batch of 16 rows is one map task: one worker decodes every bomb. A first run on good rows warms a worker
    (torch, the featurizer), so the measurement is mostly the bombs' cost; a run that lands on a cold worker
    still counts its ~300 MiB of imports, and the new ``StatsCollector`` actor counts in full (~120 MiB)."""
    warm = _good_release(tmp_path / "warm")
    prepare(load_config(None, _prepare_overrides(warm, tiny_model_dir, "warm", batch_size=16)))

    release = tmp_path / "cv"
    for name, data in bombs.items():
        (release / "hi" / "clips").mkdir(parents=True, exist_ok=True)
        (release / "hi" / "clips" / name).write_bytes(data)
    _good_release(release, [(name, SENTENCE) for name in bombs])
    with TreePeakMemory() as memory:
        stats = prepare(load_config(None, _prepare_overrides(release, tiny_model_dir, "bombs", batch_size=16)))
    print(f"peak above baseline over {len(memory.peaks)} processes: {memory.extra_bytes / MiB:.0f} MiB")
    assert memory.extra_bytes < GiB
    train = stats["groups"]["hi/train"]
    assert train["dropped"] == {"bad_header": 3, "too_long": 1}
    assert set(train["dropped_examples"]["bad_header"]) == {
        "hi/header_bomb.flac", "hi/one_hertz.wav", "hi/nine_channels.wav"
    }  # fmt: skip
    assert (train["rows_in"], train["rows_out"]) == (7, 3)  # the understated 20 s of silence is a usable clip
    assert stats["total"]["rows_out"] == 7


def _outside_tree(tmp_path: Path) -> dict[str, Path]:
    """Readable audio outside every source's folder, as an attacker would point at it."""
    secret = write_clip(tmp_path / "secret" / "secret.wav", 1.0, fmt="WAV")
    return {"secret": secret, "absent": tmp_path / "secret" / "absent.wav"}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_common_voice_rows_outside_clips_are_dropped_without_looking(ray_local, tiny_model_dir, tmp_path):
    outside = _outside_tree(tmp_path)
    release = tmp_path / "cv"
    clips = release / "hi" / "clips"
    clips.mkdir(parents=True)
    (clips / "link_out.wav").symlink_to(outside["secret"])
    write_clip(release / "hi" / "beside_clips.wav", 1.0, fmt="WAV")
    (clips / "link_in.mp3").symlink_to("good1.mp3")
    long_sentence = "शब्द " * (2 * MiB // len("शब्द ".encode()) + 1)
    traversal = [
        "../../../secret/secret.wav",  # exists
        "../../../secret/absent.wav",  # does not
        "../beside_clips.wav",  # in the release, not in clips/
        str(outside["secret"]),
        str(outside["absent"]),
        "/etc/passwd",
        "link_out.wav",
    ]
    _good_release(
        release,
        [
            ("link_in.mp3", SENTENCE),
            ("absent.mp3", SENTENCE),
            *((path, SENTENCE) for path in traversal),
            ("good1.mp3", long_sentence),
        ],
    )
    with open(release / "hi" / "train.tsv", "a", encoding="utf-8") as tsv:
        tsv.write("c\tonly-two-columns\n")
        tsv.write(f"c\tgood1.mp3\t{SENTENCE}\t1\tone\ttoo many\n")
    assert (release / "hi" / "train.tsv").stat().st_size > 2 * MiB

    stats = prepare(load_config(None, _prepare_overrides(release, tiny_model_dir, "t")))
    train = stats["groups"]["hi/train"]
    assert train["dropped"] == {"outside_source": 7, "missing_audio": 1, "bad_row": 2, "labels_too_long": 1}
    # Existing and absent targets alike are outside_source: the counts tell nothing about what exists out there.
    assert train["dropped_examples"]["missing_audio"] == ["hi/absent.mp3"]
    assert set(train["dropped_examples"]["outside_source"]) <= {f"hi/{path}" for path in traversal}
    assert sorted(train["dropped_examples"]["bad_row"]) == ["hi/train.tsv:14", "hi/train.tsv:15"]
    assert (train["rows_in"], train["rows_out"]) == (14, 3)

    opted_in = load_config(
        None,
        [f"data.source.path={release}", "data.languages=hi", f"model.base={tiny_model_dir}",
         "data.source.allow_outside_paths=true"],
    )  # fmt: skip
    collector = StatsCollector.remote()
    kept = {row["id"] for row in featurize(opted_in.data, tiny_model_dir, ["train"], collector).take_all()}
    dropped = ray.get(collector.summary.remote())["groups"]["hi/train"]["dropped"]
    assert kept == {"hi/good1.mp3", "hi/good2.mp3", "hi/link_in.mp3", *(f"hi/{traversal[i]}" for i in (0, 2, 3, 6))}
    assert dropped == {"missing_audio": 3, "unreadable": 1, "bad_row": 2, "labels_too_long": 1}


def _run(config, splits: list[str]) -> tuple[list[dict], dict]:
    collector = StatsCollector.remote()
    rows = featurize(config.data, config.model.base, splits, collector).take_all()
    return rows, ray.get(collector.summary.remote())


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_manifest_lines_that_are_not_objects_or_point_outside_are_counted(ray_local, tiny_model_dir, tmp_path):
    outside = _outside_tree(tmp_path)
    folder = tmp_path / "m"
    write_clip(folder / "audio" / "a.wav", 1.0, fmt="WAV")
    (folder / "audio" / "link.wav").symlink_to(outside["secret"])
    row = lambda path, text=SENTENCE, language="hi": json.dumps(  # noqa: E731
        {"audio_filepath": path, "text": text, "language": language}, ensure_ascii=False
    ).encode()
    lines = [
        row("audio/a.wav"),
        row("audio/../audio/a.wav"),  # '..' that stays inside is fine
        row("../secret/secret.wav"),
        row(str(outside["secret"])),
        row("audio/link.wav"),
        row("s3://bucket/a.wav"),
        b'{"audio_filepath": "audio/a.wav", "text": ',  # not JSON
        b'["audio/a.wav", "text"]',  # an array
        b'"audio/a.wav"',  # a string
        b"[" * 100_000,  # nesting past the parser's recursion limit
        b"\xff\xfe not UTF-8",
        row("audio/a.wav", text=5),  # text that is not a string
        b"",
        row("audio/a.wav", language="ta"),  # another language: not ours, not counted
    ]
    (folder / "train.jsonl").write_bytes(b"\n".join(lines))
    config = load_config(
        None,
        ["data.source.kind=manifest", f"data.source.path={folder}/{{split}}.jsonl", "data.languages=hi",
         f"model.base={tiny_model_dir}"],
    )  # fmt: skip
    rows, stats = _run(config, ["train"])
    assert sorted(row["id"] for row in rows) == ["train.jsonl:1", "train.jsonl:2"]
    assert stats["groups"]["hi/train"]["dropped"] == {"outside_source": 4, "bad_row": 1}
    assert stats["groups"]["hi/train"]["dropped_examples"]["bad_row"] == ["train.jsonl:12"]
    unknown = stats["groups"]["unknown/train"]
    assert (unknown["dropped"], unknown["rows_out"]) == ({"bad_row": 5}, 0)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_parquet_audio_paths_must_stay_beside_the_parquet_file(ray_local, tiny_model_dir, tmp_path):
    outside = _outside_tree(tmp_path)
    folder = tmp_path / "pq" / "hi"
    write_clip(folder / "clips" / "a.flac", 1.0, fmt="FLAC")
    (folder / "clips" / "link.flac").symlink_to(outside["secret"])
    embedded = io.BytesIO()
    sf.write(embedded, tone(1.0), 48_000, format="FLAC")
    audio = [
        {"bytes": None, "path": "clips/a.flac"},
        {"bytes": None, "path": "../../secret/secret.wav"},
        {"bytes": None, "path": str(outside["secret"])},
        {"bytes": None, "path": "clips/link.flac"},
        {"bytes": None, "path": None},
        {"bytes": embedded.getvalue(), "path": "/etc/passwd"},  # the bytes are read, the path never opened
    ]
    pq.write_table(pa.table({"audio": audio, "sentence": [SENTENCE] * len(audio)}), folder / "train-0.parquet")
    config = load_config(
        None,
        ["data.source.kind=parquet", f"data.source.path={tmp_path}/pq/{{lang}}/{{split}}-*.parquet",
         "data.languages=hi", f"model.base={tiny_model_dir}"],
    )  # fmt: skip
    rows, stats = _run(config, ["train"])
    assert sorted(row["id"] for row in rows) == ["train-0.parquet:/etc/passwd", "train-0.parquet:clips/a.flac"]
    assert stats["total"]["dropped"] == {"outside_source": 3, "bad_row": 1}


@pytest.mark.ray
def test_a_row_failing_in_an_unforeseen_way_is_a_counted_bad_row(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "a.wav", 1.0, fmt="WAV").read_bytes()
    original = Featurizer.example

    def fragile(self, audio, sentence, language):
        if sentence == "boom":
            raise KeyError("nobody expected this")
        return original(self, audio, sentence, language)

    monkeypatch.setattr(Featurizer, "example", fragile)
    column = lambda *values: np.array(values, dtype=object)  # noqa: E731
    batch = {
        "id": column("ok", "boom"),
        "language": column("hi", "hi"),
        "split": column("train", "train"),
        "sentence": column(SENTENCE, "boom"),
        "audio_path": column(None, None),
        "audio_bytes": column(clip, clip),
        "drop_reason": column(None, None),
    }
    collector = StatsCollector.remote()
    table = featurize_batch(batch, tiny_model_dir, Limits(), collector, StorageOptions())
    assert table.column("id").to_pylist() == ["ok"]
    group = ray.get(collector.summary.remote())["groups"]["hi/train"]
    assert (group["dropped"], group["dropped_examples"]) == ({"bad_row": 1}, {"bad_row": ["boom"]})


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_speaks_a_sentence_that_starts_with_a_dash(tmp_path):
    """Without ``--`` espeak-ng takes ``--help`` as its option, prints usage and writes no audio."""
    from whisper_lora.demo.corpus import speak

    speak("--help", "hi", 150, 50, tmp_path / "dash.mp3")
    assert sf.info(str(tmp_path / "dash.mp3")).duration > 0.2
