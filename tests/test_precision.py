import pytest
import torch

from whisper_lora.train.precision import Device, choose_precision

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
