"""WhisperFeatures (HunyuanVideo-Avatar / Sonic layout) with tiny random checkpoints loaded offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio.features import WhisperFeatures, WhisperFeaturesConfig
from audio.features.tiny import save_tiny_whisper

from helpers import noise


def upstream_encode_audio(model_dir, wav: np.ndarray, num_frames: int) -> np.ndarray:
    """HunyuanVideo-Avatar's get_audio_feature + encode_audio (fps 25), written against transformers."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    fe = WhisperFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
    encoder = WhisperModel.from_pretrained(model_dir, local_files_only=True).get_encoder().eval()
    window = 750 * 640
    mel = torch.cat([fe(wav[i:i + window], sampling_rate=16000, return_tensors="pt").input_features
                     for i in range(0, len(wav), window)], dim=-1)
    with torch.no_grad():
        states = encoder(mel[:, :, :3000], output_hidden_states=True).hidden_states
    feats = torch.stack(states, dim=2)
    feats = torch.cat([torch.zeros_like(feats[:, :4]), feats], 1)
    clips = [feats[:, 2 * f: 2 * f + 10] for f in range(num_frames)]
    return torch.stack(clips, 1)[0].numpy()  # (T, 10, layers + 1, d)


def test_dimensions(wh):
    assert wh.feature_shape == (10, 3, 32) and wh.feature_dim == 960
    assert (10 * 5 * 384) == 19200  # whisper-tiny by the same rule: 4 layers + embedding, d_model 384
    positions = (400 + 4 * 40 + 160) // 20
    assert wh.window_encoder.config.max_source_positions == positions
    assert wh.encoder.config.max_source_positions == 1500


def test_clip_matches_upstream(wh, whisper_dir, speech):
    wav = speech["speech_en_gb_female.wav"][: 16000 * 5 + 99]
    t = len(wav) // 640  # upstream's frame count
    ref = upstream_encode_audio(whisper_dir, wav, t)
    ours = wh.clip_features(wav, t).reshape(t, *wh.feature_shape)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours[0, :4], 0.0)  # the 4 leading zero frames
    np.testing.assert_array_equal(ours[1, :2], 0.0)


def test_sliced_encoder_keeps_the_pretrained_weights(wh):
    full, short = wh.encoder.state_dict(), wh.window_encoder.state_dict()
    assert full.keys() == short.keys()
    p = wh.window_encoder.config.max_source_positions
    for key in full:
        expected = full[key][:p] if key == "embed_positions.weight" else full[key]
        torch.testing.assert_close(short[key], expected, rtol=0, atol=0)
    mel = torch.zeros(1, 80, 2 * p)
    with torch.no_grad():
        assert wh.window_encoder(mel).last_hidden_state.shape == (1, p, 32)  # the 30 s check passes


def test_window_equals_clip_when_the_model_is_local(tmp_path):
    """Zero the attention output and the position table: the encoder becomes local and shift-invariant,
    so windows must reproduce the clip wherever the window covers the receptive field. This pins the
    sample / mel / encoder-frame / video-frame index arithmetic of the streaming path."""
    from transformers import WhisperForConditionalGeneration

    d = save_tiny_whisper(tmp_path / "local")
    model = WhisperForConditionalGeneration.from_pretrained(d, local_files_only=True)
    enc = model.model.encoder
    for layer in enc.layers:
        torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.self_attn.out_proj.bias)
    with torch.no_grad():
        enc.embed_positions.weight.zero_()
    model.save_pretrained(d)
    fe = WhisperFeatures.from_pretrained(d, left_context_ms=160, lookahead_ms=160)
    x = noise(640 * 30)
    clip, win = fe.clip_features(x), fe.window_features(x)
    # frames 0-2 see the first encoder frames, whose mel the clip reflect-pads at the audio start while
    # the window sees zeros before it; the last frames see the end of the audio
    np.testing.assert_allclose(win[3:-4], clip[3:-4], rtol=1e-4, atol=1e-4)


def test_stream_timing(wh):
    assert wh.lookahead_ms == 160 and wh.timing.max_wait_ms == 280
    stream = wh.stream()
    need = 640 * 4 + 160 * 16
    x = noise(need)
    assert stream.push(x[:-1]).shape[0] == 0
    assert stream.push(x[-1:]).shape[0] == 4


def test_long_clip_continues_past_30_s(wh):
    x = noise(16000 * 31, seed=3)
    feats = wh.clip_features(x)
    assert feats.shape == (775, 960) and np.isfinite(feats).all()


def test_bad_config_and_input(wh, tmp_path):
    with pytest.raises(ValueError, match=">= 80 ms"):
        WhisperFeaturesConfig(model_dir=tmp_path, lookahead_ms=40)
    with pytest.raises(ValueError, match=">= 80 ms"):
        WhisperFeaturesConfig(model_dir=tmp_path, left_context_ms=40)
    small = save_tiny_whisper(tmp_path / "small", max_source_positions=40)
    with pytest.raises(ValueError, match=r"needs 66 encoder positions; the model has 40 \(0\.8 s\)"):
        WhisperFeatures.from_pretrained(small, left_context_ms=1000)
    with pytest.raises(ValueError, match="NaN or infinite"):
        wh(np.full(640, np.inf, dtype=np.float32))
    with pytest.raises(FileNotFoundError):
        WhisperFeatures.from_pretrained(tmp_path / "nothing-here")
