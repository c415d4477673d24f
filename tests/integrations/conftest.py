"""The voice-agent adapters' tests share one engine with random TINY weights and the drawn avatar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app.integrations.source import EngineSource
from avatar.engine import AvatarEngine, EngineOptions, ModelBundle

SPEECH = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "speech_en_us_male.wav"  # 16 kHz, speech from 0.3 s


@pytest.fixture(scope="session")
def engine():
    with AvatarEngine(ModelBundle.random("tiny", "tiny"), EngineOptions(decoder="torch", max_sessions=4)) as eng:
        yield eng


@pytest.fixture(scope="session")
def source(engine) -> EngineSource:
    return EngineSource(engine)


@pytest.fixture(scope="session")
def speech16k() -> np.ndarray:
    pcm, rate = sf.read(SPEECH, dtype="float32")
    assert rate == 16_000
    return pcm
