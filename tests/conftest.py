"""Shared test setup: offline hub, deterministic CPU math, the oracle directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True)

from helpers import FIXTURES, randomize_parameters  # noqa: E402

ORACLES = FIXTURES / "oracles"  # copies of the upstream oracles


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def oracles() -> Path:
    return ORACLES


@pytest.fixture(scope="session")
def randomize():
    return randomize_parameters


# ---- the live engine the server, WebRTC, broadcast and console tests share -----------------------------------
@pytest.fixture(scope="module")
def engine():
    """Random TINY models behind the live defaults (12-frame causal blocks), two sessions, the torch VAE
    decoder (no ONNX export in tests); one per test module. A module that needs other options defines
    its own `engine`."""
    from avatar.engine import AvatarEngine, EngineOptions, ModelBundle

    with AvatarEngine(ModelBundle.random("tiny", "tiny"), EngineOptions(max_sessions=2, decoder="torch")) as eng:
        yield eng


@pytest.fixture(scope="module")
def backend(engine):
    """What the server serves from `engine`: the built-in avatars prepared on it."""
    from app.avatars import EngineBackend, prepare_avatars

    avatars, default = prepare_avatars(engine)
    return EngineBackend(engine, avatars, default)
