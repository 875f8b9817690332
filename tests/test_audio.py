import numpy as np
import pytest
import soundfile as sf

from tests.builders import tone, write_clip
from whisper_lora.data.audio import SAMPLE_RATE, AudioError, load_audio, to_mono_16k


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[np.argmax(spectrum)])


def test_resampling_48k_sine_keeps_frequency_and_level():
    x = tone(2.0, 48_000, freq=1000.0)
    y = to_mono_16k(x, 48_000)
    assert y.size == 2 * SAMPLE_RATE
    assert _peak_hz(y, SAMPLE_RATE) == pytest.approx(1000.0, abs=1.0)
    rms_in, rms_out = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y[100:-100] ** 2))
    assert rms_out == pytest.approx(rms_in, rel=0.01)


@pytest.mark.reliability
def test_stereo_44k_and_8k_are_downmixed_and_resampled(tmp_path):
    stereo = load_audio(str(write_clip(tmp_path / "s.flac", 1.0, rate=44_100, channels=2, fmt="FLAC")))
    narrow = load_audio(str(write_clip(tmp_path / "n.wav", 1.0, rate=8_000, fmt="WAV")))
    assert stereo.ndim == narrow.ndim == 1
    assert stereo.size == pytest.approx(SAMPLE_RATE, abs=2) and narrow.size == pytest.approx(SAMPLE_RATE, abs=2)
    assert _peak_hz(narrow, SAMPLE_RATE) == pytest.approx(440.0, abs=2.0)


def test_decodes_mp3_bytes_and_paths_alike(tmp_path):
    path = write_clip(tmp_path / "a.mp3", 1.0)
    from_path, from_bytes = load_audio(str(path)), load_audio(path.read_bytes())
    np.testing.assert_array_equal(from_path, from_bytes)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "unreadable"),
        (lambda p: p.write_text("this is a text file, not audio"), "unreadable"),
        (lambda p: None, "missing_audio"),
        (lambda p: p.write_bytes(write_clip(p.with_suffix(".full.mp3"), 5.0).read_bytes()[:9000]), "truncated"),
    ],
    ids=["zero-byte", "text-as-mp3", "missing", "truncated-mp3"],
)
def test_bad_files_raise_audio_error_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad.mp3"
    make(path)
    with pytest.raises(AudioError) as raised:
        load_audio(str(path))
    assert raised.value.reason == reason


def test_complete_mp3_is_not_called_truncated(tmp_path):
    path = write_clip(tmp_path / "ok.mp3", 5.0)
    assert sf.info(str(path)).frames > 0
    assert load_audio(str(path)).size == pytest.approx(5 * SAMPLE_RATE, rel=0.01)


def test_clips_longer_than_the_limit_are_rejected_from_the_header(tmp_path):
    path = str(write_clip(tmp_path / "long.wav", 40.0, rate=16_000, fmt="WAV"))
    with pytest.raises(AudioError) as raised:
        load_audio(path)
    assert (raised.value.reason, raised.value.duration_s) == ("too_long", pytest.approx(40.0))
    assert load_audio(path, max_duration_s=45.0).size == 40 * SAMPLE_RATE


def test_max_seconds_reads_the_start_of_a_clip_of_any_length(tmp_path):
    path = str(write_clip(tmp_path / "long.wav", 40.0, rate=16_000, fmt="WAV"))
    start = load_audio(path, max_seconds=5.0)
    assert start.size == 5 * SAMPLE_RATE
    np.testing.assert_array_equal(start, load_audio(path, max_duration_s=45.0)[: start.size])
