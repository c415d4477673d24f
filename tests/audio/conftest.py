"""Tiny random Wav2Vec2 / Whisper checkpoints (upstream directory layouts, nothing downloaded), the front
ends on them, and the espeak-ng speech fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio.features import Wav2Vec2Features, WhisperFeatures
from audio.features.tiny import save_tiny_wav2vec2, save_tiny_whisper

AUDIO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "audio"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a small shared CPU: one intra-op thread is ~100x faster than two contending."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def wav2vec2_dir(tmp_path_factory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="session")
def fixture_meta() -> dict:
    return json.loads((AUDIO_FIXTURES / "fixtures.json").read_text())


@pytest.fixture(scope="session")
def speech(fixture_meta) -> dict[str, np.ndarray]:
    """The committed espeak-ng fixtures as 16 kHz float32."""
    out = {}
    for name in fixture_meta:
        wav, rate = sf.read(str(AUDIO_FIXTURES / name), dtype="float32")
        assert rate == 16000
        out[name] = wav
    return out


@pytest.fixture(scope="session")
def audio_fixture_dir() -> Path:
    return AUDIO_FIXTURES


@pytest.fixture(scope="session")
def chunker():
    """``chunker(x, rng, max_chunk)``: split audio into random pieces (empty and 1-sample ones too)."""
    return random_chunks


def random_chunks(x: np.ndarray, rng: np.random.Generator, max_chunk: int = 2000):
    """Split ``x`` into random pieces, including empty and one-sample ones."""
    i = 0
    while i < x.size:
        kind = rng.integers(0, 6)
        n = 0 if kind == 0 else 1 if kind == 1 else int(rng.integers(2, max_chunk))
        yield x[i:i + n]
        i += n


# ---- the pretrained front ends on those checkpoints, as the streaming tests configure them --------------
@pytest.fixture(scope="module")
def w2v(wav2vec2_dir) -> Wav2Vec2Features:
    return Wav2Vec2Features.from_pretrained(wav2vec2_dir, left_context_ms=400, lookahead_ms=120, chunk_frames=4)


@pytest.fixture(scope="module")
def wh(whisper_dir) -> WhisperFeatures:
    return WhisperFeatures.from_pretrained(whisper_dir, left_context_ms=400, lookahead_ms=160, chunk_frames=4)
