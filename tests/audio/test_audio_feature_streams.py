"""What both pretrained front ends (Wav2Vec2, Whisper; tiny random checkpoints) promise the engine: one
feature row per 40 ms video frame for any length, clip or window form, and streaming in random chunks
equal to the windowed form offline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import noise

FRONT_ENDS = ("w2v", "wh")  # the fixtures in tests/audio/conftest.py


@pytest.fixture(scope="module", params=FRONT_ENDS)
def front_end(request):
    return request.getfixturevalue(request.param)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 30_000), frames=st.one_of(st.none(), st.integers(0, 60)))
def test_frame_counts(front_end, n, frames):
    x = noise(n)
    expected = -(-n // 640) if frames is None else frames
    for feats in (front_end.clip_features(x, frames), front_end.window_features(x, frames)):
        assert feats.shape == (expected, front_end.feature_dim)
        assert feats.dtype == np.float32 and np.isfinite(feats).all()


@pytest.mark.parametrize("name, start, n, flush_frames", [  # start: where in the speech fixture
    ("w2v", 4000, 16000 * 3 + 457, None), ("w2v", 4000, 640 * 20, 26), ("w2v", 4000, 300, None),
    ("wh", 2000, 16000 * 3 + 457, None), ("wh", 2000, 640 * 9, 15), ("wh", 2000, 1, None),
])
def test_streaming_equals_window_features(request, speech, chunker, name, start, n, flush_frames):
    fe = request.getfixturevalue(name)
    wav = speech["speech_en_us_male.wav"][start:start + n]
    offline = fe.window_features(wav, flush_frames)
    stream = fe.stream()
    parts = [stream.push(c) for c in chunker(wav, np.random.default_rng(n))]
    parts.append(stream.flush(flush_frames))
    streamed = np.concatenate(parts)
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() <= 1e-3 * (np.abs(offline).max() + 1e-12)
