"""Engine benchmark: per-block cost over a long session, memory, latency budget, real-time factor.

One session is driven through the real engine thread with synthetic speech (non-realtime: as fast as
it can go). Prints JSON: per-block ms (first 50 vs last 50 blocks), RSS sampled along the stream, the
latency budget by stage, and the real-time factor (video seconds per wall second).

    python -m benchmarks.bench_engine --blocks 500 --preset tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np
import psutil
import torch

from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
from avatar.generator import CausalOptions, Conditions
from avatar.session import SessionOptions
from avatar.types import AvatarFrame


def _speech(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 * (1 + np.sin(2 * np.pi * 2.5 * t))
    return (0.3 * env * np.sin(2 * np.pi * 180 * t)).astype(np.float32)


async def _drive(engine: AvatarEngine, cond: Conditions, blocks: int, block_frames: int) -> dict:
    frames_per_block = 4 * block_frames
    total_frames = 1 + blocks * frames_per_block
    session = engine.open_session(cond, SessionOptions(realtime=False, max_pending_frames=4 * frames_per_block))
    proc = psutil.Process()
    block_ms, rss = [], []
    t0 = time.perf_counter()
    second = 16_000
    pushed = 0

    async def feed():
        nonlocal pushed
        chunk = _speech(1.0)
        while pushed < total_frames * 640:  # keep a few seconds ahead of generation, like a TTS stream
            if pushed - session.next_video * 640 < 4 * second:
                session.push_audio(chunk, 16_000)
                pushed += chunk.size
            await asyncio.sleep(0.002)
        session.end_segment()

    feeder = asyncio.create_task(feed())
    async for item in session:
        if not isinstance(item, AvatarFrame):
            continue
        if item.pts >= 1 and (item.pts - 1) % frames_per_block == 0:  # first frame of a block
            t = item.timing
            block_ms.append(t.features_ms + t.denoise_ms + t.decode_ms)
            if len(block_ms) % 50 == 0:
                rss.append(proc.memory_info().rss / 2**20)
        if item.pts + 1 >= total_frames:
            break
    wall = time.perf_counter() - t0
    await feeder
    budget = engine.latency_budget()
    session.close()
    return {"block_ms": block_ms, "rss_mib": rss, "wall_s": wall, "frames": total_frames, "budget": budget}


def run(blocks: int = 500, preset: str = "tiny", vae: str = "tiny", height: int = 32, width: int = 32,
        block_frames: int = 3, steps: tuple[int, ...] = (1000, 750, 500, 250)) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = ModelBundle.random(preset, vae, seed=0)
    options = EngineOptions(causal=CausalOptions(block_frames=block_frames, sink_frames=1, window_frames=6,
                                                 steps=steps))
    cond = Conditions(reference=torch.randn(1, 16, 1, height // 8, width // 8))
    with AvatarEngine(bundle, options) as engine:
        r = asyncio.run(_drive(engine, cond, blocks, block_frames))
    ms = r["block_ms"]
    first, last = statistics.median(ms[:50]), statistics.median(ms[-50:])
    video_s = r["frames"] / 25
    return {
        "preset": preset, "vae": vae, "resolution": [height, width], "device": "cpu",
        "threads": torch.get_num_threads(), "blocks": len(ms), "block_frames": block_frames,
        "steps": len(steps),
        "block_ms": {"first50_median": round(first, 2), "last50_median": round(last, 2),
                     "last_over_first": round(last / first, 3), "min": round(min(ms), 2), "max": round(max(ms), 2)},
        "rss_mib_every_50_blocks": [round(x, 1) for x in r["rss_mib"]],
        "rss_growth_mib": round(r["rss_mib"][-1] - r["rss_mib"][0], 1) if r["rss_mib"] else None,
        "latency_budget_ms": r["budget"],
        "real_time_factor": round(video_s / r["wall_s"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=500)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vae", default="tiny")
    p.add_argument("--size", type=int, default=32, help="square frame size in pixels")
    a = p.parse_args()
    print(json.dumps(run(blocks=a.blocks, preset=a.preset, vae=a.vae, height=a.size, width=a.size), indent=2))


if __name__ == "__main__":
    main()
