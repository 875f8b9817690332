"""The Ray Data pipeline end to end, on tiny inputs: every source kind, every drop reason counted."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from tests.builders import tone, write_clip, write_common_voice
from whisper_lora.config import load_config
from whisper_lora.data.pipeline import featurize
from whisper_lora.data.sources import SourceError, read_source
from whisper_lora.data.stats import StatsCollector

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
SENTENCE = "यह एक छोटा वाक्य है"


@pytest.fixture
def corpus_with_bad_rows(tmp_path):
    clips = tmp_path / "cv" / "hi" / "clips"
    for name in ("good1.mp3", "good2.mp3", "good3.mp3"):
        write_clip(clips / name, 2.0)
    write_clip(clips / "stereo44k.flac", 1.5, rate=44_100, channels=2, fmt="FLAC")
    write_clip(clips / "narrow8k.wav", 1.5, rate=8_000, fmt="WAV")
    write_clip(clips / "long.mp3", 45.0)
    write_clip(clips / "tiny.wav", 0.05, fmt="WAV")
    (clips / "empty.mp3").write_bytes(b"")
    (clips / "text.mp3").write_text("not audio at all")
    full = write_clip(clips / "full.mp3", 5.0).read_bytes()
    (clips / "cut.mp3").write_bytes(full[: len(full) // 3])
    rows = [
        ("good1.mp3", SENTENCE),
        ("good2.mp3", SENTENCE),
        ("stereo44k.flac", SENTENCE),
        ("narrow8k.wav", SENTENCE),
        ("long.mp3", SENTENCE),
        ("tiny.wav", SENTENCE),
        ("empty.mp3", SENTENCE),
        ("text.mp3", SENTENCE),
        ("cut.mp3", SENTENCE),
        ("absent.mp3", SENTENCE),
        ("good3.mp3", ""),
        ("good3.mp3", "?!। ..."),
        ("good3.mp3", "शब्द " * 300),
    ]
    return write_common_voice(tmp_path / "cv", "hi", {"train": rows, "dev": rows[:2]})


def _run(config, splits):
    collector = StatsCollector.remote()
    rows = featurize(config.data, config.model.base, splits, collector).take_all()
    return rows, ray.get(collector.summary.remote())


@pytest.mark.reliability
def test_common_voice_rows_are_featurized_and_bad_rows_counted(ray_local, tiny_model_dir, corpus_with_bad_rows):
    config = load_config(
        None,
        [
            f"data.source.path={corpus_with_bad_rows}",
            "data.languages=hi",
            f"model.base={tiny_model_dir}",
            "data.batch_size=4",
        ],
    )
    rows, stats = _run(config, ["train", "dev"])
    kept = sorted(row["id"] for row in rows)
    assert kept == sorted(
        ["hi/good1.mp3", "hi/good2.mp3", "hi/stereo44k.flac", "hi/narrow8k.wav", "hi/good1.mp3", "hi/good2.mp3"]
    )
    train = stats["groups"]["hi/train"]
    assert train["dropped"] == {
        "empty_text": 2,
        "labels_too_long": 1,
        "missing_audio": 1,
        "too_long": 1,
        "too_short": 1,
        "truncated": 1,
        "unreadable": 2,
    }
    assert (train["rows_in"], train["rows_out"]) == (13, 4)
    assert train["audio_seconds_out"] == pytest.approx(2 + 2 + 1.5 + 1.5, abs=0.05)
    assert train["audio_seconds_in"] > 45
    assert stats["total"]["rows_out"] == 6
    assert all(row["input_features"].shape[0] == 80 and row["input_features"].shape[1] <= 322 for row in rows)
    assert all(list(row["label_ids"][:4]) == [50258, 50276, 50359, 50363] for row in rows)


def _parquet_shard(path, language_column=None):
    buffers = []
    for seconds in (1.0, 2.0):
        buffer = io.BytesIO()
        import soundfile as sf

        sf.write(buffer, tone(seconds), 48_000, format="FLAC")
        buffers.append(buffer.getvalue())
    columns = {
        "audio": pa.array([{"bytes": data, "path": f"clip{i}.flac"} for i, data in enumerate(buffers)]),
        "sentence": [SENTENCE, SENTENCE],
    }
    if language_column:
        columns[language_column] = ["hi", "ta"]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_parquet_source_with_hf_audio_layout(ray_local, tiny_model_dir, tmp_path):
    _parquet_shard(tmp_path / "pq" / "hi" / "train-0.parquet")
    _parquet_shard(tmp_path / "mixed" / "train.parquet", language_column="locale")
    for pattern, languages, expected in (
        (f"{tmp_path}/pq/{{lang}}/{{split}}-*.parquet", "hi", 2),
        (f"{tmp_path}/mixed/{{split}}.parquet", "hi", 1),
    ):
        config = load_config(
            None,
            [
                "data.source.kind=parquet",
                f"data.source.path={pattern}",
                f"data.languages={languages}",
                f"model.base={tiny_model_dir}",
            ],
        )
        rows, stats = _run(config, ["train"])
        assert len(rows) == expected and stats["total"]["rows_out"] == expected
        assert {row["language"] for row in rows} == {"hi"}


def test_manifest_source_resolves_relative_paths(ray_local, tiny_model_dir, tmp_path):
    write_clip(tmp_path / "m" / "audio" / "a.wav", 1.0, fmt="WAV")
    lines = [
        {"audio_filepath": "audio/a.wav", "text": SENTENCE, "language": "hi"},
        {"audio_filepath": "audio/a.wav", "text": SENTENCE, "language": "ta"},
        {"audio_filepath": "audio/gone.wav", "text": SENTENCE, "language": "hi"},
    ]
    (tmp_path / "m" / "train.jsonl").write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    config = load_config(
        None,
        [
            "data.source.kind=manifest",
            f"data.source.path={tmp_path}/m/{{split}}.jsonl",
            "data.languages=hi",
            f"model.base={tiny_model_dir}",
        ],
    )
    rows, stats = _run(config, ["train"])
    assert [row["language"] for row in rows] == ["hi"]
    assert stats["total"]["dropped"] == {"missing_audio": 1}


@pytest.mark.reliability
def test_source_problems_are_raised_before_any_work(ray_local, tmp_path):
    write_common_voice(tmp_path / "cv", "hi", {"train": [("a.mp3", SENTENCE)]})
    (tmp_path / "cv" / "hi" / "dev.tsv").write_text("client_id\tpath\ttext\nc\ta.mp3\tx\n")
    config = load_config(None, [f"data.source.path={tmp_path}/cv", "data.languages=hi"])
    with pytest.raises(SourceError, match="missing column"):
        read_source(config.data, ["dev"])
    with pytest.raises(SourceError, match="not found"):
        read_source(config.data, ["test"])
