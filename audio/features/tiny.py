"""Tiny random Wav2Vec2 / Whisper checkpoints in the upstream directory layouts, for tests, benchmarks
and demos on machines without the real weights. Nothing is downloaded.

``save_tiny_wav2vec2(dir)`` writes what ``facebook/wav2vec2-base-960h`` holds (a CTC checkpoint +
``preprocessor_config.json``); ``save_tiny_whisper(dir)`` what ``openai/whisper-tiny`` holds (a
``WhisperForConditionalGeneration`` checkpoint + ``preprocessor_config.json``). Whisper's default token
ids do not fit a small vocabulary, so they are set explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audio.pcm import MODEL_SAMPLE_RATE

TINY_WAV2VEC2: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32,
)
TINY_WHISPER: dict[str, Any] = dict(
    vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
    max_source_positions=1500, max_target_positions=32,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
)


def save_tiny_wav2vec2(path: str | Path, *, seed: int = 0, do_normalize: bool = True, **overrides: Any) -> Path:
    """Write a random tiny wav2vec2 checkpoint (``overrides`` go to ``Wav2Vec2Config``)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    path = Path(path)
    Wav2Vec2ForCTC(Wav2Vec2Config(**{**TINY_WAV2VEC2, **overrides})).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=MODEL_SAMPLE_RATE, padding_value=0.0,
                             do_normalize=do_normalize, return_attention_mask=False).save_pretrained(path)
    return path


def save_tiny_whisper(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a random tiny whisper checkpoint (``overrides`` go to ``WhisperConfig``)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    path = Path(path)
    cfg = WhisperConfig(**{**TINY_WHISPER, **overrides})
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=MODEL_SAMPLE_RATE).save_pretrained(path)
    return path
