"""Helpers shared by test modules (`from helpers import ...`: pytest puts tests/ on sys.path for its
conftest.py). Fixtures live in conftest.py; plain functions and paths live here, under a module name of
their own: `from conftest import ...` would get whichever of the several conftest.py files came first."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms on the running loop; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def decode_interleaved(streams: list[tuple[object, torch.Tensor]]) -> list[torch.Tensor]:
    """Decode several latent streams one latent frame at a time, round robin, each with its own state.

    streams: [(decoder with init_state / decode_step, latents (B, 16, T, h, w))], every T the same
    -> [video (B, 3, 4T - 3, 8h, 8w)] per stream. Equal to decoding each stream alone unless the
    decoders' states leak into each other."""
    frames = {z.shape[2] for _, z in streams}
    if len(frames) != 1:
        raise ValueError(f"the streams must have the same number of latent frames, got {sorted(frames)}")
    states = [decoder.init_state(z.shape[0], z.shape[-2], z.shape[-1]) for decoder, z in streams]
    out: list[list[torch.Tensor]] = [[] for _ in streams]
    for t in range(frames.pop()):
        for i, (decoder, z) in enumerate(streams):
            video, states[i] = decoder.decode_step(states[i], z[:, :, t:t + 1])
            out[i].append(video)
    return [torch.cat(parts, 2) for parts in out]


def noise(n: int, seed: int = 0) -> np.ndarray:
    """n samples of seeded white noise at -20 dBFS-ish (std 0.1), float32: audio with no structure."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def randomize_parameters(module: torch.nn.Module, scale: float = 0.05, seed: int = 1,
                         skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Perturb every parameter in place (fresh Wan init has a zero head: outputs would all be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip) if skip else True:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


def mouth_boxes(frame_hw: tuple[int, int], folder: Path) -> list[tuple[int, int, int, int]]:
    """Per face of an `avatar new` folder, its mouth region in a video frame of `frame_hw`: the lower middle
    of its face box from avatar.json, scaled from the portrait into the frame."""
    import json

    from PIL import Image

    spec = json.loads((folder / "avatar.json").read_text())
    with Image.open(folder / spec["portrait"]) as im:
        sy, sx = frame_hw[0] / im.height, frame_hw[1] / im.width
    boxes = []
    for x0, y0, x1, y1 in spec["faces"]:
        w, h = x1 - x0, y1 - y0
        boxes.append((int((x0 + 0.25 * w) * sx), int((y0 + 0.65 * h) * sy), int((x1 - 0.25 * w) * sx), int(y1 * sy)))
    return boxes


def mouth_motion(frames: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean absolute frame-to-frame change in a region of (T, H, W, 3) frames, in grey levels."""
    x0, y0, x1, y1 = box
    return float(np.abs(np.diff(frames[:, y0:y1, x0:x1].astype(np.float32), axis=0)).mean())
