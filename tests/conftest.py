"""Shared test setup: offline hub, deterministic CPU math, the oracle directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True)


ORACLES = Path(__file__).resolve().parent / "fixtures" / "oracles"  # copies of the upstream oracles
FIXTURES = Path(__file__).resolve().parent / "fixtures"


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


def _randomize(module: torch.nn.Module, scale: float = 0.05, seed: int = 1, skip: tuple[str, ...] = ()):
    """Perturb every parameter in place (fresh Wan init has a zero head: outputs would all be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip) if skip else True:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


@pytest.fixture(scope="session")
def randomize():
    return _randomize


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
