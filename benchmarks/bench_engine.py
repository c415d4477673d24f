"""Engine benchmark: per-block cost over a long session, memory, latency budget, real-time factor;
and (--batched) what batching sessions' blocks into one DiT call buys.

One session is driven through the real engine thread with synthetic speech (non-realtime: as fast as
it can go). Prints JSON: per-block ms (first 50 vs last 50 blocks), RSS sampled along the stream, the
latency budget by stage, and the real-time factor (video seconds per wall second).

--batched: the demo model (its engine defaults) with 1, 2 and 4 sessions, `max_batch` 1 vs the session
count, in the same run: the DiT alone (frames/s of `CausalGenerator.generate_blocks` vs the same blocks
one session at a time) and the whole engine (frames/s of every session's stream, decode included).

    python -m benchmarks.bench_engine --blocks 500 --preset tiny
    python -m benchmarks.bench_engine --batched
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import psutil
import torch

from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
from avatar.generator import CausalGenerator, CausalOptions, Conditions
from avatar.session import SessionOptions
from avatar.types import AvatarFrame, SegmentEnd


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


# ---- batched generation ------------------------------------------------------------------------------
def _demo_sessions(bundle, count: int, seed: int = 0) -> list[Conditions]:
    """`count` different avatars for the demo model: random reference latents with its motion condition."""
    g = torch.Generator().manual_seed(seed)
    h, w = (x // bundle.vae.cfg.spatial_factor for x in bundle.frame_hw)
    motion = 0.25 if bundle.dit.cfg.motion_condition else None
    device = next(bundle.dit.parameters()).device
    return [Conditions(reference=torch.randn(1, bundle.vae.cfg.z_dim, 1, h, w, generator=g).to(device), motion=motion)
            for _ in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: a block is done when the device says so
        torch.cuda.synchronize(device)


@torch.no_grad()
def dit_throughput(bundle, options: EngineOptions, counts: tuple[int, ...], blocks: int) -> dict[str, dict]:
    """Video frames/s of the DiT alone, for each session count: the sessions' next blocks one session at a
    time and in one batched call per pass. Every configuration advances one block per round, round after
    round, so a machine whose load drifts slows them all alike. The sessions start a block apart, so a
    batch holds different block indices, as a live engine's does."""
    gen = CausalGenerator(bundle.dit, options.causal)
    n, dim = options.causal.block_frames, bundle.dit.cfg.audio_dim
    device = next(bundle.dit.parameters()).device

    def streams(count: int) -> list:
        states = []
        for i, cond in enumerate(_demo_sessions(bundle, count)):
            st = gen.init_state(cond, seed=i)
            gen.prefill_reference(st, torch.zeros(1, 1, 4, dim, device=device))
            for _ in range(i):  # stagger the sessions
                gen.generate_block(st, torch.zeros(1, n, 4, dim, device=device))
            states.append(st)
        return states

    runs = {(c, batched): streams(c) for c in counts for batched in (False, True)}
    audio = [torch.randn(1, n, 4, dim).to(device) for _ in range(max(counts))]
    wall = dict.fromkeys(runs, 0.0)
    for _ in range(blocks):
        for (c, batched), states in runs.items():
            t0 = time.perf_counter()
            if batched:
                gen.generate_blocks(states, audio[:c])
            else:
                for st, a in zip(states, audio):
                    gen.generate_block(st, a)
            _sync(device)
            wall[(c, batched)] += time.perf_counter() - t0
    out = {}
    for c in counts:
        one, many = (c * blocks * n * 4 / wall[(c, b)] for b in (False, True))
        out[str(c)] = {"one_at_a_time": round(one, 1), "batched": round(many, 1), "speedup": round(many / one, 3)}
    return out


async def _stream_all(engine: AvatarEngine, conds: list[Conditions], seconds: float) -> tuple[int, float]:
    """Every session speaks `seconds` of audio (all pushed up front); returns (frames, wall seconds)."""
    t0 = time.perf_counter()
    sessions = [engine.open_session(c, SessionOptions(realtime=False, seed=i)) for i, c in enumerate(conds)]
    for s in sessions:
        s.push_audio(_speech(seconds), 16_000)
        s.end_segment()

    async def collect(s) -> int:
        n = 0
        async for item in s:
            n += isinstance(item, AvatarFrame)
            if isinstance(item, SegmentEnd):
                break
        s.close()
        return n

    frames = await asyncio.gather(*(collect(s) for s in sessions))
    return sum(frames), time.perf_counter() - t0


def run_batched(counts: tuple[int, ...] = (1, 2, 4), dit_blocks: int = 20, seconds: float = 6.0,
                threads: int | None = None, device: str = "cpu", decoder: str = "auto") -> dict:
    from app.render_worker import load_models
    from avatar.engine import preset_options

    if threads:
        torch.set_num_threads(threads)
    bundle = load_models("demo", device=device)
    base = preset_options("demo", warmup=True, decoder=decoder)
    out: dict = {"model": bundle.name, "device": str(next(bundle.dit.parameters()).device), "decoder": decoder,
                 "threads": torch.get_num_threads(),
                 "causal": {"block_frames": base.causal.block_frames, "window_frames": base.causal.window_frames,
                            "steps": len(base.causal.steps), "guidance_passes": base.causal.guidance.passes},
                 "dit_fps": {}, "engine_fps": {}}
    dit_throughput(bundle, base, (2,), 1)  # warm both paths' allocations
    out["dit_fps"] = dit_throughput(bundle, base, counts, dit_blocks)
    for c in counts:
        row = {}
        for name, max_batch in (("one_at_a_time", 1), ("batched", c)):
            with AvatarEngine(bundle, replace(base, max_batch=max_batch, max_sessions=max(c, 1))) as eng:
                frames, wall = asyncio.run(_stream_all(eng, _demo_sessions(bundle, c), seconds))
                row[name] = round(frames / wall, 1)
                row[f"{name}_batch_sizes"] = {str(k): v for k, v in sorted(eng.batch_sizes.items())}
        row["speedup"] = round(row["batched"] / row["one_at_a_time"], 3)
        out["engine_fps"][str(c)] = row
    if 1 in counts and 4 in counts:  # the target: 4 sessions batched >= 1.3x one session's frames/s
        dit = out["dit_fps"]
        out["dit_4_batched_over_1_session"] = round(dit["4"]["batched"] / dit["1"]["one_at_a_time"], 3)
        out["engine_4_batched_over_1_session"] = round(
            out["engine_fps"]["4"]["batched"] / out["engine_fps"]["1"]["one_at_a_time"], 3)
    out["load_average_1min"] = round(psutil.getloadavg()[0], 2)  # other work on the machine skews engine runs
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=500)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vae", default="tiny")
    p.add_argument("--size", type=int, default=32, help="square frame size in pixels")
    p.add_argument("--batched", action="store_true", help="demo model, 1/2/4 sessions, batched vs one at a time")
    p.add_argument("--seconds", type=float, default=6.0, help="--batched: speech per session")
    p.add_argument("--dit-blocks", type=int, default=20, help="--batched: blocks per session, DiT alone")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the library's)")
    p.add_argument("--device", default="cpu", help="--batched: cpu | cuda | auto")
    p.add_argument("--counts", default="1,2,4", help="--batched: session counts")
    p.add_argument("--decoder", default="auto", help="--batched: the engine's VAE decoder (auto | onnx | torch)")
    a = p.parse_args()
    if a.batched:
        counts = tuple(int(c) for c in a.counts.split(","))
        print(json.dumps(run_batched(counts, dit_blocks=a.dit_blocks, seconds=a.seconds, threads=a.threads,
                                     device=a.device, decoder=a.decoder), indent=2))
        return
    print(json.dumps(run(blocks=a.blocks, preset=a.preset, vae=a.vae, height=a.size, width=a.size), indent=2))


if __name__ == "__main__":
    main()
