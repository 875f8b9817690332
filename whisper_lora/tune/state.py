"""Tune's own state, kept where only this job writes, and its signed mirror on shared storage.

Tune's experiment directory is code, not data: ``tuner.pkl``, ``trainable.pkl``, the trial states inside
``experiment_state-*.json``, ``params.pkl`` and ``error.pkl`` are pickles that ``Tuner.restore`` and ``ResultGrid``
load in the driver, with the job's credentials. So Tune writes to a directory on the driver's disk
(``tune.state_dir``), which is restored as it is. To survive the loss of that disk, the directory is mirrored to
``<train.storage_path>/<sweep>/tune-state/``: every file stored once under its sha256 (``objects/<sha256>``) and a
manifest (path → sha256 and size) signed with HMAC-SHA256 under ``WHISPER_LORA_STATE_KEY``, replaced last in one
step, so an interrupted mirror leaves the previous one whole. A mirror is copied back only after its signature
and every file's hash check out; nothing in it is unpickled before. Without the key there is no mirror, and a
mirror is never restored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from whisper_lora.storage import Location

log = logging.getLogger(__name__)
KEY_ENV = "WHISPER_LORA_STATE_KEY"
MIN_KEY_CHARS = 32
MIRROR_DIR = "tune-state"
MANIFEST = "manifest.json"
OBJECTS = "objects"
FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest larger than this is refused unread (a sweep's lists thousands of files in well under 1 MiB)."""


class TuneStateError(RuntimeError):
    """Tune's state cannot be kept as configured (a key too short to sign with)."""


class TuneStateRejected(TuneStateError):
    """A mirror of Tune's state that this job cannot prove it wrote: refused before anything in it is loaded."""


def state_key(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The signing key from ``WHISPER_LORA_STATE_KEY``; None when unset or empty."""
    value = environ.get(KEY_ENV, "")
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:
        raise TuneStateError(f"{KEY_ENV} has {len(value)} characters, fewer than {MIN_KEY_CHARS}: use a random key, "
                             "e.g. `openssl rand -hex 32`")  # fmt: skip
    return value.encode("utf-8")


def read_snapshot(directory: Path) -> dict[str, bytes] | None:
    """Every file below ``directory`` (relative POSIX path → bytes), each read once; None when a file changed while
    it was read (Tune syncs its state in the background: the next snapshot gets the finished file)."""
    files: dict[str, bytes] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            before = path.stat()
            data = path.read_bytes()
            after = path.stat()
        except FileNotFoundError:
            return None
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
            return None
        files[path.relative_to(directory).as_posix()] = data
    return files


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _signature(body: dict, key: bytes) -> str:
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def signed_manifest(sweep: str, files: Mapping[str, bytes], key: bytes) -> bytes:
    """The manifest of ``files`` (path → sha256 and size), signed: the signature covers the sweep's name too, so
    one sweep's state is never taken for another's."""
    listed = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()}
    body = {"format": FORMAT, "sweep": sweep, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": listed}  # fmt: skip
    return json.dumps({**body, "signature": _signature(body, key)}, indent=1, sort_keys=True).encode("ascii")


def write_mirror(mirror: Location, sweep: str, files: Mapping[str, bytes], key: bytes, stored: set[str]) -> set[str]:
    """Mirror ``files`` to ``mirror``: the objects not yet in ``stored`` (hashes this driver stored or verified),
    then the signed manifest in one step, then objects no manifest names any more. Returns the hashes stored now.
    Exactly the bytes read are hashed, signed and uploaded."""
    digests = {}
    for data in files.values():
        digest = hashlib.sha256(data).hexdigest()
        if digest not in stored and digest not in digests:
            mirror.join(OBJECTS, digest).write_bytes(data)
        digests[digest] = len(data)
    mirror.join(MANIFEST).replace_with(signed_manifest(sweep, files, key))
    for leftover in mirror.join(OBJECTS).files():
        if leftover.name not in digests:
            leftover.fs.delete_file(leftover.path)
    return set(digests)


def _refuse(mirror: Location, reason: str) -> TuneStateRejected:
    return TuneStateRejected(
        f"{mirror.uri}: Tune state refused, {reason}. Nothing there was loaded: Tune's state holds pickles, code the "
        f"driver would run. To start this sweep afresh, remove that prefix; to resume it, set {KEY_ENV} to the key "
        "the sweep was started with."
    )


def _listed_files(body: dict, mirror: Location) -> dict[str, tuple[str, int]]:
    """The signed manifest's files as path → (sha256, bytes), each path one inside the experiment directory."""
    files = body.get("files")
    if not isinstance(files, dict):
        raise _refuse(mirror, "its manifest lists no files")
    listed = {}
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        digest, size = (entry.get("sha256"), entry.get("bytes")) if isinstance(entry, dict) else (None, None)
        if not parts or name.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in name:
            raise _refuse(mirror, f"its manifest names the path {name!r}")
        if not (isinstance(digest, str) and len(digest) == 64 and isinstance(size, int) and size >= 0):
            raise _refuse(mirror, f"its manifest's entry for {name!r} is malformed")
        listed[name] = (digest, size)
    return listed


def verified_files(mirror: Location, sweep: str, key: bytes | None) -> dict[str, bytes]:
    """The files of the mirror's manifest, once the manifest's signature under ``key`` and every file's sha256 and
    size check out; ``TuneStateRejected`` otherwise (no key, no or a bad signature, another sweep's manifest, a
    file missing or changed). Files the manifest does not name are never read."""
    if key is None:
        raise _refuse(mirror, f"{KEY_ENV} is not set, so its signature cannot be checked")
    manifest = mirror.join(MANIFEST)
    if not manifest.is_file():
        raise _refuse(mirror, "it has no manifest")
    if manifest.size() > MAX_MANIFEST_BYTES:
        raise _refuse(mirror, f"its manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(manifest.read_bytes())
    except ValueError:
        raise _refuse(mirror, "its manifest is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("signature"), str):
        raise _refuse(mirror, "its manifest carries no signature")
    body = {name: value for name, value in document.items() if name != "signature"}
    if not hmac.compare_digest(document["signature"].encode("ascii", "replace"), _signature(body, key).encode()):
        raise _refuse(mirror, "its manifest's signature does not match this key (changed, or signed with another)")
    if body.get("format") != FORMAT or body.get("sweep") != sweep:
        raise _refuse(mirror, f"its signed manifest is for sweep {body.get('sweep')!r}, format {body.get('format')}")
    files = {}
    for name, (digest, size) in sorted(_listed_files(body, mirror).items()):
        source = mirror.join(OBJECTS, digest)
        if not source.is_file() or source.size() != size:
            raise _refuse(mirror, f"{name} is missing or has another size")
        data = source.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise _refuse(mirror, f"{name} does not match its signed sha256")
        files[name] = data
    return files


def has_mirror(mirror: Location) -> bool:
    """Whether ``mirror`` holds a manifest (objects without one are an interrupted first mirror: nothing to restore)."""
    return mirror.join(MANIFEST).exists()


def restore_mirror(mirror: Location, experiment: Path, sweep: str, key: bytes | None) -> set[str]:
    """Copy the verified mirror into ``experiment`` (Tune's experiment directory, replaced in one rename); returns
    the hashes it holds (already stored: the next mirror uploads only what changed). ``TuneStateRejected`` when
    the mirror does not verify: then nothing is written."""
    files = verified_files(mirror, sweep, key)
    staging = experiment.parent / f".{experiment.name}.restoring-{uuid.uuid4().hex}"
    for name, data in files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if experiment.exists():
        shutil.rmtree(experiment)  # the driver's own directory without Tune's state (a start that never got far)
    staging.mkdir(parents=True, exist_ok=True)
    os.replace(staging, experiment)
    log.info("restored Tune's state of sweep %s from its verified mirror %s (%d files)", sweep, mirror.uri, len(files))
    return {hashlib.sha256(data).hexdigest() for data in files.values()}
