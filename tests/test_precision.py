import pytest
import torch

from whisper_lora.manifest import BaseModelRecord, EvalSet, Manifest, PublishedAdapter, Scores
from whisper_lora.report import markdown
from whisper_lora.train.precision import Device, choose_precision, recorded_precision, scoring_precision

CPU = Device("cpu")
# what torch.cuda.get_device_properties reports on each card (memory in GiB, compute capability)
T4 = Device("cuda", 14.6, (7, 5))
V100_16 = Device("cuda", 15.8, (7, 0))
V100_32 = Device("cuda", 31.7, (7, 0))
A10G = Device("cuda", 22.0, (8, 6))
A100 = Device("cuda", 79.2, (8, 0))
H100 = Device("cuda", 79.1, (9, 0))


@pytest.mark.parametrize(
    ("device", "expected", "why"),
    [
        (CPU, "fp32", "slower and larger"),
        (T4, "int8", "fit memory"),
        (V100_16, "int8", "fit memory"),
        (V100_32, "fp16", "compute capability 7.0 (no native bf16): fp16 with loss scaling"),
        (A10G, "bf16", "fastest"),
        (A100, "bf16", "fastest"),
        (H100, "bf16", "fastest"),
    ],
)
def test_auto_picks_by_device_and_says_why(device, expected, why):
    choice = choose_precision("auto", device)
    assert choice.precision == expected and why in choice.reason


@pytest.mark.parametrize(
    ("device", "native"), [(T4, False), (V100_32, False), (A10G, True), (A100, True), (H100, True)]
)
def test_bf16_counts_only_where_the_card_computes_it(device, native):
    assert device.bf16 is native
    if native:
        assert choose_precision("bf16", device).precision == "bf16"
    else:  # torch.cuda.is_bf16_supported() says yes on these (emulation): a request is still refused
        with pytest.raises(ValueError, match=r"no native bf16 \(it needs 8\.0"):
            choose_precision("bf16", device)


def test_the_current_device_reads_capability_not_torchs_emulated_bf16(monkeypatch):
    class Properties:
        total_memory, major, minor = 15 * 2**30, 7, 5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    t4 = Device.current()
    assert t4 == Device("cuda", 15.0, (7, 5)) and not t4.bf16
    assert choose_precision("auto", t4).precision == "int8"


def test_explicit_requests_are_honoured_where_they_can_run():
    assert choose_precision("int8", CPU).precision == "int8"
    assert choose_precision("fp32", A100).precision == "fp32"
    with pytest.raises(ValueError, match="needs a GPU"):
        choose_precision("bf16", CPU)
    with pytest.raises(ValueError, match="no native bf16"):
        choose_precision("bf16", T4)


def test_dtypes_follow_the_choice():
    assert choose_precision("auto", A100).autocast_dtype == torch.bfloat16
    assert not choose_precision("auto", A100).needs_loss_scaling
    t4 = choose_precision("auto", T4)
    assert t4.needs_loss_scaling and t4.weight_dtype == torch.float16
    assert choose_precision("auto", CPU).autocast_dtype is None


def test_current_device_here_is_the_cpu_unless_cuda_is_present():
    assert Device.current().kind == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("device", "expected"), [(CPU, "fp32"), (T4, "int8"), (V100_32, "fp16"), (A100, "bf16")])
def test_scores_are_decoded_as_the_adapters_train_on_every_device(device, expected):
    choice = scoring_precision("auto", device)
    assert choice.precision == choose_precision("auto", device).precision == expected
    assert choice.reason.startswith("as the adapters train")
    assert scoring_precision("int8", CPU).precision == "int8"  # a run training int8 scores its zero-shot in int8
    with pytest.raises(ValueError, match="needs a GPU"):
        scoring_precision("bf16", CPU)


def test_recorded_precisions_read_in_both_spellings():
    assert [recorded_precision(n) for n in ("fp16", "float16", "float32", "bfloat16", "int8")] == [
        "fp16", "fp16", "fp32", "bf16", "int8"
    ]  # fmt: skip
    assert recorded_precision(None) is None and recorded_precision("float64") is None


def _entry(adapter: str | None, base: str | None, test: tuple[str, str] | None = None) -> PublishedAdapter:
    scores = {"primary": 0.5, "wer": 0.5, "cer": 0.2, "raw_wer": 0.6}
    tested = {} if test is None else {"test": Scores(**scores, precision=test[0]),
                                      "zero_shot_test": Scores(**scores, precision=test[1])}  # fmt: skip
    return PublishedAdapter(
        language="hi", metric="wer", value=0.5, wer=0.5, cer=0.2, raw_wer=0.6, precision=adapter,
        zero_shot=Scores(**{**scores, "primary": 0.9}, precision=base), eval=EvalSet(split="dev", utterances=4),
        rank=4, alpha=8, learning_rate=1e-3, target_modules=["q_proj"], train_steps=20, trial_id="t", base_sha256="0",
        adapter="a/adapters/hi/x", files={}, created="now", **tested,
    )  # fmt: skip


def test_an_improvement_across_two_precisions_is_flagged_in_the_report(caplog):
    assert _entry("int8", "int8", ("int8", "int8")).unlike_comparisons() == []
    assert _entry(None, "fp16").unlike_comparisons() == []  # a manifest from before the record: nothing to compare
    unlike = _entry("int8", "fp16", ("int8", "int8"))
    assert unlike.unlike_comparisons() == ["dev: adapter decoded in int8, zero-shot base in fp16"]
    manifest = Manifest(experiment="e", created="now", base_model=BaseModelRecord(id="b", sha256="0"),
                        languages={"hi": unlike})  # fmt: skip
    assert "**Not like with like — hi, dev: adapter decoded in int8, zero-shot base in fp16**" in markdown(manifest)
    assert "mixes quantisation loss with adaptation" in caplog.text


@pytest.mark.parametrize(
    ("requested", "recorded", "device", "expected"),
    [
        (None, "int8", "cpu", "int8"),  # the manifest's precision, where this device runs it
        (None, "bf16", "cpu", "fp32"),  # not on a CPU: the device's default, with a warning
        (None, None, "cpu", "fp32"),
        ("fp32", "int8", "cpu", "fp32"),  # --precision wins
    ],
)
def test_transcribe_decodes_in_the_adapters_recorded_precision_by_default(requested, recorded, device, expected):
    from whisper_lora.transcribe import decoding_precision

    entry = _entry(recorded, recorded)
    assert decoding_precision(requested, entry, torch.device(device)) == expected


def test_a_precision_the_device_cannot_run_is_refused_when_asked_for():
    from whisper_lora.transcribe import PublishedAdapterError, decoding_precision

    with pytest.raises(PublishedAdapterError, match="--precision fp16: precision fp16 needs a GPU"):
        decoding_precision("fp16", _entry(None, None), torch.device("cpu"))


def test_a_cuda_device_is_described_by_its_own_properties(monkeypatch):
    class Properties:
        total_memory, major, minor = 80 * 2**30, 8, 0

    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: seen.append(index) or Properties)
    assert Device.of(torch.device("cuda:1")) == Device("cuda", 80.0, (8, 0)) and seen == [1]
    assert Device.of("cpu") == CPU
