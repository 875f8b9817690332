"""Import a faster-whisper / CTranslate2 Whisper model into a transformers directory.

CTranslate2's ``model.bin`` (binary version 6, ``ctranslate2/specs/model_spec.py``) is a header, then named
variables (shape, dtype id, raw bytes), then aliases. Its Whisper converter fuses attention projections:
self-attention ``linear_0`` is q|k|v stacked (k's bias is zeros: Whisper's k projection has none),
cross-attention ``linear_0`` is q and ``linear_1`` is k|v. Air-gapped clusters often keep only these models,
so this import is a feature, not a demo shortcut.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

BINARY_VERSION = 6
IMPORTER_VERSION = 2
"""What an import writes; part of the import cache's key, so a change here re-imports cached models.
2: multilingual special ids in ``config.json`` (1 had WhisperConfig's English-only defaults), float32 weights."""
_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
SPECIAL = "<|endoftext|>"
MAX_RANK = 8
"""No Whisper variable has more dimensions; a larger count is a garbled file."""


class CTranslate2FormatError(ValueError):
    """A directory that is not a CTranslate2 Whisper model this importer understands."""


def model_bin_parts(files: dict[str, Path]) -> list[Path]:
    """``model.bin``, or ``model.bin.part1``, ``.part2``, ... in order (models split to fit size limits).

    ``files`` maps file names to paths; the parts may lie in different folders (one per wheel).
    """
    if "model.bin" in files:
        return [files["model.bin"]]
    numbered = {
        int(m.group(1)): path for name, path in files.items() if (m := re.fullmatch(r"model\.bin\.part(\d+)", name))
    }
    if not numbered or sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise CTranslate2FormatError(
            f"need model.bin or model.bin.part1..N without gaps; found parts {sorted(numbered)}"
        )
    return [numbered[index] for index in sorted(numbered)]


def read_variables(data: bytes) -> tuple[str, dict[str, torch.Tensor]]:
    """The spec name and every variable (aliases resolved) of a CTranslate2 ``model.bin``.

    Every count, length, shape and size is checked against the bytes that are there before anything is
    allocated: a truncated or garbled file is one ``CTranslate2FormatError`` naming the variable, never a
    ``struct.error`` or an allocation the header made up.
    """
    offset = 0
    where = "the header"

    def fail(problem: str) -> CTranslate2FormatError:
        return CTranslate2FormatError(f"model.bin: {problem} in {where} (byte {offset} of {len(data)})")

    def take(fmt: str) -> int:
        nonlocal offset
        if offset + struct.calcsize(fmt) > len(data):
            raise fail("file ends")
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal offset
        length = take("H")
        if length == 0 or offset + length > len(data):
            raise fail(f"a name of {length} bytes does not fit")
        try:
            value = data[offset : offset + length - 1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail("a name is not UTF-8") from exc
        offset += length
        return value

    version = take("I")
    if version != BINARY_VERSION:
        raise CTranslate2FormatError(
            f"CTranslate2 binary version {version} is not supported (expected {BINARY_VERSION})"
        )
    spec = text()
    take("I")  # spec revision: the Whisper layout is the same in revisions 2 and 3
    variables: dict[str, torch.Tensor] = {}
    for _ in range(take("I")):
        where = f"variable #{len(variables) + 1}"
        name = text()
        where = f"variable {name!r}"
        rank = take("B")
        if rank > MAX_RANK:
            raise fail(f"rank {rank} (at most {MAX_RANK})")
        shape = [take("I") for _ in range(rank)]
        dtype_id = take("B")
        if dtype_id not in _DTYPES:
            raise fail(f"unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        size = take("I")
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise fail(f"{size} bytes for shape {shape} of {dtype} ({expected} expected)")
        if offset + size > len(data):
            raise fail(f"{size} bytes declared, {len(data) - offset} left")
        raw = bytearray(data[offset : offset + size])
        offset += size
        variables[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
    where = "the aliases"
    for _ in range(take("I")):
        alias, target = text(), text()
        if target not in variables:
            raise fail(f"alias {alias!r} names a missing variable {target!r}")
        variables[alias] = variables[target]
    return spec, variables


def _weight(variables: dict[str, torch.Tensor], scope: str) -> torch.Tensor:
    """A float32 weight, de-quantised when the model was converted with int8/int16 weights (one scale per output
    row or channel: linear and convolution weights alike)."""
    weight = variables[f"{scope}/weight"]
    scale = variables.get(f"{scope}/weight_scale")
    if scale is not None:
        scale = scale.float()
        return weight.float() / (scale.reshape(-1, *[1] * (weight.dim() - 1)) if scale.dim() == 1 else scale)
    return weight.float()


def _count_layers(variables: Iterable[str], stack: str) -> int:
    return len({m.group(1) for name in variables if (m := re.match(rf"{stack}/layer_(\d+)/", name))})


def _linear(out: dict, variables: dict, src: str, dst: str, bias: bool = True) -> None:
    out[f"{dst}.weight"] = _weight(variables, src)
    if bias:
        out[f"{dst}.bias"] = variables[f"{src}/bias"].float()


def _norm(out: dict, variables: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"] = variables[f"{src}/gamma"].float()
    out[f"{dst}.bias"] = variables[f"{src}/beta"].float()


def _split_linear(out: dict, variables: dict, src: str, dsts: list[str | None]) -> None:
    weights = _weight(variables, src).chunk(len(dsts))
    biases = variables[f"{src}/bias"].float().chunk(len(dsts))
    for dst, weight, bias in zip(dsts, weights, biases, strict=True):
        out[f"{dst}.weight"] = weight
        if not dst.endswith("k_proj"):
            out[f"{dst}.bias"] = bias


def to_transformers_state(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``WhisperForConditionalGeneration`` state dict (float32) from CTranslate2 variables."""
    state: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(state, variables, f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.encoder.embed_positions.weight"] = variables["encoder/position_encodings/encodings"].float()
    state["model.decoder.embed_positions.weight"] = variables["decoder/position_encodings/encodings"].float()
    state["model.decoder.embed_tokens.weight"] = _weight(variables, "decoder/embeddings")
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    for stack in ("encoder", "decoder"):
        _norm(state, variables, f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        for i in range(_count_layers(variables, stack)):
            src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            attn = f"{dst}.self_attn"
            _split_linear(state, variables, f"{src}/self_attention/linear_0", [f"{attn}.{p}_proj" for p in "qkv"])
            _linear(state, variables, f"{src}/self_attention/linear_1", f"{attn}.out_proj")
            _norm(state, variables, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if stack == "decoder":
                cross = f"{dst}.encoder_attn"
                _linear(state, variables, f"{src}/attention/linear_0", f"{cross}.q_proj")
                _split_linear(state, variables, f"{src}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"])
                _linear(state, variables, f"{src}/attention/linear_2", f"{cross}.out_proj")
                _norm(state, variables, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            _linear(state, variables, f"{src}/ffn/linear_0", f"{dst}.fc1")
            _linear(state, variables, f"{src}/ffn/linear_1", f"{dst}.fc2")
            _norm(state, variables, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return state


def special_token_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    """bos/eos/pad and the decoder start id from the tokenizer, as the hub's own Whisper configs carry them
    (openai/whisper-base: 50257, 50257, 50257, 50258). ``WhisperConfig``'s defaults are the English-only
    vocabulary's (eos 50256, start 50257): on a multilingual vocabulary they make ``labels``-only training shift
    in ``<|endoftext|>`` as the start token and stop generation at a text token."""
    end, start = tokenizer.convert_tokens_to_ids(SPECIAL), tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    if start == end or start is None:
        raise CTranslate2FormatError("tokenizer.json has no <|startoftranscript|> token: not a Whisper tokenizer")
    return {"bos_token_id": end, "eos_token_id": end, "pad_token_id": end, "decoder_start_token_id": start}


def begin_suppress_ids(tokenizer: WhisperTokenizer) -> list[int]:
    """What Whisper never emits first: a blank (``" "``) and ``<|endoftext|>`` ([220, 50257] multilingual)."""
    return [*tokenizer.encode(" ", add_special_tokens=False), tokenizer.convert_tokens_to_ids(SPECIAL)]


def whisper_config(variables: dict[str, torch.Tensor], ct2_config: dict, tokenizer: WhisperTokenizer) -> WhisperConfig:
    """The ``WhisperConfig`` the variables' shapes imply, with the tokenizer's special ids and CTranslate2's
    suppress lists carried over (float32: what a CPU user loads without casting)."""
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"].item()),
        decoder_attention_heads=int(variables["decoder/num_heads"].item()),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or begin_suppress_ids(tokenizer)),
        tie_word_embeddings=True,
        **special_token_ids(tokenizer),
    )
    config.dtype = torch.float32
    return config


def build_tokenizer(tokenizer_json: Path) -> WhisperTokenizer:
    """Whisper's tokenizer from a faster-whisper ``tokenizer.json`` (no hub access)."""
    return WhisperTokenizer(
        tokenizer_file=str(tokenizer_json), bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )


def generation_config(config: WhisperConfig, tokenizer: WhisperTokenizer, ct2_config: dict) -> GenerationConfig:
    """Language and task ids, suppress lists and alignment heads that ``generate`` needs for Whisper."""
    ids = tokenizer.convert_tokens_to_ids
    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config.get("lang_ids", [])}
    return GenerationConfig(
        **special_token_ids(tokenizer),
        max_length=config.max_target_positions,
        is_multilingual=len(lang_to_id) > 1,
        lang_to_id=lang_to_id,
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=ct2_config.get("alignment_heads"),
    )


def import_model(files: dict[str, Path], parts: list[Path], out_dir: Path) -> None:
    """Write a transformers Whisper directory (float32 safetensors, configs, tokenizer, feature extractor).

    ``files`` maps ``config.json`` and ``tokenizer.json`` to their paths; ``parts`` are the ``model.bin`` parts.
    """
    spec, variables = read_variables(b"".join(part.read_bytes() for part in parts))
    if spec != "WhisperSpec":
        raise CTranslate2FormatError(f"model.bin holds a {spec}, not a WhisperSpec")
    tokenizer = build_tokenizer(files["tokenizer.json"])
    try:
        ct2_config = json.loads(files["config.json"].read_text()) if "config.json" in files else {}
        config = whisper_config(variables, ct2_config, tokenizer)
        # Owned copies: CTranslate2 stores equal variables once (aliases), and float32 ones are not copied on the
        # way; weights sharing memory would not save.
        state = {name: tensor.clone() for name, tensor in to_transformers_state(variables).items()}
        with torch.device("meta"):
            model = WhisperForConditionalGeneration(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except KeyError as exc:
        raise CTranslate2FormatError(f"model.bin has no variable {exc.args[0]!r} a Whisper needs") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise CTranslate2FormatError(f"config.json is not a CTranslate2 Whisper config: {exc}") from None
    except (RuntimeError, ValueError, IndexError) as exc:  # shapes that do not fit together
        raise CTranslate2FormatError(f"model.bin's variables do not form a Whisper: {str(exc)[:300]}") from None
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise CTranslate2FormatError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = generation_config(config, tokenizer, ct2_config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
