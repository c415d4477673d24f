"""StreamResampler / downmix: rates 8-96 kHz, channel counts, int16 vs float, layouts, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from audio.resample import PcmFormat, StreamResampler, downmix, pcm_from_av_frame, resample_audio

RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]


def tone(rate: int, seconds: float, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)  # (N, C)


def stream_all(resampler: StreamResampler, chunks) -> np.ndarray:
    out = [resampler.process(c) for c in chunks]
    out.append(resampler.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", RATES)
def test_chunked_equals_one_shot(rate, chunker):
    rng = np.random.default_rng(rate)
    x = (rng.standard_normal(int(rate * 1.3) + 7) * 0.2).astype(np.float32)
    fmt = PcmFormat(sample_rate=rate)
    one_shot = resample_audio(x, fmt)
    chunked = stream_all(StreamResampler(fmt), chunker(x, rng, max_chunk=rate // 25))
    assert chunked.dtype == np.float32
    assert chunked.size == one_shot.size == round(x.size * 16000 / rate)
    # soxr's stream output is delay-compensated: offset 0, same samples
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rate", [8000, 44100, 96000])
def test_tone_survives_resampling_in_time(rate):
    x = tone(rate, 1.0)[:, 0]
    y = stream_all(StreamResampler(PcmFormat(rate)), np.array_split(x, 50))
    ref = tone(16000, 1.0)[:, 0]
    core = slice(800, 15200)  # away from the edges
    np.testing.assert_allclose(y[core], ref[core], atol=2e-3)  # no delay, no gain change


def test_aiortc_frames_48k_stereo_s16_packed():
    """aiortc delivers s16 packed stereo, 960 samples per 20 ms, as a (1, 1920) array."""
    stereo = tone(48000, 0.5, channels=2)
    stereo[:, 1] *= 0.0  # right channel silent: mono is half the left channel
    s16 = np.round(stereo * 32767).astype(np.int16)
    fmt = PcmFormat(48000, channels=2, layout="interleaved")
    r = StreamResampler(fmt)
    frames = [s16[i:i + 960].reshape(1, -1) for i in range(0, s16.shape[0], 960)]
    y = stream_all(r, frames)
    ref = resample_audio(stereo, fmt)
    assert y.size == 8000
    np.testing.assert_allclose(y, ref, atol=1e-4)
    np.testing.assert_allclose(y[800:7200], 0.5 * tone(16000, 0.5)[800:7200, 0], atol=2e-3)
    assert 0 <= r.pending_output_samples < 48000


def test_planar_and_interleaved_agree_int16_and_float_agree():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4800, 8)) * 0.1).astype(np.float32)  # 8 channels, (N, C)
    inter = resample_audio(x, PcmFormat(96000, 8, "interleaved"))
    planar = resample_audio(np.ascontiguousarray(x.T), PcmFormat(96000, 8, "planar"))
    flat = resample_audio(x.reshape(-1), PcmFormat(96000, 8, "interleaved"))
    np.testing.assert_allclose(inter, planar, atol=1e-7)  # same up to summation order
    np.testing.assert_array_equal(inter, flat)
    np.testing.assert_allclose(inter, resample_audio(x.mean(axis=1), PcmFormat(96000)), atol=1e-6)
    as_int = np.round(x * 32768).astype(np.int16)
    np.testing.assert_allclose(resample_audio(as_int, PcmFormat(96000, 8)), inter, atol=1e-4)


def test_empty_and_one_sample_chunks():
    r = StreamResampler(PcmFormat(44100, 2))
    assert r.process(np.zeros((0, 2), dtype=np.int16)).shape == (0,)
    outs = [r.process(np.array([[1000, -1000]], dtype=np.int16)) for _ in range(4410)]
    outs.append(r.flush())
    assert sum(o.size for o in outs) == 1600
    passthrough = StreamResampler(PcmFormat(16000))
    assert passthrough.process(np.array([0.25], dtype=np.float32)).tolist() == [0.25]
    assert passthrough.pending_output_samples == 0.0


def test_nonfinite_samples_are_replaced_and_counted():
    r = StreamResampler(PcmFormat(16000))
    y = r.process(np.array([0.1, np.nan, np.inf, -np.inf, 0.2], dtype=np.float32))
    np.testing.assert_array_equal(y, np.array([0.1, 0.0, 1.0, -1.0, 0.2], dtype=np.float32))
    assert r.nonfinite_samples == 3
    r48 = StreamResampler(PcmFormat(48000, 2))
    x = tone(48000, 0.2, channels=2)
    x[100:110] = np.nan
    y = stream_all(r48, [x])
    assert np.isfinite(y).all() and r48.nonfinite_samples == 20
    with pytest.raises(ValueError, match="NaN or infinite"):
        resample_audio(x, PcmFormat(48000, 2))


def test_format_change_mid_stream_flushes_the_old_one():
    r = StreamResampler(PcmFormat(48000, 2))
    a = r.process(tone(48000, 0.1, channels=2))
    b = r.process(tone(24000, 0.1)[:, 0], PcmFormat(24000))
    c = r.flush()
    assert a.size + b.size + c.size == 1600 + 1600
    assert r.fmt == PcmFormat(24000)


@pytest.mark.parametrize("bad, match", [
    (dict(sample_rate=4000), "outside the supported"),
    (dict(sample_rate=192000), "outside the supported"),
    (dict(sample_rate=44100.5), "whole number"),
    (dict(sample_rate=48000, channels=0), "positive integer"),
    (dict(sample_rate=48000, layout="weird"), "layout"),
])
def test_bad_formats(bad, match):
    with pytest.raises(ValueError, match=match):
        PcmFormat(**bad)


def test_bad_chunks_are_clear_errors():
    with pytest.raises(ValueError, match="whole number of 2-channel"):
        downmix(np.zeros(1921, dtype=np.int16), PcmFormat(48000, 2))
    with pytest.raises(ValueError, match=r"planar 8-channel PCM must have shape \(8, num_samples\)"):
        downmix(np.zeros((2, 100), dtype=np.float32), PcmFormat(48000, 8, "planar"))
    with pytest.raises(ValueError, match="interleaved 2-channel"):
        downmix(np.zeros((100, 3), dtype=np.float32), PcmFormat(48000, 2))
    with pytest.raises(ValueError, match="unsupported sample dtype"):
        downmix(np.zeros(10, dtype=np.complex64), PcmFormat(48000))


def test_pyav_frame_helper():
    av = pytest.importorskip("av")
    s16 = (np.arange(1920, dtype=np.int16) % 100).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(s16, format="s16", layout="stereo")
    frame.sample_rate = 48000
    pcm, fmt = pcm_from_av_frame(frame)
    assert fmt == PcmFormat(48000, 2, "interleaved") and pcm.shape == (1, 1920)
    planar = av.AudioFrame.from_ndarray(np.zeros((2, 960), dtype=np.float32), format="fltp", layout="stereo")
    planar.sample_rate = 44100
    assert pcm_from_av_frame(planar)[1] == PcmFormat(44100, 2, "planar")


def test_reported_latency_is_bounded():
    """Latency (held-back output) at 48 kHz with 20 ms frames stays under ~40 ms."""
    r = StreamResampler(PcmFormat(48000, 2))
    x = tone(48000, 2.0, channels=2)
    worst = 0.0
    for i in range(0, x.shape[0], 960):
        r.process(x[i:i + 960])
        worst = max(worst, r.pending_output_samples)
    assert worst / 16 < 40.0  # ms
    assert soxr.__version__
