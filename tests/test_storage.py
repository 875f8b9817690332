"""One storage layer: local paths and S3 (moto on loopback) read and written the same way, with the endpoint
taken from the config's ``storage`` section by every reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.builders import write_clip, write_common_voice
from whisper_lora.config import load_config
from whisper_lora.data.audio import load_audio
from whisper_lora.data.sources import read_source
from whisper_lora.storage import StorageOptions, absolute, expand, is_remote, open_location


def test_local_locations_are_absolute_and_join_like_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = open_location("shared/")
    assert root.uri == root.path == str(tmp_path / "shared") and root.is_local
    adapter = root.join("exp", "adapters/hi", "t-1")
    assert adapter.uri == str(tmp_path / "shared/exp/adapters/hi/t-1")
    assert (adapter.name, adapter.parent.parent.name) == ("t-1", "adapters")
    assert root.within(adapter.path) == adapter
    assert not is_remote("/data/x") and not is_remote("file:///data/x") and is_remote("s3://b/k")
    assert absolute("s3://b/k") == "s3://b/k" and absolute("x") == str(tmp_path / "x")


def test_replace_is_all_or_nothing_and_leaves_no_temporary_files(tmp_path):
    target = open_location(str(tmp_path)).join("exp", "manifest.json")
    target.replace_with(b'{"v": 1}')
    target.replace_with(b'{"v": 2}')
    assert target.read_json() == {"v": 2}
    assert [path.name for path in (tmp_path / "exp").iterdir()] == ["manifest.json"]
    assert target.parent.join("missing.json").read_json() is None


def test_expand_takes_a_file_a_directory_or_a_glob(tmp_path):
    for name in ("a/x.parquet", "a/y.parquet", "a/b/z.parquet", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = lambda files: [file.path.removeprefix(f"{tmp_path}/") for file in files]  # noqa: E731
    assert names(expand(str(tmp_path / "a/x.parquet"))) == ["a/x.parquet"]
    assert names(expand(str(tmp_path / "a"))) == ["a/b/z.parquet", "a/notes.txt", "a/x.parquet", "a/y.parquet"]
    assert names(expand(str(tmp_path / "a/*.parquet"))) == ["a/b/z.parquet", "a/x.parquet", "a/y.parquet"]
    assert expand(str(tmp_path / "nothing")) == []


def test_memory_uris_go_through_fsspec():
    pytest.importorskip("fsspec")
    location = open_location("memory://bucket/dir").join("f.json")
    location.replace_with(b"[1]")
    assert location.read_json() == [1] and location.uri == "memory://bucket/dir/f.json"
    assert [file.name for file in open_location("memory://bucket").files()] == ["f.json"]


def _upload(tree, s3_endpoint: str, bucket: str = "models") -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in tree.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"corpus/{path.relative_to(tree)}", Body=path.read_bytes())


@pytest.mark.ray
def test_sources_and_audio_on_s3_use_the_configured_endpoint(ray_local, tmp_path, s3_endpoint):
    """The regression this layer fixes: NeMo manifests on s3:// were opened with open(), Common Voice TSVs and
    audio by path had to be local, and only publishing knew the endpoint."""
    clip = write_clip(tmp_path / "local/hi/clips/a.mp3", 1.2)
    write_common_voice(tmp_path / "local", "hi", {"train": [("a.mp3", "एक दो तीन")]})
    (tmp_path / "local/train.jsonl").write_text(
        json.dumps({"audio_filepath": "hi/clips/a.mp3", "text": "एक दो", "language": "hi"}) + "\n", encoding="utf-8"
    )
    _upload(tmp_path / "local", s3_endpoint)
    options = StorageOptions(s3_endpoint=s3_endpoint)

    audio = load_audio(open_location("s3://models/corpus/hi/clips/a.mp3", options))
    assert np.allclose(audio, load_audio(str(clip)))
    missing = open_location("s3://models/corpus/hi/clips/none.mp3", options)
    with pytest.raises(ValueError, match="missing_audio"):
        load_audio(missing)

    for kind, path in (("common_voice", "s3://models/corpus"), ("manifest", "s3://models/corpus/{split}.jsonl")):
        config = load_config(
            None,
            [f"data.source.kind={kind}", f"data.source.path={path}", "data.languages=hi",
             f"storage.s3_endpoint={s3_endpoint}"],
        )  # fmt: skip
        [row] = read_source(config.data, ["train"], config.storage).take_all()
        assert row["audio_path"] == "s3://models/corpus/hi/clips/a.mp3", kind
        assert np.allclose(load_audio(open_location(row["audio_path"], config.storage)), audio)


def test_a_corpus_rebuilt_at_the_same_path_has_another_fingerprint(tmp_path, s3_endpoint):
    from whisper_lora.data.sources import source_fingerprint

    def corpus(root, sentence: str, seconds: float) -> None:
        write_clip(root / "hi" / "clips" / "a.mp3", seconds)
        write_common_voice(root, "hi", {"train": [("a.mp3", sentence)], "dev": [], "test": []})

    corpus(tmp_path / "local", "एक दो", 1.0)
    config = load_config(None, [f"data.source.path={tmp_path}/local", "data.languages=hi"])
    fingerprint = source_fingerprint(config.data, ["train", "dev"])
    assert source_fingerprint(config.data, ["train", "dev"]) == fingerprint  # nothing changed
    other_language = load_config(None, [f"data.source.path={tmp_path}/local", "data.languages=mr"])
    assert source_fingerprint(other_language.data, ["train", "dev"]) != fingerprint
    corpus(tmp_path / "local", "एक दो तीन", 1.5)  # rebuilt: other sentences, other audio
    assert source_fingerprint(config.data, ["train", "dev"]) != fingerprint

    _upload(tmp_path / "local", s3_endpoint)  # s3://models/corpus/hi/...
    remote = load_config(None, ["data.source.path=s3://models/corpus", "data.languages=hi"]).data
    options = StorageOptions(s3_endpoint=s3_endpoint)
    on_s3 = source_fingerprint(remote, ["train"], options)
    assert source_fingerprint(remote, ["train"], options) == on_s3
    corpus(tmp_path / "local", "एक", 2.0)
    _upload(tmp_path / "local", s3_endpoint)
    assert source_fingerprint(remote, ["train"], options) != on_s3
