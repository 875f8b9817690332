"""Sources: each read lazily into one ``ray.data.Dataset`` of rows
``id, language, split, sentence, audio_path, audio_bytes, drop_reason``: one of the two audio columns set, or
``drop_reason`` when the source already knows the row is unusable.

Audio stays where it is until the feature stage decodes it: a Common Voice TSV or a manifest contributes only
its text rows (kilobytes per thousand clips), Parquet shards are streamed by ``read_parquet``.

Rows are untrusted. A row's audio must lie under its source's folder (``AudioFolder``): otherwise a TSV naming
``/etc/shadow`` or ``../../x`` has any readable file decoded, and the drop counts tell whether it exists. Such
rows, and rows that cannot be parsed, go on with ``drop_reason`` set (``outside_source``, ``bad_row``), so the
feature stage counts them with every other dropped row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

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
        ("drop_reason", pa.string()),
    ]
)
TEXT_COLUMNS = ("sentence", "text", "transcription")
LANGUAGE_COLUMNS = ("language", "locale")
UNKNOWN_LANGUAGE = "unknown"
"""Where a manifest line that is not a JSON object is counted when the path has no ``{lang}`` to tell."""
MAX_TSV_BLOCK = 2**31 - 1
"""pyarrow's largest parse block. A TSV is parsed as one block up to this size, so no row is too long."""


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, missing column): raised before any Ray work."""


@dataclass
class AudioFolder:
    """The folder a source's rows may name audio under, and the check that a reference stays there.

    A local reference is checked by its real path, which is also what is read: a symlink in the folder pointing
    out is outside, and a later lookup cannot land elsewhere. A remote one by its ``..``-normalised URI. Nothing
    outside is looked at, so the verdict never tells whether a file exists there.
    """

    folder: Location
    allow_outside: bool = False
    _real_dirs: dict[str, str] = field(default_factory=dict, repr=False)

    def resolve(self, reference: str) -> str | None:
        """Where to read ``reference`` (a relative one resolves against the folder); None when that is outside
        the folder and ``allow_outside`` is off."""
        uri = reference if is_remote(reference) or reference.startswith("/") else self.folder.join(reference).uri
        if self.allow_outside:
            return uri
        if is_remote(uri) != is_remote(self.folder.uri):
            return None
        target = self._real_path(uri) if self.folder.is_local else _normalized_uri(uri)
        return target if target == self._root or target.startswith(self._root.rstrip("/") + "/") else None

    @functools.cached_property
    def _root(self) -> str:
        return os.path.realpath(self.folder.path) if self.folder.is_local else _normalized_uri(self.folder.uri)

    def _real_path(self, path: str) -> str:
        """``os.path.realpath``, each directory resolved once: one ``lstat`` per row of a million-row TSV
        instead of one per path component."""
        parent, name = os.path.split(path)
        if parent not in self._real_dirs:
            self._real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(self._real_dirs[parent], name)
        return os.path.realpath(real) if name in ("", ".", "..") or os.path.islink(real) else real

    def audio(self, reference: str) -> dict[str, str | None]:
        """The row's ``audio_path``, or its ``drop_reason`` when the reference is outside."""
        path = self.resolve(reference)
        return {"audio_path": path, "drop_reason": None if path else "outside_source"}


def _normalized_uri(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def _table(rows: dict[str, list], n: int) -> pa.Table:
    return pa.table({name: rows.get(name, [None] * n) for name in ROW_SCHEMA.names}, schema=ROW_SCHEMA)


def _bad_row(row_id: str, language: str, split: str) -> dict[str, str]:
    """A placeholder for a row that cannot be parsed: counted as ``bad_row`` under its language and split."""
    return {"id": row_id, "language": language, "split": split, "drop_reason": "bad_row"}


def _common_voice_split(root: Location, language: str, split: str, limit: int | None, allow_outside: bool) -> pa.Table:
    """Rows of ``<root>/<language>/<split>.tsv``; a row with the wrong number of columns is a ``bad_row``
    (counted whatever ``limit``)."""
    tsv = root.join(language, f"{split}.tsv")
    if not tsv.is_file():
        raise SourceError(f"Common Voice split file not found: {tsv.uri}")
    bad_lines: list[int | None] = []

    def count_bad_row(row: pacsv.InvalidRow) -> str:
        bad_lines.append(row.number)
        return "skip"

    options = pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=count_bad_row)
    convert = pacsv.ConvertOptions(
        strings_can_be_null=False, column_types={"path": pa.string(), "sentence": pa.string()}
    )
    try:
        with tsv.open() as handle:
            # One block: pyarrow rejects the whole file when a row straddles two. One thread: line numbers.
            read = pacsv.ReadOptions(block_size=min(handle.size() + 1, MAX_TSV_BLOCK), use_threads=False)
            table = pacsv.read_csv(handle, read_options=read, parse_options=options, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{tsv.uri}: not a readable TSV: {exc}") from exc
    missing = {"path", "sentence"} - set(table.column_names)
    if missing:
        columns = f"missing column(s) {sorted(missing)}; Common Voice TSVs have 'path' and 'sentence'"
        raise SourceError(f"{tsv.uri}: {columns}")
    if limit is not None:
        table = table.slice(0, limit)
    names = table.column("path").to_pylist()
    folder = AudioFolder(root.join(language, "clips"), allow_outside)
    audio = [folder.audio(name) for name in names]
    n = len(names)
    rows = _table(
        {
            "id": [f"{language}/{name}" for name in names],
            "language": [language] * n,
            "split": [split] * n,
            "sentence": table.column("sentence").to_pylist(),
            "audio_path": [row["audio_path"] for row in audio],
            "drop_reason": [row["drop_reason"] for row in audio],
        },
        n,
    )
    bad = [_bad_row(f"{language}/{split}.tsv:{line}", language, split) for line in bad_lines]
    return pa.concat_tables([rows, pa.Table.from_pylist(bad, schema=ROW_SCHEMA)])


def _json_object(line: bytes) -> dict | None:
    """The JSON object on one manifest line; None for anything else (not UTF-8, not JSON, an array, a string)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _manifest_split(
    pattern: str, languages: list[str], split: str, limit: int | None, storage: StorageOptions, allow_outside: bool
) -> Iterator[pa.Table]:
    """Rows of NeMo manifests. A line that is not a JSON object with a string ``audio_filepath`` and ``text``
    is a ``bad_row`` (counted whatever ``limit``), never an error for the whole file."""
    for language in languages if "{lang}" in pattern else [None]:
        path = pattern.replace("{split}", split).replace("{lang}", language or "")
        files = expand(path, storage)
        if not files:
            raise SourceError(f"no manifest matches {path}")
        rows, bad = [], []
        for file in files:
            folder = AudioFolder(file.parent, allow_outside)
            for number, line in enumerate(file.read_bytes().splitlines(), 1):
                if not line.strip():
                    continue
                row_id = f"{file.name}:{number}"
                entry = _json_object(line)
                if entry is None:
                    bad.append(_bad_row(row_id, language or UNKNOWN_LANGUAGE, split))
                    continue
                row_language = language or entry.get("language") or entry.get("lang")
                if row_language not in languages:
                    continue
                text, reference = entry.get("text", ""), entry.get("audio_filepath")
                if not isinstance(text, str) or not isinstance(reference, str) or not reference:
                    bad.append(_bad_row(row_id, row_language, split))
                    continue
                fields = {"id": row_id, "language": row_language, "split": split, "sentence": text}
                rows.append(fields | folder.audio(reference))
        yield pa.Table.from_pylist([*rows[:limit], *bad], schema=ROW_SCHEMA)


def _rows_to_dataset(tables: list[pa.Table], block_rows: int) -> ray.data.Dataset:
    table = pa.concat_tables(tables)
    block_rows = max(block_rows, -(-table.num_rows // 2000))
    blocks = [table.slice(start, block_rows) for start in range(0, table.num_rows, block_rows)] or [table]
    return ray.data.from_arrow(blocks)


def _parquet_columns(file: Location) -> list[str]:
    with file.open() as handle:
        return pq.read_schema(handle).names


def _normalize_parquet_batch(
    batch: dict[str, np.ndarray],
    language: str | None,
    languages: list[str],
    split: str,
    root: Location,
    allow_outside: bool,
) -> pa.Table:
    """Rows of the common schema; ``root``: a location on the files' filesystem (their paths are relative to it).
    An ``audio.path`` is read only when there are no ``audio.bytes``, and only under its Parquet file's folder;
    a row with neither is a ``bad_row``."""
    text_column = next(name for name in TEXT_COLUMNS if name in batch)
    language_column = next((name for name in LANGUAGE_COLUMNS if name in batch), None)
    folders: dict[str, AudioFolder] = {}
    columns: dict[str, list] = {name: [] for name in ("id", "audio_path", "audio_bytes", "drop_reason")}
    for item, file in zip(batch["audio"], batch["path"], strict=True):
        item = item if isinstance(item, dict) else {}
        data, reference = item.get("bytes") or None, item.get("path") or None
        parquet_file = root.within(str(file))
        if data is not None:
            audio = {"audio_path": None, "drop_reason": None}
        elif isinstance(reference, str):
            if parquet_file.path not in folders:
                folders[parquet_file.path] = AudioFolder(parquet_file.parent, allow_outside)
            audio = folders[parquet_file.path].audio(reference)
        else:
            audio = {"audio_path": None, "drop_reason": "bad_row"}
        columns["id"].append(f"{parquet_file.name}:{reference or hashlib.sha1(data or b'').hexdigest()[:16]}")
        columns["audio_bytes"].append(data)
        for name, value in audio.items():
            columns[name].append(value)
    n = len(columns["id"])
    table = _table(
        {
            **columns,
            "language": [language] * n if language else [str(x) for x in batch[language_column]],
            "split": [split] * n,
            "sentence": [str(x) if x is not None else "" for x in batch[text_column]],
        },
        n,
    )
    return table if language else table.filter(pc.is_in(table["language"], pa.array(languages)))


def _parquet_split(
    pattern: str, languages: list[str], split: str, limit: int | None, storage: StorageOptions, allow_outside: bool
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
            fn_kwargs={
                "language": language,
                "languages": languages,
                "split": split,
                "root": files[0],
                "allow_outside": allow_outside,
            },
            batch_format="numpy",
        )
        yield dataset.limit(limit) if limit is not None else dataset


def read_source(data: DataConfig, splits: list[str], storage: StorageOptions | None = None) -> ray.data.Dataset:
    """All rows of ``splits`` for the configured languages, one lazily-read dataset; files are opened through
    ``storage`` (a local or NFS path, ``s3://``, or any other location ``whisper_lora.storage`` opens)."""
    source, limit, storage = data.source, data.limit_per_split, storage or StorageOptions()
    outside = source.allow_outside_paths
    if source.kind == "common_voice":
        root = open_location(source.path, storage)
        tables = [_common_voice_split(root, lang, split, limit, outside) for lang in data.languages for split in splits]
        return _rows_to_dataset(tables, data.batch_size)
    if "{split}" not in source.path:
        raise SourceError(f"source.path {source.path!r} needs a '{{split}}' placeholder for kind {source.kind}")
    if source.kind == "manifest":
        tables = [
            table
            for split in splits
            for table in _manifest_split(source.path, data.languages, split, limit, storage, outside)
        ]
        return _rows_to_dataset(tables, data.batch_size)
    datasets = [
        dataset
        for split in splits
        for dataset in _parquet_split(source.path, data.languages, split, limit, storage, outside)
    ]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
