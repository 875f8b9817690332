"""``train.audio_context``: the frames a set of clips needs, Whisper's encoder over only those frames (equal to the
standard encoder at 3000), the training step and the frozen-encoder cache that use it, and a smoke run of
``benchmarks/audio_context.py`` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import WhisperForConditionalGeneration

from tests.builders import benchmark_module, write_clip, write_prepared_split
from whisper_lora.config import EvalConfig, JobConfig, TrainConfig
from whisper_lora.data.features import Featurizer
from whisper_lora.data.prepared import prepared_dir, split_dir
from whisper_lora.encode import EncodeBatch, _source, encode, split_buckets
from whisper_lora.models.audio_context import (
    WHISPER_FRAMES,
    bucket_of,
    context_frames,
    encode_frames,
    encoder_of,
    frames_for,
    length_buckets,
    run_short_encoder,
)
from whisper_lora.models.resolve import ResolvedModel
from whisper_lora.models.sizes import TINY_RANDOM, config_of
from whisper_lora.storage import open_location
from whisper_lora.train.loop import epoch_groups
from whisper_lora.train.plan import WorkerPlan
from whisper_lora.train.step import build_worker, train_step
from whisper_lora.train.trainer import worker_plan

PROMPT = [50258, 50276, 50359, 50363]  # <|startoftranscript|> <|hi|> <|transcribe|> <|notimestamps|>
END = 50257
SENTENCES = ["एक दो तीन", "चार पांच छह", "सात आठ नौ", "दस ग्यारह बारह", "तेरह चौदह", "पंद्रह सोलह"]


@pytest.fixture(autouse=True)
def _threads():
    """The encoder actor and the benchmark set torch's threads for the process: give them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config_of(TINY_RANDOM)).eval()


@pytest.mark.parametrize(
    ("durations", "frames"),
    [
        ([2.4], 300),  # 2.9 s with the trailing silence → 3 s
        ([2.6], 400),
        ([1.0, 8.95, 3.0], 1000),  # the longest clip decides
        ([29.6], WHISPER_FRAMES),  # never beyond Whisper's window
    ],
)
def test_frames_are_the_longest_clip_and_half_a_second_in_whole_seconds(durations, frames):
    assert frames_for(durations) == frames
    assert frames % 2 == 0


def test_frames_cover_every_log_mel_frame_of_the_clip_and_its_trailing_silence(tiny_model_dir):
    featurizer = Featurizer(tiny_model_dir)
    for samples in [1_600, 41_600, 47_840, 47_999, 143_200, 479_000]:
        width = featurizer.log_mel(np.zeros(samples, dtype=np.float32) + 0.01).shape[-1]
        frames = frames_for([samples / 16_000])
        assert frames >= min(WHISPER_FRAMES, width + 50), samples
        assert frames - width <= 150  # no more than a second beyond the half second kept


def test_bad_frame_requests_are_refused():
    with pytest.raises(ValueError, match="at least one clip"):
        frames_for([])
    with pytest.raises(ValueError, match="positive even"):
        frames_for([1.0], step=25)
    with pytest.raises(ValueError, match="unknown audio context 'short'"):
        context_frames([1.0], "short")
    assert context_frames([1.0], "full") == WHISPER_FRAMES
    assert context_frames([1.0], "clip") == 200


def test_at_3000_frames_the_short_encoder_is_the_standard_encoder_adapters_included(tiny):
    features = torch.randn(2, 80, WHISPER_FRAMES)
    with torch.no_grad():
        plain = tiny.get_encoder()(features).last_hidden_state
        torch.testing.assert_close(encode_frames(tiny.get_encoder(), features), plain, rtol=0, atol=1e-6)
    torch.manual_seed(1)
    adapted = WhisperForConditionalGeneration(config_of(TINY_RANDOM)).eval()
    model = get_peft_model(adapted, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        standard = model.get_encoder()(features).last_hidden_state
        ours = encode_frames(encoder_of(model), features)
        with model.disable_adapter():
            unadapted = encode_frames(encoder_of(model), features)
    torch.testing.assert_close(ours, standard, rtol=0, atol=1e-6)
    assert not torch.allclose(unadapted, ours, atol=1e-3)  # the adapters (random, non-zero here) were applied


def test_a_short_run_differs_from_the_30_s_run_only_through_attention_context(tiny):
    """Whisper's encoder is convolutions, positional embeddings and self-attention. Run over the first 400 frames,
    its first 200 positions see the same convolution outputs and embeddings as at 3000 frames (all but the last,
    whose kernel reaches past the window); every difference comes from attending to 200 positions instead of 1500.
    With attention switched off (its output projection zeroed) the two runs agree; with it on they do not: the
    benchmark measures what that costs."""
    features = torch.randn(1, 80, WHISPER_FRAMES)
    encoder = tiny.get_encoder()
    with torch.no_grad():
        short, full = encode_frames(encoder, features[..., :400]), encode_frames(encoder, features)
        assert short.shape == (1, 200, 64)
        attention_changes = (short[:, :199] - full[:, :199]).abs().max().item()
        saved = [(layer.self_attn.out_proj.weight.clone(), layer.self_attn.out_proj.bias.clone())
                 for layer in encoder.layers]  # fmt: skip
        for layer in encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
        try:
            short, full = encode_frames(encoder, features[..., :400]), encode_frames(encoder, features)
        finally:
            for layer, (weight, bias) in zip(encoder.layers, saved, strict=True):
                layer.self_attn.out_proj.weight.copy_(weight)
                layer.self_attn.out_proj.bias.copy_(bias)
    torch.testing.assert_close(short[:, :199], full[:, :199], rtol=0, atol=1e-5)
    assert attention_changes > 1e-3


def test_the_encoder_refuses_frames_it_cannot_take(tiny):
    for frames in (0, 301, 3002):
        with pytest.raises(ValueError, match="multiple of 2 frames up to 3000"):
            encode_frames(tiny.get_encoder(), torch.zeros(1, 80, frames))


def test_full_window_inputs_pass_through_and_short_ones_become_encoder_outputs(tiny):
    full = {"input_features": torch.zeros(1, 80, WHISPER_FRAMES), "labels": torch.zeros(1, 3)}
    assert run_short_encoder(tiny, full) is full
    short = run_short_encoder(tiny, {"input_features": torch.zeros(1, 80, 600), "labels": torch.zeros(1, 3)})
    assert set(short) == {"encoder_outputs", "labels"}
    assert short["encoder_outputs"][0].shape == (1, 300, 64)


def _rows(durations: list[float]) -> dict:
    rng = np.random.default_rng(0)
    return {
        "id": [f"u{index}" for index in range(len(durations))],
        "duration_s": np.asarray(durations, dtype=np.float32),
        "input_features": [rng.standard_normal((80, int(d * 100) + 2)).astype(np.float32) for d in durations],
        "label_ids": [np.array([*PROMPT, *rng.integers(220, 50000, 5), END]) for _ in durations],
    }


def _worker(tiny_model_dir: str, audio_context: str):
    train = TrainConfig(precision="fp32", gradient_checkpointing=True, warmup_steps=0, lora={"dropout": 0.0},
                        audio_context=audio_context)  # fmt: skip
    plan = WorkerPlan(train=train, eval=EvalConfig(), base_path=tiny_model_dir, language="hi",
                      micro_batches_per_epoch=4, train_dir="unused", eval_dir="unused")  # fmt: skip
    return build_worker(plan, torch.device("cpu"))


def test_a_clip_step_runs_the_adapted_encoder_over_the_batch_frames_only(tiny_model_dir):
    seen = {}
    losses = {}
    for context in ("full", "clip"):
        worker = _worker(tiny_model_dir, context)
        encoder = encoder_of(worker.model)
        encoder.layers[0].register_forward_pre_hook(
            lambda module, args, context=context: seen.update({context: tuple(args[0].shape)})
        )
        lora_b = [p for name, p in worker.model.named_parameters() if "encoder.layers" in name and "lora_B" in name]
        losses[context] = train_step(worker, [_rows([1.0, 2.0])]).loss
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the encoder's adapters learned (from zero)
    assert seen == {"full": (2, 1500, 64), "clip": (2, 150, 64)}  # 2.5 s → 300 frames
    assert losses["clip"] != pytest.approx(losses["full"], rel=1e-6)


def test_clip_steps_under_ddp_reduce_as_a_plain_step(tiny_model_dir):
    import torch.distributed as dist

    from tests.builders import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        worker, plain = _worker(tiny_model_dir, "clip"), _worker(tiny_model_dir, "clip")
        worker.model = torch.nn.parallel.DistributedDataParallel(worker.model)
        reduced, local = train_step(worker, [_rows([1.0, 3.0])]), train_step(plain, [_rows([1.0, 3.0])])
    finally:
        dist.destroy_process_group()
    assert reduced.grad_norm == pytest.approx(local.grad_norm, rel=1e-5)
    for a, b in zip(worker.trainable, plain.trainable, strict=True):
        torch.testing.assert_close(a, b)


def _write_prepared(prepared: Path, model_dir: str, splits: dict[str, int]) -> None:
    """A prepared Hindi corpus as ``prepare`` lays it out (tone clips of 0.5-1.5 s)."""
    featurizer = Featurizer(model_dir)
    clips = prepared.parent / "clips"
    for split, count in splits.items():
        examples = []
        for index in range(count):
            clip = write_clip(clips / f"{split}{index}.mp3", 0.5 + 0.2 * index)
            examples.append(featurizer.example(clip.read_bytes(), SENTENCES[index % len(SENTENCES)], "hi"))
        write_prepared_split(prepared, "hi", split, examples)


def _config(root: Path, model_dir: str, **train) -> JobConfig:
    (root / "corpus").mkdir(exist_ok=True)
    return JobConfig.model_validate(
        {
            "experiment": "ctx",
            "output_dir": str(root / "runs"),
            "model": {"base": model_dir, "cache_dir": str(root / "models")},
            "data": {"source": {"kind": "common_voice", "path": str(root / "corpus")}, "languages": ["hi"]},
            "train": {"freeze_encoder": True, **train},
        }
    )


def test_the_cache_encodes_the_train_split_at_its_clip_frames_and_the_eval_split_at_30_s(tmp_path, tiny_model_dir):
    full, clip = _config(tmp_path, tiny_model_dir), _config(tmp_path, tiny_model_dir, audio_context="clip")
    _write_prepared(prepared_dir(full), tiny_model_dir, {"train": 4, "dev": 2})
    model = ResolvedModel(spec=tiny_model_dir, path=tiny_model_dir, sha256="0" * 64)
    assert split_buckets(clip, "hi", "train") == [200]  # every clip (0.5-1.1 s) and 0.5 s of silence: 2 s
    assert split_buckets(clip, "hi", "dev") == split_buckets(full, "hi", "train") == [WHISPER_FRAMES]
    # A 30-s encoding keeps the record it always had; a clip encoding names its buckets, so a change re-encodes.
    assert "frames" not in _source(full, model, "hi", "train")
    assert _source(clip, model, "hi", "train") == {**_source(full, model, "hi", "train"), "frames": [200]}
    assert _source(clip, model, "hi", "dev") == _source(full, model, "hi", "dev")

    from whisper_lora.data.prepared import iter_batches

    rows = next(iter_batches(split_dir(prepared_dir(full), "hi", "train"), 4))
    batch = {**rows, "language": np.full(4, "hi"), "split": np.full(4, "train")}
    short = EncodeBatch(tiny_model_dir, 1, 200)(batch).column("encoder_hidden_states").combine_chunks().to_numpy()
    standard = EncodeBatch(tiny_model_dir, 1)(batch).column("encoder_hidden_states").combine_chunks().to_numpy()
    assert short.shape == (4, 100, 64) and standard.shape == (4, 1500, 64)
    encoder = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).get_encoder().eval()
    with torch.no_grad():
        from whisper_lora.data.collate import stack_features

        expected = encoder(stack_features(rows["input_features"])).last_hidden_state.to(torch.float16).numpy()
    np.testing.assert_array_equal(standard, expected)


@pytest.mark.parametrize(
    ("durations", "min_rows", "buckets"),
    [
        ([0.5] * 4 + [1.6] * 3 + [2.7] * 2 + [9.0], 3, [200, 300, 1000]),  # 2.7 s and 9 s: too few apart
        ([0.5] * 4 + [1.6] * 3 + [2.7] * 3 + [9.0] * 2, 3, [200, 300, 400, 1000]),  # 9 s: half a bucket, its own
        ([0.5] * 4 + [9.0], 4, [1000]),  # one 9-s clip: too few for a bucket, it joins the one before
        ([0.5] * 4 + [1.6] * 3, 8, [300]),  # fewer clips than a bucket holds: one, the longest clip's
        ([2.4, 0.5, 0.6, 2.3], 2, [200, 300]),  # unsorted input
    ],
)
def test_length_buckets_merge_neighbouring_lengths_until_each_holds_enough_clips(durations, min_rows, buckets):
    assert length_buckets(durations, min_rows) == buckets
    assert bucket_of(0.1, buckets) == buckets[0] and bucket_of(max(durations), buckets) == buckets[-1]
    assert bucket_of(1.6, buckets) == min(b for b in buckets if b >= 300)
    assert bucket_of(40.0, buckets) == buckets[-1]  # longer than any bucket: the longest


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_cache_writes_one_file_per_length_bucket_and_training_batches_never_mix_them(
    ray_local, tmp_path, tiny_model_dir, monkeypatch
):
    from whisper_lora.data import epochs
    from whisper_lora.models import audio_context

    monkeypatch.setattr(audio_context, "BUCKET_MIN_ROWS", 3)
    config = _config(tmp_path, tiny_model_dir, audio_context="clip", batch_size=2)
    _write_prepared(prepared_dir(config), tiny_model_dir, {"train": 7, "dev": 2})  # 0.5-1.7 s: 200 and 300 frames
    model = ResolvedModel(spec=tiny_model_dir, path=tiny_model_dir, sha256="0" * 64)
    root = encode(config, model, [("hi", "train"), ("hi", "dev")], use_gpu=False)
    train = split_dir(root, "hi", "train")
    shapes = {}
    for file in sorted(train.glob("*.parquet")):
        table = pq.read_table(file)
        hidden = table.column("encoder_hidden_states").combine_chunks().to_numpy()
        durations = sorted(table.column("duration_s").to_pylist())
        shapes[file.name.split("-")[0]] = (table.num_rows, hidden.shape[1:], durations)
    assert {name: (rows, shape) for name, (rows, shape, _) in shapes.items()} == {
        "frames200": (5, (100, 64)),
        "frames300": (2, (150, 64)),
    }  # 0.5-1.3 s need 2 s, 1.5 and 1.7 s need 3 s (with 0.5 s of silence); 2 ≥ half of 3 rows: a bucket of its own
    assert max(shapes["frames200"][2]) < min(shapes["frames300"][2])  # shortest clips in the shortest bucket
    assert not any(f.name.startswith("frames") for f in split_dir(root, "hi", "dev").glob("*.parquet"))
    assert encode(config, model, [("hi", "train")], use_gpu=False) == root  # current: nothing encoded again
    reader = epochs.EpochReader(open_location(str(train)), 2**30)
    assert reader.bucket_rows == [5, 2]
    plan = worker_plan(config, tiny_model_dir, "hi", reader.bucket_rows, str(train), str(train))
    assert plan.micro_batches_per_epoch == 3  # 2 of the 200-frame bucket (one row sits each epoch out), 1 of 300
    worker = build_worker(plan, torch.device("cpu"))
    for epoch in range(3):
        seen = []
        for micro_batches, _ in epoch_groups(reader, plan, 0, 1, epoch):
            (rows,) = micro_batches
            assert len({h.shape for h in rows["encoder_hidden_states"]}) == 1
            seen += list(rows["id"])
            assert train_step(worker, micro_batches).loss > 0
        assert len(seen) == len(set(seen)) == 6


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("audio_context") as module:
        yield module


def test_the_benchmark_trains_both_ways_and_scores_every_model_under_both_inputs(bench, tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    _write_prepared(prepared_dir(config), tiny_model_dir, {"train": 6, "dev": 2, "test": 2})
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")), encoding="utf-8")
    out = tmp_path / "figures.json"
    arguments = ["--config", str(path), "--steps", "3", "--batch-size", "2", "--rank", "4", "--threads", "1",
                 "--json", str(out), "eval.batch_size=2"]  # fmt: skip
    result = bench.main(arguments)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert result["clip_frames"] == {"train": 300, "dev": 200, "test": 200}  # clips of 0.5-1.5 s, 0.5-0.7 s
    assert [(e["split"], e["context"], e["frames"]) for e in result["encoding"]] == [
        ("train", "full", 3000), ("train", "clip", 300), ("dev", "full", 3000), ("dev", "clip", 200),
        ("test", "full", 3000), ("test", "clip", 200),
    ]  # fmt: skip
    assert [(t["trained_on"], t["frames"], t["steps"]) for t in result["training"]] == [
        ("full", 3000, 3), ("clip", 300, 3)
    ]  # fmt: skip
    assert all(t["step_seconds_median"] > 0 for t in result["training"])
    keys = [(s["model"], s["split"], s["inference"]) for s in result["scores"]]
    assert keys == [
        (model, split, inference)
        for model in ("zero-shot", "trained-full", "trained-clip")
        for split in ("dev", "test")
        for inference in ("full", "clip")
    ]
    assert all(s["utterances"] == 2 and s["decode_seconds_per_utterance"] > 0 for s in result["scores"])
    assert "trained on" in bench.table(result)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_encoder_cache_benchmark_times_the_cache_and_a_plain_loop_on_the_same_rows(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    _write_prepared(prepared_dir(config), tiny_model_dir, {"dev": 3, "test": 2})
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")), encoding="utf-8")
    out = tmp_path / "figures.json"
    with benchmark_module("encoder_cache") as module:
        result = module.main(["--config", str(path), "--splits", "dev,test", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert result["utterances"] == 5 and result["splits"] == ["hi/dev", "hi/test"]
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in result["seconds"].values())
    assert result["cache_over_plain"] > 0
    assert not (prepared_dir(config).parent / "encoded").exists()  # the real run directory is left as it was
