"""DiT benchmark: forward throughput, and per-block cost with the KV cache vs recomputing the context.

Prints JSON. The cached cost per block must stay flat over a long stream (rolling window + sink), while
recomputing the whole causal context grows with its length.

    python -m benchmarks.bench_dit --blocks 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models.attention import block_causal_frame_mask
from models.config import dit_preset
from models.dit import WanDiT


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def run(blocks: int = 200, preset: str = "tiny", block_frames: int = 3, sink_frames: int = 1,
        window_frames: int = 6, latent_hw: int = 8, recompute_at: tuple[int, ...] = (1, 5, 10, 20, 40),
        seed: int = 0) -> dict:
    cfg = dit_preset(preset)
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    h = w = latent_hw
    tpf = cfg.tokens_per_frame(h, w)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    extra_ch = cfg.in_dim - cfg.out_dim

    def inputs(frames):
        x = torch.randn(1, cfg.out_dim, frames, h, w)
        y = torch.randn(1, extra_ch, frames, h, w) if extra_ch else None
        audio = torch.randn(1, frames, 4, cfg.audio_dim) if cfg.audio_dim else None
        return x, y, audio

    # 1. throughput of a plain forward
    frames = 9
    x, y, audio = inputs(frames)
    t = torch.tensor([500.0])
    model(x, t, ctx, y=y, audio=audio)  # warm-up
    reps = 5
    secs = _timed(lambda: [model(x, t, ctx, y=y, audio=audio) for _ in range(reps)])
    tokens_per_s = reps * frames * tpf / secs

    # 2. per-block cost through the cache, blocks 1..N (one forward per block)
    cache = model.init_cache(1, h, w, sink_frames=sink_frames, window_frames=window_frames,
                             block_frames=block_frames)
    cached_ms = []
    for k in range(blocks):
        x, y, audio = inputs(block_frames)
        cached_ms.append(1e3 * _timed(lambda: model(x, t, ctx, y=y, audio=audio, cache=cache,
                                                     start_frame=k * block_frames)))

    # 3. per-block cost when the whole causal context is recomputed for each new block
    recompute_ms = {}
    for k in recompute_at:
        n = k * block_frames
        x, y, audio = inputs(n)
        mask = block_causal_frame_mask(n, block_frames)
        recompute_ms[k] = 1e3 * _timed(lambda: model(x, t, ctx, y=y, audio=audio, frame_mask=mask))

    warm = max(1, (sink_frames + window_frames) // block_frames + 1)  # blocks until the window is full
    first = statistics.median(cached_ms[warm:warm + 10])
    last = statistics.median(cached_ms[-10:])
    return {
        "preset": cfg.name,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "latent_grid": [h, w],
        "tokens_per_frame": tpf,
        "forward_tokens_per_s": round(tokens_per_s, 1),
        "block_frames": block_frames,
        "sink_frames": sink_frames,
        "window_frames": window_frames,
        "cached_block_ms": {"first_median": round(first, 3), "last_median": round(last, 3),
                            "last_over_first": round(last / first, 3), "blocks": blocks,
                            "min": round(min(cached_ms), 3), "max": round(max(cached_ms), 3)},
        "recompute_block_ms": {str(k): round(v, 3) for k, v in recompute_ms.items()},
        "recompute_growth": round(recompute_ms[max(recompute_at)] / recompute_ms[min(recompute_at)], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=200)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    print(json.dumps(run(blocks=args.blocks, preset=args.preset), indent=2))


if __name__ == "__main__":
    main()
