"""MelFeatures: shapes for any length, exact streaming, the documented 7.5 ms context, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.features import MelConfig, MelFeatures

from helpers import noise


@pytest.fixture(scope="module")
def mel() -> MelFeatures:
    return MelFeatures()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 20_000), extra=st.one_of(st.none(), st.integers(0, 40)))
def test_frame_counts_for_any_length(mel, n, extra):
    x = noise(n)
    feats = mel(x, extra)
    expected = -(-n // 640) if extra is None else extra
    assert feats.shape == (expected, 80) and feats.dtype == np.float32
    assert np.isfinite(feats).all()


def test_streaming_equals_offline_exactly(mel, speech, chunker):
    wav = speech["speech_en_us_male.wav"][: 16000 * 4 + 321]
    offline = mel(wav)
    rng = np.random.default_rng(0)
    stream = mel.stream()
    parts = [stream.push(c) for c in chunker(wav, rng)]
    parts.append(stream.flush())
    np.testing.assert_array_equal(np.concatenate(parts), offline)


def test_long_clip_is_batched_and_still_exact(mel, chunker):
    x = noise(640 * 1100 + 5, seed=4)  # more frames than one offline batch (1024)
    stream = mel.stream()
    parts = [stream.push(c) for c in chunker(x, np.random.default_rng(1), max_chunk=20_000)]
    np.testing.assert_array_equal(np.concatenate([*parts, stream.flush()]), mel(x))


def test_stream_emits_as_soon_as_the_lookahead_arrives(mel):
    assert mel.timing.lookahead_samples == mel.timing.left_context_samples == 120
    assert mel.lookahead_ms == 7.5 and mel.timing.max_wait_ms == 7.5
    stream = mel.stream()
    x = noise(5000)
    assert stream.push(x[:759]).shape[0] == 0
    assert stream.push(x[759:760]).shape[0] == 1  # frame 0 needs samples [0, 760)
    assert stream.push(x[760:1400]).shape[0] == 1
    assert stream.frames_emitted == 2


def test_a_frame_depends_only_on_its_window(mel):
    x = noise(640 * 10)
    base = mel(x)
    f = 5
    y = x.copy()
    y[: 640 * f - 120] = 0.3  # everything left of frame 5's window
    y[640 * f + 760:] = -0.3  # everything right of it
    changed = mel(y)
    np.testing.assert_array_equal(changed[f], base[f])
    assert not np.array_equal(changed[f - 1], base[f - 1]) and not np.array_equal(changed[f + 1], base[f + 1])


def test_values_and_silence(mel, speech):
    silent = mel(np.zeros(6400, dtype=np.float32))
    np.testing.assert_allclose(silent, (np.log10(1e-8) + 4) / 4, rtol=1e-6)
    voiced = mel(speech["speech_en_gb_female.wav"])
    assert voiced.max() > 0.5 and voiced.min() >= -1.0 - 1e-6


def test_int16_and_bad_input(mel):
    x = noise(3200)
    as_int = np.round(x * 32768).clip(-32768, 32767).astype(np.int16)
    np.testing.assert_allclose(mel(as_int), mel(as_int.astype(np.float32) / 32768))
    with pytest.raises(ValueError, match="NaN or infinite"):
        mel(np.array([0.0, np.inf], dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        mel(np.zeros((2, 640), dtype=np.float32))
    with pytest.raises(ValueError, match="num_video_frames"):
        mel(x, -1)
    stream = mel.stream()
    with pytest.raises(ValueError, match="NaN"):
        stream.push(np.array([np.nan], dtype=np.float32))
    stream.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        stream.push(x)
    with pytest.raises(ValueError, match="must divide 640"):
        MelConfig(hop_samples=300)


def test_other_mel_sizes():
    small = MelFeatures(MelConfig(n_mels=40, n_fft=512, hop_samples=128))
    assert small(noise(6400)).shape == (10, 40)
    assert small.timing.lookahead_samples == 192


def test_a_lead_moves_every_window_later_and_waits_for_it(chunker):
    early = MelFeatures(MelConfig(lead_samples=640))  # a model that hears each frame's audio one frame early
    assert early.timing.lookahead_samples == 760 and early.timing.left_context_samples == 120
    x = noise(640 * 30 + 77, seed=9)
    plain, led = MelFeatures()(x), early(x)
    assert led.shape == plain.shape
    np.testing.assert_array_equal(led[:-1], plain[1:])  # frame f hears frame f + 1's samples
    stream = early.stream()
    parts = [stream.push(c) for c in chunker(x, np.random.default_rng(2))]
    np.testing.assert_array_equal(np.concatenate([*parts, stream.flush()]), led)
    fresh = early.stream()
    assert fresh.push(x[:1399]).shape[0] == 0 and fresh.push(x[1399:1400]).shape[0] == 1  # [0, 1400) for frame 0
    with pytest.raises(ValueError, match="lead_samples"):
        MelConfig(lead_samples=-1)
