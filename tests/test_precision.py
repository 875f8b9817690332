import pytest
import torch

from whisper_lora.train.precision import Device, choose_precision

CPU = Device("cpu")
T4 = Device("cuda", 15.0, bf16=False)
A10G = Device("cuda", 22.0, bf16=True)
A100 = Device("cuda", 80.0, bf16=True)
V100_32 = Device("cuda", 32.0, bf16=False)


@pytest.mark.parametrize(
    ("device", "expected", "why"),
    [
        (CPU, "fp32", "slower and larger"),
        (T4, "int8", "fit memory"),
        (A10G, "bf16", "fastest"),
        (A100, "bf16", "fastest"),
        (V100_32, "fp16", "loss scaling"),
    ],
)
def test_auto_picks_by_device_and_says_why(device, expected, why):
    choice = choose_precision("auto", device)
    assert choice.precision == expected and why in choice.reason


def test_explicit_requests_are_honoured_where_they_can_run():
    assert choose_precision("int8", CPU).precision == "int8"
    assert choose_precision("fp32", A100).precision == "fp32"
    with pytest.raises(ValueError, match="needs a GPU"):
        choose_precision("bf16", CPU)
    with pytest.raises(ValueError, match="no bf16"):
        choose_precision("bf16", T4)


def test_dtypes_follow_the_choice():
    assert choose_precision("auto", A100).autocast_dtype == torch.bfloat16
    assert not choose_precision("auto", A100).needs_loss_scaling
    t4 = choose_precision("auto", T4)
    assert t4.needs_loss_scaling and t4.weight_dtype == torch.float16
    assert choose_precision("auto", CPU).autocast_dtype is None


def test_current_device_here_is_the_cpu_unless_cuda_is_present():
    assert Device.current().kind == ("cuda" if torch.cuda.is_available() else "cpu")
