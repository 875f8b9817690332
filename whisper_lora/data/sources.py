"""Sources: each read lazily into one ``ray.data.Dataset`` of rows
``id, language, split, sentence, audio_path, audio_bytes, drop_reason``: one of the two audio columns set, or
``drop_reason`` when the source already knows the row is unusable.

Audio stays where it is until the feature stage decodes it: a Common Voice TSV or a manifest contributes only
its text rows (kilobytes per thousand clips), Parquet shards are streamed by ``read_parquet``.

Rows are untrusted. A row's audio must lie under its source's folder (``AudioFolder``): otherwise a TSV naming
``/etc/shadow`` or ``../../x`` has any readable file decoded, and the drop counts tell whether it exists. Such
rows, and rows that cannot be parsed, go on with ``drop_reason`` set (``outside_source``, ``bad_row``), so the
feature stage counts them with every other dropped row.

Datasets spell languages their own way: Common Voice by code (``mr``), IndicVoices and Kathbath by name
(``marathi``), FLEURS by config (``mr_in``) in paths and by name (``Marathi``) in rows. ``{lang}`` in a path is
spelled as ``source.language_names`` and ``source.language_map`` say; a language column is resolved through every
known spelling. A row whose language resolves to nothing is kept as ``unknown_language`` (a wrong map shows up in
``stats.json`` instead of as a smaller corpus); rows of known languages the run did not ask for are not its rows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data

from whisper_lora.config import DataConfig, SourceConfig
from whisper_lora.languages import language_lookup, spelling
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
"""Where rows are counted whose language is not known: a manifest line that is not a JSON object when the path
has no ``{lang}`` to tell, a row whose language column matches no language (``unknown_language``)."""
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


def _language_paths(pattern: str, source: SourceConfig, languages: list[str], split: str) -> Iterator[tuple]:
    """(language, path) for each configured language when ``pattern`` has ``{lang}`` (spelled as the source
    spells it), else once with language None: the rows then say their language."""
    for language in languages if "{lang}" in pattern else [None]:
        try:
            spelled = spelling(language, source.language_names, source.language_map) if language else ""
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        yield language, pattern.replace("{split}", split).replace("{lang}", spelled)


def row_language(value: object, lookup: dict[str, str], languages: list[str]) -> tuple[str, str | None] | None:
    """(language, drop reason) of a row whose language column says ``value``: a configured language, or
    ``unknown`` with ``unknown_language`` when no spelling matches; None for another known language's row."""
    code = lookup.get(str(value).strip().casefold()) if value is not None else None
    if code is None:
        return UNKNOWN_LANGUAGE, "unknown_language"
    return (code, None) if code in languages else None


def _table(rows: dict[str, list], n: int) -> pa.Table:
    return pa.table({name: rows.get(name, [None] * n) for name in ROW_SCHEMA.names}, schema=ROW_SCHEMA)


def _bad_row(row_id: str, language: str, split: str) -> dict[str, str]:
    """A placeholder for a row that cannot be parsed: counted as ``bad_row`` under its language and split."""
    return {"id": row_id, "language": language, "split": split, "drop_reason": "bad_row"}


def _common_voice_split(
    root: Location, language: str, directory: str, split: str, limit: int | None, allow_outside: bool
) -> pa.Table:
    """Rows of ``<root>/<directory>/<split>.tsv`` (``directory``: the language as the release spells it); a row
    with the wrong number of columns is a ``bad_row`` (counted whatever ``limit``)."""
    tsv = root.join(directory, f"{split}.tsv")
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
    folder = AudioFolder(root.join(directory, "clips"), allow_outside)
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
    source: SourceConfig, languages: list[str], split: str, limit: int | None, storage: StorageOptions
) -> Iterator[pa.Table]:
    """Rows of NeMo manifests. A line that is not a JSON object with a string ``audio_filepath`` and text is a
    ``bad_row`` (counted whatever ``limit``), never an error for the whole file."""
    text_key = source.text_column or "text"
    language_keys = [source.language_column] if source.language_column else ["language", "lang"]
    lookup = language_lookup(source.language_map)
    for language, path in _language_paths(source.path, source, languages, split):
        files = expand(path, storage)
        if not files:
            raise SourceError(f"no manifest matches {path}")
        rows, bad = [], []
        for file in files:
            folder = AudioFolder(file.parent, source.allow_outside_paths)
            for number, line in enumerate(file.read_bytes().splitlines(), 1):
                if not line.strip():
                    continue
                row_id = f"{file.name}:{number}"
                entry = _json_object(line)
                if entry is None:
                    bad.append(_bad_row(row_id, language or UNKNOWN_LANGUAGE, split))
                    continue
                found = (language, None)
                if language is None:
                    found = row_language(next((entry[k] for k in language_keys if k in entry), None), lookup, languages)
                    if found is None:
                        continue
                text, reference = entry.get(text_key, ""), entry.get("audio_filepath")
                fields = {"id": row_id, "language": found[0], "split": split, "sentence": text}
                if found[1]:
                    bad.append(fields | {"sentence": None, "drop_reason": found[1]})
                elif not isinstance(text, str) or not isinstance(reference, str) or not reference:
                    bad.append(_bad_row(row_id, found[0], split))
                else:
                    rows.append(fields | folder.audio(reference))
        yield pa.Table.from_pylist([*rows[:limit], *bad], schema=ROW_SCHEMA)


def _rows_to_dataset(tables: list[pa.Table], block_rows: int) -> ray.data.Dataset:
    table = pa.concat_tables(tables)
    block_rows = max(block_rows, -(-table.num_rows // 2000))
    blocks = [table.slice(start, block_rows) for start in range(0, table.num_rows, block_rows)] or [table]
    return ray.data.from_arrow(blocks)


@dataclass(frozen=True)
class Columns:
    """Which columns of a Parquet or Arrow source hold the text and the language (None: ``{lang}`` in the path
    says it), and the names of a ``ClassLabel`` language column's integer values."""

    text: str
    language: str | None
    label_names: tuple[str, ...] = ()

    @property
    def wanted(self) -> list[str]:
        return ["audio", self.text, *([self.language] if self.language else [])]


def _columns(source: SourceConfig, present: list[str], language_known: bool, file: Location) -> Columns:
    """The configured (or first conventional) text and language columns, checked against ``present``."""
    text = source.text_column or next((name for name in TEXT_COLUMNS if name in present), None)
    language = source.language_column or next((name for name in LANGUAGE_COLUMNS if name in present), None)
    if language_known:
        language = None
    if "audio" not in present or text is None or text not in present:
        wanted = repr(text) if source.text_column else f"one of {TEXT_COLUMNS}"
        raise SourceError(f"{file.uri}: needs an 'audio' column and {wanted} (data.source.text_column); has {present}")
    if not language_known and (language is None or language not in present):
        raise SourceError(f"{file.uri}: no language column ({language or LANGUAGE_COLUMNS}); set "
                          f"data.source.language_column or put '{{lang}}' in the path; has {present}")  # fmt: skip
    return Columns(text, language)


def _normalize_rows(
    audio_items: list,
    texts: list,
    row_languages: list | None,
    files: list[str],
    *,
    language: str | None,
    languages: list[str],
    language_map: dict[str, str],
    label_names: tuple[str, ...],
    split: str,
    root: Location,
    allow_outside: bool,
) -> pa.Table:
    """Rows of the common schema from a Hugging Face audio layout (``audio`` struct of ``bytes``/``path``, text,
    language); ``files``: each row's data file, a path on ``root``'s filesystem. An ``audio.path`` is read only
    when there are no ``audio.bytes``, and only under its data file's folder; a row with neither is a
    ``bad_row``; a language column value that names no language is ``unknown_language``."""
    lookup = language_lookup(language_map)
    folders: dict[str, AudioFolder] = {}
    columns: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    for i, (item, file) in enumerate(zip(audio_items, files, strict=True)):
        found: tuple[str, str | None] | None = (language, None)
        if language is None:
            value = row_languages[i]
            if label_names and isinstance(value, int | np.integer) and 0 <= value < len(label_names):
                value = label_names[value]
            found = row_language(value, lookup, languages)
            if found is None:
                continue
        item = item if isinstance(item, dict) else {}
        data, reference = item.get("bytes") or None, item.get("path") or None
        data_file = root.within(str(file))
        if data is not None:
            audio = {"audio_path": None, "drop_reason": None}
        elif isinstance(reference, str):
            if data_file.path not in folders:
                folders[data_file.path] = AudioFolder(data_file.parent, allow_outside)
            audio = folders[data_file.path].audio(reference)
        else:
            audio = {"audio_path": None, "drop_reason": "bad_row"}
        row_id = f"{data_file.name}:{reference or hashlib.sha1(data or b'').hexdigest()[:16]}"
        if found[1]:
            row_id += f" (language {str(row_languages[i])[:40]!r})"
        text = texts[i]
        row = {
            "id": row_id,
            "language": found[0],
            "split": split,
            "sentence": str(text) if text is not None else "",
            "audio_bytes": data,
            "audio_path": audio["audio_path"],
            "drop_reason": found[1] or audio["drop_reason"],
        }
        for name, value in row.items():
            columns[name].append(value)
    return _table(columns, len(columns["id"]))


def _normalize_parquet_batch(batch: dict[str, np.ndarray], columns: Columns, **context) -> pa.Table:
    """``_normalize_rows`` of one ``read_parquet`` batch (its ``path`` column: each row's file)."""
    row_languages = list(batch[columns.language]) if columns.language else None
    return _normalize_rows(list(batch["audio"]), list(batch[columns.text]), row_languages, list(batch["path"]),
                           label_names=columns.label_names, **context)  # fmt: skip


def _read_saved_files(batch: dict[str, np.ndarray], columns: Columns, root: Location, **context) -> Iterator[pa.Table]:
    """Rows of ``save_to_disk`` Arrow files (Arrow IPC streams), one record batch at a time."""
    for path in batch["file"]:
        file = root.within(str(path))
        with file.open() as handle:
            for record_batch in pa.ipc.open_stream(handle):
                data = record_batch.select(columns.wanted).to_pydict()
                yield _normalize_rows(
                    data["audio"],
                    data[columns.text],
                    data[columns.language] if columns.language else None,
                    [file.path] * record_batch.num_rows,
                    label_names=columns.label_names,
                    root=root,
                    **context,
                )


def _context(source: SourceConfig, language: str | None, languages: list[str], split: str) -> dict:
    return {
        "language": language,
        "languages": languages,
        "language_map": dict(source.language_map),
        "split": split,
        "allow_outside": source.allow_outside_paths,
    }


@contextlib.contextmanager
def footers_in_read_tasks() -> Iterator[None]:
    """``read_parquet`` calls made inside use Ray Data's V1 Parquet reader, which reads footers in its read tasks.
    Ray 2.60's default (V2) starts a pool of 32 footer-reader actors for every call, and a source is read once per
    language and split: 192 Python processes for two languages, which a small cluster cannot start (the sweep's
    prepare step hung on a 3-node dry run). The choice is made when the dataset is created."""
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def _parquet_split(
    source: SourceConfig, languages: list[str], split: str, limit: int | None, storage: StorageOptions
) -> Iterator[ray.data.Dataset]:
    for language, path in _language_paths(source.path, source, languages, split):
        files = expand(path, storage)
        if not files:
            raise SourceError(f"no Parquet file matches {path}")
        with files[0].open() as handle:
            columns = _columns(source, pq.read_schema(handle).names, language is not None, files[0])
        with footers_in_read_tasks():
            dataset = ray.data.read_parquet(
                [file.path for file in files], filesystem=files[0].fs, columns=columns.wanted, include_paths=True
            )
        dataset = dataset.map_batches(
            _normalize_parquet_batch,
            fn_kwargs={"columns": columns, "root": files[0], **_context(source, language, languages, split)},
            batch_format="numpy",
        )
        yield dataset.limit(limit) if limit is not None else dataset


def _saved_split_dir(location: Location, split: str, split_in_path: bool) -> Location:
    """The directory of one split of a ``save_to_disk`` directory: a DatasetDict's ``<split>/`` subdirectory, or
    the directory itself when the path already names the split."""
    splits = location.join("dataset_dict.json").read_json()
    if splits is not None:
        if split not in splits.get("splits", []):
            raise SourceError(f"{location.uri}: no split {split!r} in this DatasetDict; it has {splits.get('splits')}")
        return location.join(split)
    if not split_in_path:
        raise SourceError(f"{location.uri}: a single Dataset (no dataset_dict.json): put '{{split}}' in the path")
    return location


def _saved_split(
    source: SourceConfig, languages: list[str], split: str, limit: int | None, storage: StorageOptions
) -> Iterator[ray.data.Dataset]:
    """Rows of a ``datasets.save_to_disk`` directory: its ``state.json`` lists the Arrow files,
    ``dataset_info.json`` the names of a ``ClassLabel`` language column."""
    for language, path in _language_paths(source.path, source, languages, split):
        directory = _saved_split_dir(open_location(path, storage), split, "{split}" in source.path)
        state = directory.join("state.json").read_json()
        if not isinstance(state, dict) or not state.get("_data_files"):
            raise SourceError(f"{directory.uri}: not a datasets save_to_disk directory (no state.json data files)")
        files = [directory.join(entry["filename"]) for entry in state["_data_files"]]
        with files[0].open() as handle:
            present = pa.ipc.open_stream(handle).schema.names
        columns = _columns(source, present, language is not None, files[0])
        features = (directory.join("dataset_info.json").read_json() or {}).get("features", {})
        feature = features.get(columns.language, {}) if columns.language else {}
        if feature.get("_type") == "ClassLabel":
            columns = Columns(columns.text, columns.language, tuple(feature.get("names", ())))
        dataset = ray.data.from_items([{"file": file.path} for file in files]).map_batches(
            _read_saved_files,
            batch_size=1,
            fn_kwargs={"columns": columns, "root": directory, **_context(source, language, languages, split)},
            batch_format="numpy",
        )
        yield dataset.limit(limit) if limit is not None else dataset


def source_fingerprint(data: DataConfig, splits: list[str], storage: StorageOptions | None = None) -> str:
    """sha256 of the inventory (path, bytes, modification time) of every file the configured languages' ``splits``
    are read from: a corpus rebuilt or edited at the same path changes it, so shards prepared from the old one are
    not reused. Common Voice: each language's directory (TSVs and clips); the other kinds: the files each split's
    path names. A manifest's audio files, which may live anywhere, are not listed: edit the manifest (or rename it)
    when the audio changes."""
    source, storage = data.source, storage or StorageOptions()
    if source.kind == "common_voice":
        root = open_location(source.path, storage)
        locations = [root.join(directory) for lang in data.languages for _, directory in
                     _language_paths("{lang}", source, [lang], "")]  # fmt: skip
    else:
        patterns = [path for split in splits for _, path in _language_paths(source.path, source, data.languages, split)]
        locations = [file for pattern in dict.fromkeys(patterns) for file in expand(pattern, storage)]
    digest = hashlib.sha256()
    for location in locations:
        for path, size, mtime_ns in location.inventory():
            digest.update(f"{path}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()


def read_source(data: DataConfig, splits: list[str], storage: StorageOptions | None = None) -> ray.data.Dataset:
    """All rows of ``splits`` for the configured languages, one lazily-read dataset; files are opened through
    ``storage`` (a local or NFS path, ``s3://``, ``hf://``, or any other location ``whisper_lora.storage`` opens)."""
    source, limit, storage = data.source, data.limit_per_split, storage or StorageOptions()
    if source.kind == "common_voice":
        root = open_location(source.path, storage)
        tables = [
            _common_voice_split(root, lang, directory, split, limit, source.allow_outside_paths)
            for lang in data.languages
            for split in splits
            for _, directory in _language_paths("{lang}", source, [lang], split)
        ]
        return _rows_to_dataset(tables, data.batch_size)
    if "{split}" not in source.path and source.kind != "save_to_disk":
        raise SourceError(f"source.path {source.path!r} needs a '{{split}}' placeholder for kind {source.kind}")
    if source.kind == "manifest":
        tables = [table for split in splits for table in _manifest_split(source, data.languages, split, limit, storage)]
        return _rows_to_dataset(tables, data.batch_size)
    read = _saved_split if source.kind == "save_to_disk" else _parquet_split
    datasets = [dataset for split in splits for dataset in read(source, data.languages, split, limit, storage)]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
