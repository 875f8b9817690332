"""Where the project reads and writes: the one place that turns a location as a user writes it into a
filesystem and a path inside it.

Accepted: a local or NFS path, ``s3://bucket/prefix``, any other URI ``pyarrow.fs`` opens (``gs://``,
``hdfs://``, ``abfs://``), and whatever an installed fsspec implementation serves (``hf://`` through
``huggingface_hub``, ``memory://``). Sources, Ray's checkpoint storage, publishing and ``transcribe`` all open
their locations here with the same ``storage`` options (S3 endpoint and region), so an endpoint set once applies
to every reader and writer. A new backend is a new branch in ``_filesystem`` and nothing else.

Credentials never come from a config file: pyarrow and fsspec read them from the environment (``AWS_*``,
instance profiles, ``HF_TOKEN``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

CHUNK = 8 << 20
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")
_WILDCARD = re.compile(r"[*?\[]")


class StorageOptions(BaseModel):
    """How remote locations are reached: the config's ``storage`` section, used by every reader and writer."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    s3_endpoint: str | None = Field(
        None,
        description=(
            "S3-compatible endpoint for every s3:// location (MinIO, Ceph, a local moto server); null uses "
            "AWS_ENDPOINT_URL, else AWS itself."
        ),
    )
    s3_region: str | None = Field(None, description="S3 region; null uses AWS_REGION / AWS_DEFAULT_REGION.")


def scheme(location: str) -> str | None:
    """``"s3"`` for ``s3://…``; None for a plain path."""
    match = _SCHEME.match(location)
    return match.group(1) if match else None


def is_remote(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://…``) rather than a local or NFS path."""
    return scheme(location) not in (None, "file")


def absolute(location: str) -> str:
    """Remote URIs unchanged; local paths made absolute (what processes in other directories are given)."""
    return location if is_remote(location) else str(Path(location.removeprefix("file://")).expanduser().resolve())


def _s3(options: StorageOptions) -> pafs.S3FileSystem:
    endpoint = options.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    region = options.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    settings: dict[str, Any] = {"region": region} if region else {}
    if endpoint:
        endpoint_scheme, _, host = endpoint.rpartition("://")
        settings.update(endpoint_override=host or endpoint, scheme=endpoint_scheme or "https")
    return pafs.S3FileSystem(**settings)


def _filesystem(location: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a location: pyarrow's own filesystems first, then fsspec's."""
    kind = scheme(location)
    if kind in (None, "file"):
        return pafs.LocalFileSystem(), absolute(location)
    if kind == "s3":
        return _s3(options), location.removeprefix("s3://").rstrip("/")
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise StorageError(f"{location}: no filesystem for {kind}:// (pip install fsspec)") from exc
    try:
        filesystem, path = url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{location}: no filesystem for {kind}://: {exc}") from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


class StorageError(ValueError):
    """A location that cannot be opened at all (unknown scheme, missing backend)."""


@dataclass(frozen=True)
class Location:
    """A file or directory: its filesystem, its path there (no scheme) and its URI as a user writes it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        """A location below this one (``parts`` are joined with ``/`` on every filesystem)."""
        tail = "/".join(part.strip("/") for part in parts if part)
        return Location(self.fs, f"{self.path.rstrip('/')}/{tail}", f"{self.uri.rstrip('/')}/{tail}")

    def within(self, path: str) -> Location:
        """Another path of this location's filesystem (a checkpoint path Ray reports), with its URI."""
        prefix = self.path.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return Location(self.fs, path, self.uri + path[len(prefix) :])
        return Location(self.fs, path, path if self.is_local else f"{scheme(self.uri)}://{path.lstrip('/')}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0], self.uri.rstrip("/").rsplit("/", 1)[0])

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def files(self) -> list[Location]:
        """Every file below this directory, sorted by path (none when it does not exist)."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = sorted((info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File),
                       key=lambda info: info.path)  # fmt: skip
        return [self.join(info.path[len(self.path.rstrip("/")) + 1 :]) for info in infos]

    def inventory(self) -> list[tuple[str, int, int | None]]:
        """(path, bytes, modification time in ns; None where the store gives none) of this file, or of every file
        below this directory, sorted: what tells a changed input from an unchanged one without reading it."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
            infos = [info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted((info.path, info.size, info.mtime_ns) for info in infos)

    @contextmanager
    def open(self) -> Iterator[pafs.NativeFile]:
        """A seekable reader (soundfile, pyarrow and json read from it as from a local file)."""
        with self.fs.open_input_file(self.path) as handle:
            yield handle

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any | None:
        """The JSON document here, or None when there is no file."""
        return json.loads(self.read_text()) if self.is_file() else None

    def write_bytes(self, data: bytes) -> None:
        self.fs.create_dir(self.parent.path, recursive=True)
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def replace_with(self, data: bytes) -> None:
        """Replace this file in one step: readers see the old bytes or the new, never a partial file (rename of
        a complete temporary file on a filesystem, a single PUT on an object store)."""
        if not self.is_local:
            self.write_bytes(data)
            return
        temporary = self.parent.join(f".{self.name}.partial-{uuid.uuid4().hex}")
        temporary.write_bytes(data)
        os.replace(temporary.path, self.path)

    def sha256(self) -> tuple[str, int]:
        """(hex digest, bytes) of this file, streamed."""
        digest, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(self.path) as reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def copy_to(self, target: Location) -> None:
        """Stream this file to ``target`` (any filesystem to any other)."""
        target.fs.create_dir(target.parent.path, recursive=True)
        with self.fs.open_input_stream(self.path) as reader, target.fs.open_output_stream(target.path) as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)


def refuse_credentials(location: str) -> str:
    """``location`` unchanged, unless it carries user info (``s3://KEY:SECRET@bucket``): credentials in a URI end
    up in logs, stats and manifests, so they are refused without repeating them."""
    if is_remote(location) and "@" in urlsplit(location).netloc:
        raise StorageError(f"{scheme(location)}:// location with credentials in it (user@…): refused; "
                           "credentials come from the environment")  # fmt: skip
    return location


def open_location(location: str, options: StorageOptions | None = None) -> Location:
    """The ``Location`` of a local path or URI; ``options`` default to none (environment only)."""
    refuse_credentials(location)
    filesystem, path = _filesystem(location, options or StorageOptions())
    uri = absolute(location) if not is_remote(location) else location.rstrip("/")
    return Location(filesystem, path.rstrip("/") or path, uri)


def expand(pattern: str, options: StorageOptions | None = None) -> list[Location]:
    """Files matching a location that is a file, a directory (every file below it) or a glob, sorted."""
    wildcard = _WILDCARD.search(pattern)
    if not wildcard:
        location = open_location(pattern, options)
        return [location] if location.is_file() else location.files()
    base = open_location(pattern[: wildcard.start()].rsplit("/", 1)[0], options)
    glob = base.path + pattern[len(base.uri) :] if is_remote(pattern) else absolute(pattern)
    return [file for file in base.files() if fnmatch.fnmatch(file.path, glob)]
