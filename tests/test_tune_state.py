"""Tune's state is code (pickles): a sweep resumes only from state this job wrote. The driver's own directory is
restored as it is; the mirror on shared storage only once its HMAC-signed manifest and every file's hash check
out. Tampered, added, removed or forged state is refused before anything in it is loaded; a planted pickle never
runs. And (Ray) a sweep's mirror lets a driver that lost its disk resume without training finished trials again."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import pytest

from whisper_lora.config import load_config
from whisper_lora.storage import StorageOptions, open_location
from whisper_lora.tune.state import (
    KEY_ENV,
    MANIFEST,
    MIRROR_DIR,
    OBJECTS,
    TuneStateError,
    TuneStateRejected,
    read_snapshot,
    restore_mirror,
    signed_manifest,
    state_key,
    verified_files,
    write_mirror,
)

KEY = "k" * 16 + "0123456789abcdef0123456789abcdef"
OTHER_KEY = "x" * 48
SWEEP = "t-tune-0123abcd"


class _Plant:
    """A pickle that runs code when loaded: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _state() -> dict[str, bytes]:
    """Files as Tune's experiment directory holds them (names and kinds; the content is a stand-in)."""
    return {
        "tuner.pkl": pickle.dumps({"tuner": "state"}),
        "trainable.pkl": pickle.dumps({"trainable": 1}),
        "experiment_state-2026-01-01_00-00-00.json": b'{"trial_data": []}',
        "basic-variant-state-2026-01-01_00-00-00.json": b"{}",
        "train_trial_0a1b2_00000_0_rank=2/params.json": b'{"rank": 2}',
        "train_trial_0a1b2_00000_0_rank=2/result.json": b'{"loss": 1.0}\n',
    }


def _mirrored(tmp_path: Path, files: dict[str, bytes] | None = None, key: str = KEY):
    mirror = open_location(str(tmp_path / "ray" / SWEEP / MIRROR_DIR))
    stored = write_mirror(mirror, SWEEP, files or _state(), key.encode(), set())
    return mirror, stored


def _manifest(mirror) -> dict:
    return json.loads(mirror.join(MANIFEST).read_bytes())


def _plant_object(mirror, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    mirror.join(OBJECTS, digest).write_bytes(data)
    return digest


def test_a_mirror_restores_exactly_what_was_signed_and_never_holds_the_key(tmp_path):
    mirror, stored = _mirrored(tmp_path)
    experiment = tmp_path / "driver" / SWEEP
    assert restore_mirror(mirror, experiment, SWEEP, KEY.encode()) == stored
    assert read_snapshot(experiment) == _state()
    assert sorted(_manifest(mirror)["files"]) == sorted(_state())
    everything = b"".join(location.read_bytes() for location in mirror.parent.files())
    assert KEY.encode() not in everything and len(mirror.join(OBJECTS).files()) == len(_state())


def _changed_file(mirror, tmp_path):
    digest = _manifest(mirror)["files"]["tuner.pkl"]["sha256"]
    mirror.join(OBJECTS, digest).write_bytes(pickle.dumps(_Plant(tmp_path / "pwned")))


def _flipped_byte(mirror, tmp_path):
    target = mirror.join(OBJECTS, _manifest(mirror)["files"]["trainable.pkl"]["sha256"])
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the same size: only its hash tells


def _added_entry(mirror, tmp_path):
    document = _manifest(mirror)
    data = pickle.dumps(_Plant(tmp_path / "pwned"))
    document["files"]["error.pkl"] = {"sha256": _plant_object(mirror, data), "bytes": len(data)}
    mirror.join(MANIFEST).write_bytes(json.dumps(document).encode())


def _removed_entry(mirror, tmp_path):
    document = _manifest(mirror)
    del document["files"]["experiment_state-2026-01-01_00-00-00.json"]
    mirror.join(MANIFEST).write_bytes(json.dumps(document).encode())


def _removed_object(mirror, tmp_path):
    digest = _manifest(mirror)["files"]["trainable.pkl"]["sha256"]
    mirror.join(OBJECTS, digest).fs.delete_file(mirror.join(OBJECTS, digest).path)


def _forged(mirror, tmp_path):
    """Whoever writes the prefix, without the key: a well-formed manifest for a planted tuner.pkl, signed with
    another key."""
    files = {**_state(), "tuner.pkl": pickle.dumps(_Plant(tmp_path / "pwned"))}
    _plant_object(mirror, files["tuner.pkl"])
    mirror.join(MANIFEST).write_bytes(signed_manifest(SWEEP, files, OTHER_KEY.encode()))


def _unsigned(mirror, tmp_path):
    document = _manifest(mirror)
    del document["signature"]
    mirror.join(MANIFEST).write_bytes(json.dumps(document).encode())


def _another_sweeps(mirror, tmp_path):
    """A genuine manifest, signed with this key, of another sweep: not this sweep's state."""
    mirror.join(MANIFEST).write_bytes(signed_manifest("t-tune-ffffffff", _state(), KEY.encode()))


TAMPERED = [
    _changed_file,
    _flipped_byte,
    _added_entry,
    _removed_entry,
    _removed_object,
    _forged,
    _unsigned,
    _another_sweeps,
]


@pytest.mark.parametrize("tamper", TAMPERED)
def test_state_the_job_did_not_sign_is_refused_and_nothing_is_written(tmp_path, tamper):
    mirror, _ = _mirrored(tmp_path)
    tamper(mirror, tmp_path)
    experiment = tmp_path / "driver" / SWEEP
    with pytest.raises(TuneStateRejected, match="remove that prefix") as refused:
        restore_mirror(mirror, experiment, SWEEP, KEY.encode())
    assert mirror.uri in str(refused.value) and KEY_ENV in str(refused.value)
    assert not experiment.exists() and not list(experiment.parent.glob("*"))
    assert not (tmp_path / "pwned").exists()


def test_without_the_key_a_mirror_is_refused_and_a_short_key_is_an_error(tmp_path):
    mirror, _ = _mirrored(tmp_path)
    with pytest.raises(TuneStateRejected, match=f"{KEY_ENV} is not set"):
        verified_files(mirror, SWEEP, None)
    assert state_key({}) is None and state_key({KEY_ENV: ""}) is None
    assert state_key({KEY_ENV: KEY}) == KEY.encode()
    with pytest.raises(TuneStateError, match="openssl rand"):
        state_key({KEY_ENV: "short"})


def test_a_file_the_manifest_does_not_name_is_never_restored(tmp_path):
    mirror, _ = _mirrored(tmp_path)
    _plant_object(mirror, pickle.dumps(_Plant(tmp_path / "pwned")))
    experiment = tmp_path / "driver" / SWEEP
    restore_mirror(mirror, experiment, SWEEP, KEY.encode())
    assert read_snapshot(experiment) == _state()


def test_an_interrupted_mirror_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from whisper_lora.storage import Location

    mirror, stored = _mirrored(tmp_path)
    newer = {**_state(), "tuner.pkl": pickle.dumps({"tuner": "newer"})}

    def interrupted(self, data):
        raise OSError("driver lost")

    with monkeypatch.context() as patch:
        patch.setattr(Location, "replace_with", interrupted)
        with pytest.raises(OSError):
            write_mirror(mirror, SWEEP, newer, KEY.encode(), stored)
    assert verified_files(mirror, SWEEP, KEY.encode()) == _state()  # the new object is there, unnamed
    now = write_mirror(mirror, SWEEP, newer, KEY.encode(), stored)
    assert verified_files(mirror, SWEEP, KEY.encode()) == newer
    assert {object.name for object in mirror.join(OBJECTS).files()} == now  # the old tuner.pkl is gone


def test_a_torn_read_is_no_snapshot(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"12")
    real = Path.read_bytes

    def growing(self):
        data = real(self)
        self.write_bytes(data + b"3")  # Tune's background sync writing the file meanwhile
        return data

    assert read_snapshot(tmp_path) == {"a": b"12"} and read_snapshot(tmp_path / "none") == {}
    monkeypatch.setattr(Path, "read_bytes", growing)
    assert read_snapshot(tmp_path) is None


def test_a_mirror_on_s3_verifies_as_on_a_filesystem(tmp_path, s3_endpoint):
    options = StorageOptions(s3_endpoint=s3_endpoint)
    mirror = open_location(f"s3://models/ray/{SWEEP}/{MIRROR_DIR}", options)
    stored = write_mirror(mirror, SWEEP, _state(), KEY.encode(), set())
    assert restore_mirror(mirror, tmp_path / SWEEP, SWEEP, KEY.encode()) == stored
    assert read_snapshot(tmp_path / SWEEP) == _state()
    _flipped_byte(mirror, tmp_path)
    with pytest.raises(TuneStateRejected, match=r"trainable\.pkl does not match its signed sha256"):
        verified_files(mirror, SWEEP, KEY.encode())


# --- the job's path: the sweep and the CLI ------------------------------------------------------------------------


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.source.path={tmp_path}", f"output_dir={tmp_path}/runs",
                              f"train.storage_path={tmp_path}/ray", "data.languages=hi", *overrides])  # fmt: skip


def _plant_tuner(tmp_path: Path, config, marker: Path) -> None:
    """The sweep's genuine mirror, then a tuner.pkl that runs code planted in it (its manifest entry changed, the
    signature kept) and, for an older layout, where Tune's state used to be."""
    from whisper_lora.tune.sweep import sweep_name

    name = sweep_name(config)
    prefix = open_location(config.train.storage_path).join(name)
    write_mirror(prefix.join(MIRROR_DIR), name, _state(), KEY.encode(), set())
    planted = pickle.dumps(_Plant(marker))
    document = json.loads(prefix.join(MIRROR_DIR, MANIFEST).read_bytes())
    document["files"]["tuner.pkl"] = {"sha256": _plant_object(prefix.join(MIRROR_DIR), planted), "bytes": len(planted)}
    prefix.join(MIRROR_DIR, MANIFEST).write_bytes(json.dumps(document).encode())
    prefix.join("tuner.pkl").write_bytes(planted)


def test_a_planted_tuner_pkl_is_refused_by_the_sweep_and_never_runs(tmp_path, monkeypatch):
    from whisper_lora.tune.sweep import run_sweep, state_dir, sweep_name

    monkeypatch.setenv(KEY_ENV, KEY)
    config = _config(tmp_path).with_absolute_paths()
    marker = tmp_path / "pwned"
    _plant_tuner(tmp_path, config, marker)
    with pytest.raises(TuneStateRejected, match=f"{sweep_name(config)}/{MIRROR_DIR}"):
        run_sweep(config, gpu=False)  # refused before Ray: had it been loaded, Tune would unpickle tuner.pkl
    assert not marker.exists() and not (state_dir(config) / sweep_name(config)).exists()
    pickle.loads(pickle.dumps(_Plant(tmp_path / "control")))
    assert (tmp_path / "control").read_text() == "ran"  # the planted kind of pickle does run when loaded


def test_the_cli_says_why_and_exits_2(tmp_path, monkeypatch, capsys):
    import whisper_lora.job
    from whisper_lora.cli import main
    from whisper_lora.tune.sweep import run_sweep

    monkeypatch.delenv(KEY_ENV, raising=False)
    marker = tmp_path / "pwned"
    _plant_tuner(tmp_path, _config(tmp_path), marker)
    monkeypatch.setattr(whisper_lora.job, "tune_languages", lambda config: run_sweep(config, gpu=False))
    overrides = [f"data.source.path={tmp_path}", f"output_dir={tmp_path}/runs", f"train.storage_path={tmp_path}/ray",
                 "data.languages=hi"]  # fmt: skip
    assert main(["tune", *overrides]) == 2
    error = capsys.readouterr().err
    assert error.startswith("whisper-lora: ") and f"{KEY_ENV} is not set" in error and "remove that prefix" in error
    assert not marker.exists()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_unsigned_state_of_the_older_layout_is_not_loaded(tmp_path, monkeypatch):
    from whisper_lora.tune import sweep
    from whisper_lora.tune.sweep import prepare_state, sweep_name

    monkeypatch.delenv(KEY_ENV, raising=False)
    config = _config(tmp_path).with_absolute_paths()
    marker = tmp_path / "pwned"
    open_location(config.train.storage_path).join(sweep_name(config), "tuner.pkl").write_bytes(
        pickle.dumps(_Plant(marker))
    )
    lines = _Lines()
    monkeypatch.setattr(sweep.log, "level", logging.INFO)
    sweep.log.addHandler(lines)
    try:
        assert prepare_state(config, sweep_name(config)) == (False, None)  # a new sweep, without a mirror
    finally:
        sweep.log.removeHandler(lines)
    said = "\n".join(lines.lines)
    assert "unsigned Tune state of an earlier version" in said and f"{KEY_ENV} is not set" in said
    assert "a resume needs this disk" in said and not marker.exists()


def test_the_mirror_callback_keeps_no_key(tmp_path, monkeypatch):
    from whisper_lora.tune.sweep import prepare_state, state_dir, sweep_name

    monkeypatch.setenv(KEY_ENV, KEY)
    config = _config(tmp_path).with_absolute_paths()
    name = sweep_name(config)
    resume, callback = prepare_state(config, name)
    assert not resume and KEY.encode() not in pickle.dumps(callback)  # Tune pickles it into tuner.pkl
    for relative, data in _state().items():
        (state_dir(config) / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (state_dir(config) / name / relative).write_bytes(data)
    callback.on_experiment_end(trials=[])
    mirror = open_location(config.train.storage_path).join(name, MIRROR_DIR)
    assert verified_files(mirror, name, KEY.encode()) == _state()
    assert prepare_state(config, name)[0]  # the driver's own state: resumed as it is


# --- (Ray) a real sweep, its mirror, and a driver without its disk -----------------------------------------------


def _checkpoints(storage: Path) -> dict[str, list[str]]:
    return {run.name: sorted(c.name for c in run.glob("checkpoint_*")) for run in storage.glob("*-train-trial_id=*")}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_driver_that_lost_its_disk_resumes_the_sweep_from_its_signed_mirror(two_worker_corpus, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    from whisper_lora.tune.sweep import outcomes_of, run_sweep, sweep_name

    monkeypatch.setenv(KEY_ENV, KEY)
    overrides = [*two_worker_corpus, "train.num_workers=1", "train.max_steps=2", "train.eval_every_steps=2",
                 "train.eval_each_epoch=false", "tune.ranks=2"]  # fmt: skip
    first_driver = load_config(None, [*overrides, f"tune.state_dir={tmp_path}/a"]).with_absolute_paths()
    first = run_sweep(first_driver, gpu=False)
    name, storage = sweep_name(first_driver), Path(first_driver.train.storage_path)
    mirror = open_location(str(storage / name / MIRROR_DIR))
    mirrored = verified_files(mirror, name, KEY.encode())
    assert "tuner.pkl" in mirrored and any(path.startswith("experiment_state-") for path in mirrored)
    assert all(KEY.encode() not in data for data in mirrored.values())
    assert not list(storage.glob(f"{name}/*.pkl"))  # Tune wrote nothing of its own beside the checkpoints
    before = _checkpoints(storage)
    assert len(before) == 1 and all(before.values())

    second_driver = load_config(None, [*overrides, f"tune.state_dir={tmp_path}/b"]).with_absolute_paths()
    assert sweep_name(second_driver) == name
    second = run_sweep(second_driver, gpu=False)
    assert (tmp_path / "b" / name / "tuner.pkl").is_file()
    assert _checkpoints(storage) == before  # the finished trial was not trained again
    assert [Path(r.path).name for r in second] == [Path(r.path).name for r in first] and not second.errors
    [outcome] = outcomes_of(second, open_location(str(storage)))
    assert outcome.checkpoint and not outcome.failed

    object_of_tuner = mirror.join(OBJECTS, _manifest(mirror)["files"]["tuner.pkl"]["sha256"])
    object_of_tuner.write_bytes(object_of_tuner.read_bytes() + b"\0")
    third_driver = load_config(None, [*overrides, f"tune.state_dir={tmp_path}/c"]).with_absolute_paths()
    with pytest.raises(TuneStateRejected, match=r"tuner\.pkl (does not match|is missing)"):
        run_sweep(third_driver, gpu=False)
    assert not (tmp_path / "c" / name).exists()
