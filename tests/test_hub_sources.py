"""Datasets as users hold them: Hub-layout Parquet trees (FLEURS), ``datasets.save_to_disk`` directories, and the
language spellings of each (codes, names, FLEURS configs), read through ``prepare`` like any other source."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.builders import tone
from whisper_lora.config import load_config
from whisper_lora.languages import language_lookup, spelling
from whisper_lora.prepare import prepare

SENTENCE = {"hi": "यह एक छोटा वाक्य है", "mr": "हे एक लहान वाक्य आहे"}


def _flac(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, 16_000), 16_000, format="FLAC")
    return buffer.getvalue()


def test_languages_are_spelled_and_resolved_as_each_source_writes_them():
    assert [spelling("mr", naming) for naming in ("code", "name", "fleurs")] == ["mr", "marathi", "mr_in"]
    assert spelling("mr", "fleurs", {"mr": "Marathi_IN"}) == "Marathi_IN"
    with pytest.raises(ValueError, match="language_map"):
        spelling("fr", "fleurs")
    lookup = language_lookup({"mr": "Marathi_IN"})
    assert [lookup[value.casefold()] for value in ("Hindi", "hi_in", "hi", "TAMIL", "marathi_in")] == [
        "hi", "hi", "hi", "ta", "mr"
    ]  # fmt: skip
    assert "klingon" not in lookup


def test_unknown_language_map_codes_are_a_config_error(tmp_path):
    from whisper_lora.config import ConfigError

    with pytest.raises(ConfigError, match="language_map"):
        load_config(None, [f"data.source.path={tmp_path}", "data.source.language_map={zz: x}"])


def write_fleurs(root, language_dir: str, language_name: str, splits: dict[str, int]):
    """A FLEURS-shaped tree: ``<root>/<hi_in>/<split>/0000.parquet`` with FLEURS' columns (``id``, ``path``, an
    ``audio`` struct of FLAC bytes and a file name, ``transcription``, ``raw_transcription``, ``language``...)."""
    for split, rows in splits.items():
        folder = root / language_dir / split
        folder.mkdir(parents=True)
        table = pa.table(
            {
                "id": list(range(rows)),
                "num_samples": [16_000] * rows,
                "path": [f"{n}.wav" for n in range(rows)],
                "audio": pa.array([{"bytes": _flac(1.0 + 0.1 * n), "path": f"{n}.wav"} for n in range(rows)]),
                "transcription": ["यह एक छोटा वाक्य है"] * rows,
                "raw_transcription": ["यह एक छोटा वाक्य है।"] * rows,
                "gender": [0] * rows,
                "lang_id": [32] * rows,
                "language": [language_name] * rows,
                "lang_group_id": [6] * rows,
            }
        )
        pq.write_table(table, folder / "0000.parquet")


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_fleurs_tree_prepares_with_fleurs_names_and_counts_unknown_languages(ray_local, tiny_model_dir, tmp_path):
    write_fleurs(tmp_path / "fleurs", "hi_in", "Hindi", {"train": 3, "dev": 2, "test": 1})
    write_fleurs(tmp_path / "fleurs", "xx_yy", "Elvish", {"train": 2})
    common = [f"model.base={tiny_model_dir}", f"output_dir={tmp_path}/runs", "data.languages=hi"]
    by_path = load_config(
        None,
        [
            *common,
            "experiment=by-path",
            "data.source.kind=parquet",
            f"data.source.path={tmp_path}/fleurs/{{lang}}/{{split}}",
            "data.source.language_names=fleurs",
            "data.source.text_column=raw_transcription",
        ],
    )
    stats = prepare(by_path)
    assert {name: group["rows_out"] for name, group in stats["groups"].items()} == {
        "hi/train": 3, "hi/dev": 2, "hi/test": 1
    }  # fmt: skip
    prepared = pq.read_table(tmp_path / "runs" / "by-path" / "prepared" / "language=hi" / "split=train")
    assert set(prepared.column("sentence").to_pylist()) == {"यह एक छोटा वाक्य है।"}

    by_column = load_config(
        None,
        [
            *common,
            "experiment=by-column",
            "data.source.kind=parquet",
            f"data.source.path={tmp_path}/fleurs/*/{{split}}/*.parquet",
        ],
    )
    stats = prepare(by_column)
    assert stats["groups"]["hi/train"]["rows_out"] == 3
    unknown = stats["groups"]["unknown/train"]
    assert (unknown["rows_in"], unknown["dropped"]) == (2, {"unknown_language": 2})
    assert "'Elvish'" in unknown["dropped_examples"]["unknown_language"][0]


def _operators(operator) -> list[str]:
    return [operator.name] + [name for parent in operator.input_dependencies for name in _operators(parent)]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_parquet_sources_read_footers_in_their_read_tasks(ray_local, tmp_path):
    """Ray 2.60's default (V2) Parquet reader starts 32 footer-reader actors for every ``read_parquet``, and a source
    is read once per language and split: a 3-node dry run hung starting 192 of them. Sources take the V1 reader,
    and leave Ray Data's default as it was for everyone else."""
    from ray.data import DataContext

    from whisper_lora.data.sources import read_source

    write_fleurs(tmp_path / "fleurs", "hi_in", "Hindi", {"train": 1, "dev": 1})
    config = load_config(
        None,
        ["data.languages=hi", "data.source.kind=parquet", f"data.source.path={tmp_path}/fleurs/{{lang}}/{{split}}",
         "data.source.language_names=fleurs"],
    )  # fmt: skip
    default = DataContext.get_current().use_datasource_v2
    dataset = read_source(config.data, ["train", "dev"], config.storage)
    reads = [name for name in _operators(dataset._logical_plan.dag) if "Read" in name or "List" in name]
    assert reads == ["ReadParquet", "ReadParquet"]
    assert DataContext.get_current().use_datasource_v2 == default
    assert len(dataset.take_all()) == 2


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_save_to_disk_dataset_dict_prepares_with_class_label_languages(ray_local, tiny_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    names = ["hindi", "marathi", "klingon"]
    features = datasets.Features(
        {
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "sentence": datasets.Value("string"),
            "language": datasets.ClassLabel(names=names),
        }
    )

    def split(languages: list[int]) -> "datasets.Dataset":
        """Audio as ``datasets`` stores it (bytes + file name); cast, not encoded: encoding needs torchcodec."""
        rows = {
            "audio": [{"bytes": _flac(1.0 + 0.2 * n), "path": f"{n}.flac"} for n in range(len(languages))],
            "sentence": [[SENTENCE["hi"], SENTENCE["mr"], "qapla"][code] for code in languages],
            "language": languages,
        }
        dataset = datasets.Dataset.from_dict(rows, features=features)
        return dataset.cast_column("audio", datasets.Audio(sampling_rate=16_000, decode=False))

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": split([0, 0, 1, 2, 1]), "dev": split([0, 1]), "test": split([1])}).save_to_disk(
        str(saved)
    )
    assert json.loads((saved / "dataset_dict.json").read_text())["splits"] == ["train", "dev", "test"]
    config = load_config(
        None,
        [
            f"model.base={tiny_model_dir}",
            f"output_dir={tmp_path}/runs",
            "experiment=saved",
            "data.languages=mr,hi",
            "data.source.kind=save_to_disk",
            f"data.source.path={saved}",
        ],
    )
    stats = prepare(config)
    rows = {name: group["rows_out"] for name, group in stats["groups"].items()}
    assert rows == {"hi/train": 2, "mr/train": 2, "hi/dev": 1, "mr/dev": 1, "mr/test": 1, "unknown/train": 0}
    assert stats["groups"]["unknown/train"]["dropped"] == {"unknown_language": 1}
    prepared = pq.read_table(tmp_path / "runs" / "saved" / "prepared" / "language=mr" / "split=train")
    assert set(prepared.column("sentence").to_pylist()) == {SENTENCE["mr"]}


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_save_to_disk_problems_are_raised_before_any_work(ray_local, tmp_path):
    from whisper_lora.data.sources import SourceError, read_source

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "train"))
    for path, message in (
        ("train", "a single Dataset .* put '{split}' in the path"),
        ("{split}", "needs an 'audio' column"),
        ("absent-{split}", "not a datasets save_to_disk directory"),
    ):
        config = load_config(None, ["data.source.kind=save_to_disk", f"data.source.path={tmp_path}/{path}"])
        with pytest.raises(SourceError, match=message):
            read_source(config.data, ["train"])
