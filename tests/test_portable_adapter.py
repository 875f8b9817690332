"""A published adapter stands alone: its adapter_config.json names the recorded base, its README.md is peft's
model card with Hugging Face metadata, the manifest hashes the card, and the README's plain transformers + peft
snippet runs on it and transcribes as whisper-lora's own decoding does."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.builders import ZERO_SHOT, outcome, random_adapters, sha256, write_clip
from whisper_lora.manifest import BaseModelRecord, Scores, SelectedAdapter
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.portable import portable_config
from whisper_lora.publish import Upload, publish_selection
from whisper_lora.storage import open_location
from whisper_lora.tune.select import selected_adapter

README = Path(__file__).resolve().parent.parent / "README.md"
TEST = Scores(primary=0.35, wer=0.35, cer=0.125, raw_wer=0.4)
NEW_TOKENS = 12
"""The random tiny model never ends a transcript: its generation config caps it (``max_length``)."""


@pytest.fixture(scope="module")
def published(tiny_model_dir, tmp_path_factory):
    """A Hindi adapter published with test scores (where the manifest has them); returns (manifest, entry)."""
    root = tmp_path_factory.mktemp("portable")
    base_dir = root / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    generation = json.loads((base_dir / "generation_config.json").read_text())
    # Whisper's generate counts max_length in new tokens (the forced prompt is added to it and stripped)
    (base_dir / "generation_config.json").write_text(json.dumps({**generation, "max_length": NEW_TOKENS}))
    checkpoint = random_adapters(str(base_dir), root / "checkpoints", ["a"])["a"]
    resolved = resolve_base_model(str(base_dir), root / "models")
    base = BaseModelRecord(id=resolved.spec, sha256=resolved.sha256)
    trial = outcome("t-1", "hi", 2, 0.4, checkpoint=checkpoint)
    selected = selected_adapter(trial, ZERO_SHOT, "dev", ["q_proj", "v_proj"], base.sha256)
    if "test" in SelectedAdapter.model_fields:
        selected = selected.model_copy(update={"test": TEST})
    manifest = publish_selection(open_location(str(root / "shared" / "pub")), base, [Upload(selected,
                                 open_location(checkpoint))], [trial.summary()])  # fmt: skip
    return manifest, manifest.languages["hi"]


def test_the_published_config_names_the_recorded_base_and_the_card_carries_metadata(published):
    manifest, entry = published
    base_dir = manifest.base_model.id
    directory = Path(entry.adapter)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir and base_dir.endswith("/base")
    assert config["revision"] is None and config["peft_type"] == "LORA" and config["r"] == 2
    assert sha256(directory / "adapter_config.json") == entry.files["adapter_config.json"].sha256

    card = (directory / "README.md").read_text()
    assert entry.card is not None and entry.card.sha256 == sha256(directory / "README.md")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["language"] == ["hi"] and front["base_model"] == base_dir
    assert front["library_name"] == "peft" and {"whisper", "lora"} <= set(front["tags"])
    results = {m["name"]: m["value"] for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert results["dev WER"] == 0.4 and results["dev CER"] == 0.2
    if "test" in SelectedAdapter.model_fields:
        assert results["test WER"] == 0.35 and results["test CER"] == 0.125
    assert 'language="hi"' in card


def test_a_hub_base_is_named_with_its_revision():
    raw = json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/tmp/worker/model", "revision": None})
    base = BaseModelRecord(id="openai/whisper-base", sha256="0" * 64, revision="e7a6b1c")
    config = json.loads(portable_config(raw.encode(), base))
    assert (config["base_model_name_or_path"], config["revision"]) == ("openai/whisper-base", "e7a6b1c")
    with pytest.raises(ValueError, match="not a peft adapter config"):
        portable_config(b"[1, 2]", base)


def readme_snippet() -> str:
    """The plain transformers + peft snippet of the README's "Export and use your adapter" section."""
    section = README.read_text().split("## Export and use your adapter", 1)[1].split("\n## ", 1)[0]
    [snippet] = re.findall(r"```python\n(.*?)```", section, re.S)
    return snippet


def test_the_readme_snippet_runs_on_a_published_adapter_as_whisper_lora_decodes(published, tmp_path):
    from transformers import WhisperTokenizer

    from whisper_lora.data.audio import load_audio
    from whisper_lora.data.collate import stack_features
    from whisper_lora.data.features import Featurizer
    from whisper_lora.evaluate import greedy_transcripts
    from whisper_lora.models.inference import load_for_inference

    manifest, entry = published
    base_dir = manifest.base_model.id
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) <= 10
    clip = write_clip(tmp_path / "clip.wav", 1.5, rate=16_000, fmt="WAV")
    code = snippet.replace('"openai/whisper-base"', repr(base_dir))
    code = code.replace('"artifacts/published/demo/adapters/hi/<name>"', repr(entry.adapter))
    code = code.replace('"clip.wav"', repr(str(clip)))
    assert code.count(repr(base_dir)) == 1 and code.count(repr(entry.adapter)) == 1 and repr(str(clip)) in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    [text] = ast.literal_eval(printed.getvalue())  # the snippet prints one transcript in a list
    model = load_for_inference(base_dir, entry.adapter, torch.device("cpu"))
    features = Featurizer(base_dir).log_mel(load_audio(str(clip)))
    inputs = {"input_features": stack_features([np.asarray(features)])}
    [expected] = greedy_transcripts(model, WhisperTokenizer.from_pretrained(base_dir), inputs, "hi", NEW_TOKENS)
    assert text.strip() == expected and expected
