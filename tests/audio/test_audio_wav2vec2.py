"""Wav2Vec2Features (OmniAvatar layout) with tiny random checkpoints loaded offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio.features import Wav2Vec2Features, Wav2Vec2FeaturesConfig
from audio.features.tiny import save_tiny_wav2vec2

from helpers import noise


def test_dimensions(w2v):
    from models.config import WAV2VEC2_BASE_FEATURES

    assert w2v.feature_dim == (2 + 2) * 32 == 128  # last + (embedding + 2 layers), hidden 32
    assert (12 + 2) * 768 == WAV2VEC2_BASE_FEATURES  # the same rule for wav2vec2-base
    assert w2v.timing.lookahead_ms == 120 and w2v.timing.max_wait_ms == 3 * 40 + 120


@pytest.mark.parametrize("variant", [{}, {"feat_extract_norm": "layer", "do_stable_layer_norm": True}])
def test_encoder_matches_transformers(tmp_path, variant):
    """With the CNN frame count as seq_len the interpolation is the identity, so our encoder path must
    equal Wav2Vec2Model(..., output_hidden_states=True): cat(last_hidden_state, *hidden_states)."""
    from transformers import Wav2Vec2Model

    d = save_tiny_wav2vec2(tmp_path / "m", **variant)
    fe = Wav2Vec2Features.from_pretrained(d)
    ref_model = Wav2Vec2Model.from_pretrained(d, local_files_only=True).eval()
    x = noise(16000 + 123)
    with torch.no_grad():
        out = ref_model(torch.from_numpy(x)[None], output_hidden_states=True)
    ref = torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)[0].numpy()
    ours = fe._encode(x, seq_len=ref.shape[0])
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_video_rate_interpolation_takes_every_second_cnn_frame(w2v):
    """640 T samples -> 2T - 1 CNN frames -> align_corners interpolation to T picks frames 0, 2, 4, ..."""
    import torch.nn.functional as F

    t = 7
    cnn = torch.randn(1, 5, 2 * t - 1)
    np.testing.assert_allclose(F.interpolate(cnn, size=t, mode="linear", align_corners=True), cnn[:, :, ::2],
                               atol=1e-6)
    with torch.no_grad():
        assert w2v.model.feature_extractor(torch.zeros(1, 640 * t)).shape[-1] == 2 * t - 1


def test_stream_emits_whole_chunks_after_the_lookahead(w2v):
    stream = w2v.stream()
    x = noise(640 * 12)
    need = 640 * 4 + 120 * 16  # chunk 0 = frames 0-3, plus 120 ms lookahead
    assert stream.push(x[: need - 1]).shape[0] == 0
    assert stream.push(x[need - 1:need]).shape[0] == 4
    assert stream.push(x[need:]).shape[0] == 4
    assert stream.flush().shape[0] == 4


def test_window_equals_clip_when_the_model_is_local(tmp_path):
    """Make every part local (no input normalisation, LayerNorm CNN, attention output zeroed): then
    the windowed form must reproduce the whole-clip form wherever its window covers the receptive
    field (positional conv: 16 taps at 25 Hz -> 8 frames left, 7 right). Checks the window indexing."""
    d = save_tiny_wav2vec2(tmp_path / "local", feat_extract_norm="layer", do_normalize=False)
    from transformers import Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC.from_pretrained(d, local_files_only=True)
    for layer in model.wav2vec2.encoder.layers:
        torch.nn.init.zeros_(layer.attention.out_proj.weight)
        torch.nn.init.zeros_(layer.attention.out_proj.bias)
    model.save_pretrained(d)
    fe = Wav2Vec2Features.from_pretrained(d, left_context_ms=8 * 40, lookahead_ms=7 * 40 + 40)
    x = noise(640 * 40)
    clip, win = fe.clip_features(x), fe.window_features(x)
    np.testing.assert_allclose(win[8:-8], clip[8:-8], rtol=1e-4, atol=1e-5)


def test_clip_pads_and_trims_like_omniavatar(w2v):
    """OmniAvatar normalises the audio, then zero-pads it to 640 T samples; extra audio is dropped."""
    x = noise(640 * 10 - 77)
    normalised = np.asarray(w2v.extractor(x, sampling_rate=16000).input_values, dtype=np.float32).reshape(-1)
    padded = np.zeros(640 * 14, dtype=np.float32)
    padded[: x.size] = normalised
    np.testing.assert_allclose(w2v.clip_features(x, 14), w2v._encode(padded, 14), rtol=1e-6)
    np.testing.assert_array_equal(w2v.clip_features(x, 6), w2v.clip_features(x[: 640 * 6], 6))
    assert w2v.clip_features(x, 0).shape == (0, 128)


def test_bad_input_and_config(w2v, tmp_path):
    with pytest.raises(ValueError, match="NaN or infinite"):
        w2v(np.array([0.0, np.nan] * 400, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        w2v(np.zeros((8, 640), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of 40 ms"):
        Wav2Vec2FeaturesConfig(model_dir=tmp_path, left_context_ms=100)
    with pytest.raises(ValueError, match="offline_context"):
        Wav2Vec2FeaturesConfig(model_dir=tmp_path, offline_context="full")
    with pytest.raises(FileNotFoundError, match=r"config\.json missing"):
        Wav2Vec2Features.from_pretrained("facebook/wav2vec2-base-960h")  # a hub id is not a local dir
    as_int = (noise(3200) * 32768).astype(np.int16)
    np.testing.assert_allclose(w2v(as_int), w2v(as_int.astype(np.float32) / 32768), rtol=1e-5, atol=1e-6)
    one = w2v.stream()
    for s in noise(800):
        one.push(np.array([s], dtype=np.float32))  # one-sample chunks
    assert one.frames_emitted == 0 and one.flush().shape == (2, 128)


def test_offline_context_switch(wav2vec2_dir):
    fe = Wav2Vec2Features.from_pretrained(wav2vec2_dir, offline_context="window", left_context_ms=400)
    x = noise(640 * 9)
    np.testing.assert_array_equal(fe(x), fe.window_features(x))
