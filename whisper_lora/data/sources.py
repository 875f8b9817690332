"""Sources: each read lazily into one ``ray.data.Dataset`` of rows
``id, language, split, sentence, audio_path, audio_bytes`` (one of the two audio columns set).

Audio stays where it is until the feature stage decodes it: a Common Voice TSV or a manifest contributes only
its text rows (kilobytes per thousand clips), Parquet shards are streamed by ``read_parquet``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data

from whisper_lora.config import DataConfig
from whisper_lora.storage import Location, StorageOptions, expand, is_remote, open_location

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("language", pa.string()),
        ("split", pa.string()),
        ("sentence", pa.string()),
        ("audio_path", pa.string()),
        ("audio_bytes", pa.binary()),
    ]
)
TEXT_COLUMNS = ("sentence", "text", "transcription")
LANGUAGE_COLUMNS = ("language", "locale")


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, missing column): raised before any Ray work."""


def _audio_uri(folder: Location, reference: str) -> str:
    """Where a row's audio is: relative references resolve against the folder of the file naming them."""
    return reference if is_remote(reference) or reference.startswith("/") else folder.join(reference).uri


def _table(rows: dict[str, list], n: int) -> pa.Table:
    return pa.table({name: rows.get(name, [None] * n) for name in ROW_SCHEMA.names}, schema=ROW_SCHEMA)


def _common_voice_split(root: Location, language: str, split: str, limit: int | None) -> pa.Table:
    tsv = root.join(language, f"{split}.tsv")
    if not tsv.is_file():
        raise SourceError(f"Common Voice split file not found: {tsv.uri}")
    options = pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=lambda row: "skip")
    convert = pacsv.ConvertOptions(
        strings_can_be_null=False, column_types={"path": pa.string(), "sentence": pa.string()}
    )
    try:
        with tsv.open() as handle:
            table = pacsv.read_csv(handle, parse_options=options, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{tsv.uri}: not a readable TSV: {exc}") from exc
    missing = {"path", "sentence"} - set(table.column_names)
    if missing:
        columns = f"missing column(s) {sorted(missing)}; Common Voice TSVs have 'path' and 'sentence'"
        raise SourceError(f"{tsv.uri}: {columns}")
    if limit is not None:
        table = table.slice(0, limit)
    names = table.column("path").to_pylist()
    clips = root.join(language, "clips")
    n = len(names)
    return _table(
        {
            "id": [f"{language}/{name}" for name in names],
            "language": [language] * n,
            "split": [split] * n,
            "sentence": table.column("sentence").to_pylist(),
            "audio_path": [clips.join(name).uri for name in names],
        },
        n,
    )


def _manifest_split(
    pattern: str, languages: list[str], split: str, limit: int | None, storage: StorageOptions
) -> Iterator[pa.Table]:
    for language in languages if "{lang}" in pattern else [None]:
        path = pattern.replace("{split}", split).replace("{lang}", language or "")
        files = expand(path, storage)
        if not files:
            raise SourceError(f"no manifest matches {path}")
        ids, langs, sentences, audio = [], [], [], []
        for file in files:
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{file.uri}:{number}: not JSON: {exc}") from exc
                row_language = language or entry.get("language") or entry.get("lang")
                if row_language not in languages:
                    continue
                ids.append(f"{file.name}:{number}")
                langs.append(row_language)
                sentences.append(entry.get("text", ""))
                audio.append(_audio_uri(file.parent, entry.get("audio_filepath", "")))
        if limit is not None:
            ids, langs, sentences, audio = (column[:limit] for column in (ids, langs, sentences, audio))
        n = len(ids)
        yield _table(
            {"id": ids, "language": langs, "split": [split] * n, "sentence": sentences, "audio_path": audio}, n
        )


def _rows_to_dataset(tables: list[pa.Table], block_rows: int) -> ray.data.Dataset:
    table = pa.concat_tables(tables)
    block_rows = max(block_rows, -(-table.num_rows // 2000))
    blocks = [table.slice(start, block_rows) for start in range(0, table.num_rows, block_rows)] or [table]
    return ray.data.from_arrow(blocks)


def _parquet_columns(file: Location) -> list[str]:
    with file.open() as handle:
        return pq.read_schema(handle).names


def _normalize_parquet_batch(
    batch: dict[str, np.ndarray], language: str | None, languages: list[str], split: str, root: Location
) -> pa.Table:
    """Rows of the common schema; ``root``: a location on the files' filesystem (their paths are relative to it)."""
    text_column = next(name for name in TEXT_COLUMNS if name in batch)
    language_column = next((name for name in LANGUAGE_COLUMNS if name in batch), None)
    audio = batch["audio"]
    files = batch["path"]
    audio_bytes = [item.get("bytes") if isinstance(item, dict) else None for item in audio]
    audio_paths = []
    for item, file in zip(audio, files, strict=True):
        inner = item.get("path") if isinstance(item, dict) else None
        audio_paths.append(_audio_uri(root.within(str(file)).parent, inner) if inner else None)
    ids = [
        f"{root.within(str(file)).name}:{inner or hashlib.sha1(data or b'').hexdigest()[:16]}"
        for file, inner, data in zip(files, audio_paths, audio_bytes, strict=True)
    ]
    n = len(ids)
    table = _table(
        {
            "id": ids,
            "language": [language] * n if language else [str(x) for x in batch[language_column]],
            "split": [split] * n,
            "sentence": [str(x) if x is not None else "" for x in batch[text_column]],
            "audio_path": [None if data else path for data, path in zip(audio_bytes, audio_paths, strict=True)],
            "audio_bytes": audio_bytes,
        },
        n,
    )
    return table if language else table.filter(pc.is_in(table["language"], pa.array(languages)))


def _parquet_split(
    pattern: str, languages: list[str], split: str, limit: int | None, storage: StorageOptions
) -> Iterator[ray.data.Dataset]:
    for language in languages if "{lang}" in pattern else [None]:
        path = pattern.replace("{split}", split).replace("{lang}", language or "")
        files = expand(path, storage)
        if not files:
            raise SourceError(f"no Parquet file matches {path}")
        columns = _parquet_columns(files[0])
        if "audio" not in columns or not any(name in columns for name in TEXT_COLUMNS):
            raise SourceError(f"{files[0].uri}: needs an 'audio' column and one of {TEXT_COLUMNS}; has {columns}")
        if language is None and not any(name in columns for name in LANGUAGE_COLUMNS):
            raise SourceError(f"{files[0].uri}: no language column {LANGUAGE_COLUMNS}; put '{{lang}}' in the path")
        wanted = ["audio", *(name for name in (*TEXT_COLUMNS, *LANGUAGE_COLUMNS) if name in columns)]
        dataset = ray.data.read_parquet(
            [file.path for file in files], filesystem=files[0].fs, columns=wanted, include_paths=True
        )
        dataset = dataset.map_batches(
            _normalize_parquet_batch,
            fn_kwargs={"language": language, "languages": languages, "split": split, "root": files[0]},
            batch_format="numpy",
        )
        yield dataset.limit(limit) if limit is not None else dataset


def read_source(data: DataConfig, splits: list[str], storage: StorageOptions | None = None) -> ray.data.Dataset:
    """All rows of ``splits`` for the configured languages, one lazily-read dataset; files are opened through
    ``storage`` (a local or NFS path, ``s3://``, or any other location ``whisper_lora.storage`` opens)."""
    source, limit, storage = data.source, data.limit_per_split, storage or StorageOptions()
    if source.kind == "common_voice":
        root = open_location(source.path, storage)
        tables = [_common_voice_split(root, lang, split, limit) for lang in data.languages for split in splits]
        return _rows_to_dataset(tables, data.batch_size)
    if "{split}" not in source.path:
        raise SourceError(f"source.path {source.path!r} needs a '{{split}}' placeholder for kind {source.kind}")
    if source.kind == "manifest":
        tables = [
            table for split in splits for table in _manifest_split(source.path, data.languages, split, limit, storage)
        ]
        return _rows_to_dataset(tables, data.batch_size)
    datasets = [
        dataset for split in splits for dataset in _parquet_split(source.path, data.languages, split, limit, storage)
    ]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
