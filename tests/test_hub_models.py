"""A Hugging Face id reaches every node: resolved once into ``model.cache_dir`` (a volume every node mounts), with its
commit recorded, and resolved again from there when the driver's HF cache and the hub are gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from tests.builders import sha256
from whisper_lora.config import ModelConfig
from whisper_lora.models.resolve import ModelMismatch, ModelNotFound, resolve_base_model, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def hf_cache(root: Path, repo_id: str, model_dir: str, commits: dict[str, str]) -> Path:
    """An HF hub cache as ``snapshot_download`` leaves it: blobs, ``snapshots/<commit>/`` of symlinks to them and
    ``refs/<name>`` naming a commit (``commits``: ref name → commit)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for name, commit in commits.items():
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for source in Path(model_dir).iterdir():
            if source.is_file():
                blob = repo / "blobs" / sha256(source)
                blob.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, blob)
                (snapshot / source.name).symlink_to(blob)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / name).write_text(commit)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an HF cache under tmp_path (huggingface_hub reads both at import: patched there)."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_is_copied_into_cache_dir_once_and_resolves_there_without_the_hf_cache(offline_hub, tiny_model_dir,
                                                                                         tmp_path):  # fmt: skip
    hf_cache(offline_hub, "org/whisper-tiny", tiny_model_dir, {"main": COMMIT})
    shared = tmp_path / "shared-models"
    first = resolve_base_model("org/whisper-tiny", shared)
    path = Path(first.path)
    assert path == (shared / "hub" / "org--whisper-tiny" / COMMIT).resolve()
    assert (first.spec, first.revision) == ("org/whisper-tiny", COMMIT)
    assert not any(p.is_symlink() for p in path.iterdir())  # files, not links into the driver's HF cache
    weights = sorted(Path(tiny_model_dir).glob("*.safetensors"))
    assert first.sha256 == sha256(b"".join(p.read_bytes() for p in weights))  # what the local directory hashes to
    assert first.sha256 == resolve_base_model(tiny_model_dir, shared).sha256

    shutil.rmtree(offline_hub)  # the node-local HF cache is gone (another node): cache_dir alone answers
    again = resolve_base_model("org/whisper-tiny", shared)
    assert again == first
    assert resolve_model(ModelConfig(base="org/whisper-tiny", cache_dir=shared)) == first
    with pytest.raises(ModelMismatch):
        resolve_base_model("org/whisper-tiny", shared, expected_sha256="0" * 64)


def test_a_revision_pin_picks_its_commit_and_a_pinned_commit_needs_nothing_but_cache_dir(offline_hub, tiny_model_dir,
                                                                                        tmp_path):  # fmt: skip
    hf_cache(offline_hub, "org/whisper-tiny", tiny_model_dir, {"main": COMMIT, "v2": OTHER})
    shared = tmp_path / "shared-models"
    tagged = resolve_model(ModelConfig(base="org/whisper-tiny", cache_dir=shared, revision="v2"))
    assert tagged.revision == OTHER and Path(tagged.path).name == OTHER
    assert (shared / "hub" / "org--whisper-tiny" / "refs" / "v2").read_text() == OTHER
    assert resolve_base_model("org/whisper-tiny", shared).revision == COMMIT

    shutil.rmtree(offline_hub)
    assert resolve_base_model("org/whisper-tiny", shared, revision=OTHER) == tagged
    assert resolve_base_model("org/whisper-tiny", shared, revision="v2") == tagged
    with pytest.raises(ModelNotFound, match="no copy"):
        resolve_base_model("org/whisper-tiny", shared, revision="v3")


def test_a_damaged_shared_copy_is_copied_again_and_bad_ids_are_refused(offline_hub, tiny_model_dir, tmp_path):
    hf_cache(offline_hub, "org/whisper-tiny", tiny_model_dir, {"main": COMMIT})
    shared = tmp_path / "shared-models"
    first = resolve_base_model("org/whisper-tiny", shared)
    weights = next(Path(first.path).glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-8])  # half-written or tampered with
    assert resolve_base_model("org/whisper-tiny", shared) == first
    assert weights.read_bytes() == original
    for spec in ("../etc", "org/../x", "org/a/b", "org--x/y"):
        with pytest.raises(ModelNotFound):
            resolve_base_model(spec, shared)
    with pytest.raises(ModelNotFound, match="not a hub revision"):
        resolve_base_model("org/whisper-tiny", shared, revision="../main")
