"""Publishing without a sweep: adapters saved from the tiny model, to a directory and to S3 on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import ZERO_SHOT, failed, outcome, random_adapters, sha256, write_clip
from whisper_lora.config import load_config
from whisper_lora.manifest import MANIFEST, BaseModelRecord, adapter_files, read_manifest
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.publish import Upload, publish_selection
from whisper_lora.report import report_files
from whisper_lora.storage import Location, StorageOptions, open_location
from whisper_lora.transcribe import PublishedAdapterError, find_entry
from whisper_lora.tune.select import TrialOutcome, selected_adapter


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """Checkpoint directories (``<name>/adapter/``) with different LoRA weights."""
    return random_adapters(tiny_model_dir, tmp_path_factory.mktemp("checkpoints"), ["good", "worse"])


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> BaseModelRecord:
    resolved = resolve_base_model(tiny_model_dir, Path(tiny_model_dir) / "cache")
    return BaseModelRecord(id=resolved.spec, sha256=resolved.sha256)


def uploads(base: BaseModelRecord, *trials: TrialOutcome) -> list[Upload]:
    return [
        Upload(selected_adapter(t, ZERO_SHOT, "dev", ["q_proj", "v_proj"], base.sha256), open_location(t.checkpoint))
        for t in trials
    ]


def test_interrupted_publish_keeps_the_previous_manifest_and_worse_adapters_do_not_replace_better(
    checkpoints, base, tmp_path, monkeypatch
):
    experiment = open_location(str(tmp_path / "shared")).join("pub")
    good = outcome("t-good", "hi", 2, 0.40, checkpoint=checkpoints["good"])
    first = publish_selection(experiment, base, uploads(base, good), [good.summary()])

    better = outcome("t-better", "hi", 2, 0.30, checkpoint=checkpoints["worse"])
    _interrupt_manifest(monkeypatch)
    with pytest.raises(OSError, match="preempted"):
        publish_selection(experiment, base, uploads(base, better), [better.summary()])
    monkeypatch.undo()
    assert read_manifest(experiment) == first  # the reader still sees the old, complete state
    entry = first.languages["hi"]
    for name, recorded in entry.files.items():
        assert sha256(Path(entry.adapter) / name) == recorded.sha256

    worse = outcome("t-worse", "hi", 2, 0.55, checkpoint=checkpoints["worse"])
    again = publish_selection(experiment, base, uploads(base, worse), [worse.summary()])
    assert again.languages["hi"].trial_id == "t-good"
    assert "kept the published adapter" in again.kept_previous[0]


def test_attachments_are_rendered_from_the_manifest_and_written_before_it(checkpoints, base, tmp_path):
    experiment = open_location(str(tmp_path / "shared")).join("pub")
    good = outcome("t-good", "hi", 2, 0.40, checkpoint=checkpoints["good"])
    seen = []

    def attachments(manifest):
        seen.append(manifest)
        assert not experiment.join(MANIFEST).exists()
        return {"report.md": f"{sorted(manifest.languages)}".encode()}

    manifest = publish_selection(experiment, base, uploads(base, good), [good.summary()], attachments)
    assert seen == [manifest]
    assert (tmp_path / "shared" / "pub" / "report.md").read_text() == "['hi']"


def test_publish_to_s3_served_on_loopback(checkpoints, base, s3_endpoint, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-not-logged")
    options = StorageOptions(s3_endpoint=s3_endpoint)  # the endpoint in the config only, not in the environment
    experiment = open_location("s3://models/whisper", options).join("pub")
    good = outcome("t-s3", "hi", 2, 0.4, checkpoint=checkpoints["good"])
    manifest = publish_selection(experiment, base, uploads(base, good), [good.summary()])
    entry = manifest.languages["hi"]
    assert entry.adapter.startswith("s3://models/whisper/pub/adapters/hi/t-s3-")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    stored = s3.get_object(Bucket="models", Key="whisper/pub/manifest.json")["Body"].read()
    assert json.loads(stored) == json.loads(manifest.to_json())
    key = entry.adapter.removeprefix("s3://models/") + "/adapter_model.safetensors"
    body = s3.get_object(Bucket="models", Key=key)["Body"].read()
    assert sha256(body) == entry.files["adapter_model.safetensors"].sha256
    assert "test-secret-not-logged" not in stored.decode()
    found_manifest, found = find_entry(open_location(entry.adapter, options))
    assert found.language == "hi" and found_manifest == manifest


def test_an_adapter_without_a_manifest_is_a_clear_error(tmp_path):
    adapter = tmp_path / "exp" / "adapters" / "hi" / "t-0123"
    adapter.mkdir(parents=True)
    with pytest.raises(PublishedAdapterError, match=r"no manifest\.json"):
        find_entry(open_location(str(adapter)))
    with pytest.raises(PublishedAdapterError, match="not a published adapter"):
        find_entry(open_location(str(tmp_path)))


# --- interrupted at each step: the previous manifest stays valid, the rerun completes -------------------------


def _interrupt_copy_midway(monkeypatch):
    def half_copy(self, target):
        target.write_bytes(b"partial")
        raise OSError("preempted during the adapter upload")

    monkeypatch.setattr(Location, "copy_to", half_copy)


def _interrupt_second_language(monkeypatch):
    import whisper_lora.publish as publish

    calls, upload = [], publish.publish_adapter

    def one_then_fail(*args):
        calls.append(args)
        if len(calls) > 1:
            raise OSError("preempted between two languages' uploads")
        upload(*args)

    monkeypatch.setattr(publish, "publish_adapter", one_then_fail)


def _interrupt_manifest(monkeypatch):
    replace = Location.replace_with

    def fail_on_manifest(self, data):
        if self.name == MANIFEST:
            raise OSError("preempted before the manifest write")
        replace(self, data)

    monkeypatch.setattr(Location, "replace_with", fail_on_manifest)


def _failing_report(manifest):
    raise OSError("preempted while writing the report")


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("interrupt", "attachments"),
    [
        (_interrupt_copy_midway, report_files),
        (_interrupt_second_language, report_files),
        (lambda monkeypatch: None, _failing_report),
        (_interrupt_manifest, report_files),
    ],
    ids=["during-adapter-upload", "between-languages", "after-adapters-before-report", "before-manifest"],
)
def test_publish_interrupted_at_each_step_leaves_the_previous_manifest_valid(
    interrupt, attachments, base, tiny_model_dir, tmp_path, monkeypatch
):
    checkpoints = random_adapters(tiny_model_dir, tmp_path / "checkpoints", ["a", "b", "c", "d"])
    experiment = open_location(str(tmp_path / "shared")).join("pub")
    first = [outcome("hi-1", "hi", 2, 0.5, checkpoint=checkpoints["a"]), outcome("ta-1", "ta", 2, 0.5,
             checkpoint=checkpoints["b"])]  # fmt: skip
    published = publish_selection(experiment, base, uploads(base, *first), [t.summary() for t in first], report_files)
    files_before = _tree(tmp_path / "shared" / "pub" / "adapters")

    better = [outcome("hi-2", "hi", 2, 0.3, checkpoint=checkpoints["c"]), outcome("ta-2", "ta", 2, 0.3,
              checkpoint=checkpoints["d"])]  # fmt: skip
    interrupt(monkeypatch)
    with pytest.raises(OSError, match="preempted"):
        publish_selection(experiment, base, uploads(base, *better), [t.summary() for t in better], attachments)
    monkeypatch.undo()

    assert read_manifest(experiment) == published  # readers still see the previous, complete state
    for entry in published.languages.values():
        assert adapter_files(open_location(entry.adapter)) == entry.files
    assert all(_tree(tmp_path / "shared" / "pub" / "adapters")[path] == data for path, data in files_before.items())

    again = publish_selection(experiment, base, uploads(base, *better), [t.summary() for t in better], report_files)
    assert {entry.trial_id for entry in again.languages.values()} == {"hi-2", "ta-2"}  # the rerun completes it
    for entry in again.languages.values():
        assert adapter_files(open_location(entry.adapter)) == entry.files


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.mark.reliability
def test_credentials_from_the_environment_never_reach_logs_reports_or_manifests(
    checkpoints, base, tmp_path, monkeypatch, caplog
):
    secrets = {"HF_TOKEN": "hf_secret_token_123", "AWS_SECRET_ACCESS_KEY": "aws-secret-456"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    trials = [outcome("hi-1", "hi", 2, 0.5, checkpoint=checkpoints["good"]), failed("hi-2", "hi", 4)]
    with caplog.at_level("DEBUG"):
        publish_selection(
            open_location(str(tmp_path / "shared")).join("sec"),
            base,
            uploads(base, trials[0]),
            [t.summary() for t in trials],
            report_files,
        )
    written = "\n".join(path.read_text(errors="replace") for path in (tmp_path / "shared").rglob("*") if path.is_file())
    for value in secrets.values():
        assert value not in written and value not in caplog.text
    dumped = load_config(None, [f"data.source.path={tmp_path}"]).model_dump_json()
    assert all(value not in dumped for value in secrets.values())


# --- trust: what a downstream job loads is what the manifest names ---------------------------------------------


@pytest.fixture
def published_hi(checkpoints, base, tmp_path) -> str:
    experiment = open_location(str(tmp_path / "shared")).join("pub")
    good = outcome("t-good", "hi", 2, 0.40, checkpoint=checkpoints["good"])
    return publish_selection(experiment, base, uploads(base, good), [good.summary()]).languages["hi"].adapter


@pytest.mark.reliability
def test_an_adapter_swapped_after_its_check_is_not_what_gets_loaded(published_hi, tiny_model_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    import whisper_lora.transcribe as transcribe

    clip = write_clip(tmp_path / "a.wav", 1.0, rate=16_000, fmt="WAV")
    weights = Path(published_hi) / "adapter_model.safetensors"
    recorded = sha256(weights)
    copy, loaded, load = Location.copy_to, [], transcribe.load_for_inference

    def copy_then_swap(self, target):  # the published file changes once it has been read
        copy(self, target)
        if self.path == str(weights):
            weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)

    def record_load(base_path, adapter_dir=None, device=None, precision=None):
        loaded.append((adapter_dir, sha256(Path(adapter_dir) / "adapter_model.safetensors")))
        return load(base_path, adapter_dir, device, precision)

    monkeypatch.setattr(Location, "copy_to", copy_then_swap)
    monkeypatch.setattr(transcribe, "load_for_inference", record_load)
    [(_, text)] = transcribe.transcribe_files(published_hi, [str(clip)], tmp_path / "cache")
    [(directory, digest)] = loaded
    assert digest == recorded and not directory.startswith(str(tmp_path / "shared")) and isinstance(text, str)
    assert sha256(weights) != recorded  # it was swapped, after the read that was checked and loaded
    monkeypatch.undo()
    with pytest.raises(PublishedAdapterError, match="do not match the sha256"):  # now the swap is seen
        transcribe.transcribe_files(published_hi, [str(clip)], tmp_path / "cache")


@pytest.mark.reliability
def test_a_base_override_says_so_loudly(published_hi, tiny_model_dir, tmp_path, caplog):
    from whisper_lora.transcribe import transcribe_files

    clip = write_clip(tmp_path / "a.wav", 1.0, rate=16_000, fmt="WAV")
    with caplog.at_level("WARNING"):
        transcribe_files(published_hi, [str(clip)], tmp_path / "cache", base=tiny_model_dir)
    assert "replaces the manifest's base" in caplog.text and "OTHER weights" not in caplog.text


@pytest.mark.reliability
def test_credentials_in_a_uri_and_names_that_climb_are_refused(tmp_path):
    from whisper_lora.config import ConfigError
    from whisper_lora.storage import StorageError

    with pytest.raises(StorageError, match="credentials") as refused:
        open_location("s3://AKIAEXAMPLE:very-secret@bucket/prefix")
    assert "very-secret" not in str(refused.value)
    for override in ("publish.storage=s3://AKIA:very-secret@b/p", "train.storage_path=gs://user@b/p"):
        with pytest.raises(ConfigError, match="credentials") as refused:
            load_config(None, [f"data.source.path={tmp_path}", override])
        assert "very-secret" not in str(refused.value)
    for name in ("..", ".", "a/b"):
        with pytest.raises(ConfigError, match="experiment"):
            load_config(None, [f"data.source.path={tmp_path}", f"experiment={name}"])


def _publish_slowly_then_quickly(checkpoints, base, experiment, monkeypatch) -> list:
    """Publisher A (hi) reads the manifest, then takes a second over its upload; publisher B (ta) publishes in
    that second. Returns both results."""
    import threading
    import time

    import whisper_lora.publish as publish

    upload = publish.publish_adapter

    def slow_for_hi(source, target, files):
        if "/hi/" in target.uri:
            time.sleep(1.0)
        upload(source, target, files)

    monkeypatch.setattr(publish, "publish_adapter", slow_for_hi)
    hindi = outcome("t-hi", "hi", 2, 0.4, checkpoint=checkpoints["good"])
    tamil = outcome("t-ta", "ta", 2, 0.2, checkpoint=checkpoints["worse"])
    results = {}
    first = threading.Thread(target=lambda: results.setdefault(
        "hi", publish_selection(experiment, base, uploads(base, hindi), [hindi.summary()])))  # fmt: skip
    first.start()
    time.sleep(0.3)
    results["ta"] = publish_selection(experiment, base, uploads(base, tamil), [tamil.summary()])
    first.join()
    return [results["hi"], results["ta"]]


@pytest.mark.reliability
def test_two_publishers_to_one_directory_keep_both_languages(checkpoints, base, tmp_path, monkeypatch):
    experiment = open_location(str(tmp_path / "shared")).join("pub")
    _publish_slowly_then_quickly(checkpoints, base, experiment, monkeypatch)
    assert sorted(read_manifest(experiment).languages) == ["hi", "ta"]


@pytest.mark.reliability
def test_two_publishers_to_one_s3_prefix_keep_both_languages(checkpoints, base, s3_endpoint, monkeypatch):
    experiment = open_location("s3://models/whisper", StorageOptions(s3_endpoint=s3_endpoint)).join("pub")
    _publish_slowly_then_quickly(checkpoints, base, experiment, monkeypatch)
    assert sorted(read_manifest(experiment).languages) == ["hi", "ta"]
