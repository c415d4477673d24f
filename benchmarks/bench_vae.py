"""VAE decoder benchmark: ms per video frame, torch eager vs ONNX Runtime, and RSS over a long stream.

Prints JSON. Steady-state decode (one latent frame -> 4 video frames) is timed per backend at TINY and
at the DEMO config's 128x128; then a long stream (3750 latent frames = 10 minutes at 25 fps) is decoded
with random latents, sampling the process RSS along the way to show the state does not grow. The long
stream runs first so that the peak RSS it reports is its own.

    python -m benchmarks.bench_vae --latents 3750
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import onnxruntime as ort
import torch

from models.config import VAE_DEMO_SIZE, VIDEO_FRAMES_PER_LATENT, vae_preset
from models.onnx_vae import OnnxVaeDecoder, cached_export
from models.vae import WanVAE
from models.vae_loading import random_vae

_PAGE = resource.getpagesize()


def rss_mb() -> float:
    """Resident set size now (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _open(backend: str, vae: WanVAE, latent: int, cache_dir: Path | None, threads: int | None = None
          ) -> tuple[object, dict]:
    if backend == "torch":
        return vae, {}
    t0 = time.perf_counter()
    path, exported = cached_export(vae, latent, latent, cache_dir=cache_dir)
    export_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    dec = OnnxVaeDecoder(path, session_options=so)
    return dec, {"provider": dec.provider, "export_s": round(export_s, 2), "export_reused": not exported}


def time_decode(backend: str, vae: WanVAE, latent: int, steps: int, cache_dir: Path | None,
                threads: int | None = None) -> dict:
    dec, info = _open(backend, vae, latent, cache_dir, threads)
    g = torch.Generator().manual_seed(0)
    state = dec.init_state(1, latent, latent)
    t0 = time.perf_counter()
    _, state = dec.decode_step(state, torch.randn(1, 16, 1, latent, latent, generator=g))
    first_ms = 1e3 * (time.perf_counter() - t0)
    _, state = dec.decode_step(state, torch.randn(1, 16, 1, latent, latent, generator=g))  # warm-up
    ms = []
    for _ in range(steps):
        z = torch.randn(1, 16, 1, latent, latent, generator=g)
        t0 = time.perf_counter()
        _, state = dec.decode_step(state, z)
        ms.append(1e3 * (time.perf_counter() - t0))
    step = statistics.median(ms)
    return {**info, "first_latent_ms": round(first_ms, 2), "latent_step_ms_median": round(step, 2),
            "ms_per_video_frame": round(step / VIDEO_FRAMES_PER_LATENT, 3),
            "ms_per_video_frame_min": round(min(ms) / VIDEO_FRAMES_PER_LATENT, 3)}


def long_stream(backend: str, vae: WanVAE, latent: int, latents: int, cache_dir: Path | None) -> dict:
    dec, info = _open(backend, vae, latent, cache_dir)
    g = torch.Generator().manual_seed(1)
    marks = sorted({max(1, round(latents * f)) for f in (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)})
    samples = []
    state = dec.init_state(1, latent, latent)
    t0 = time.perf_counter()
    for i in range(1, latents + 1):
        _, state = dec.decode_step(state, torch.randn(1, 16, 1, latent, latent, generator=g))
        if i in marks:
            samples.append({"latent_frames": i, "stream_s": round((i - 1) * 0.16 + 0.04, 2),
                            "rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
    wall = time.perf_counter() - t0
    settled = samples[1] if len(samples) > 1 else samples[0]  # after 10 %: allocator pools warmed up
    return {**info, "latent_frames": latents, "video_seconds": round(latents * 0.16, 1),
            "wall_s": round(wall, 1), "realtime_factor": round(latents * 0.16 / wall, 2), "rss": samples,
            "rss_growth_after_10pct_mb": round(samples[-1]["rss_mb"] - settled["rss_mb"], 1),
            "peak_growth_after_10pct_mb": round(samples[-1]["peak_rss_mb"] - settled["peak_rss_mb"], 1)}


@torch.no_grad()
def run(stream_latents: int = 3750, steps: int = 20, cache_dir: str | Path | None = None,
        configs: tuple[tuple[str, int], ...] = (("tiny", 64), ("demo", VAE_DEMO_SIZE[0])),
        stream_preset: str = "tiny", stream_size: int = 32,
        stream_backends: tuple[str, ...] = ("onnx", "torch"), threads: int | None = None, seed: int = 0) -> dict:
    """`configs`: (preset, square video size) pairs to time; the stream runs at `stream_size`.

    `threads` pins torch and ONNX Runtime to the same intra-op thread count (default: each its own).
    """
    cache_dir = Path(cache_dir) if cache_dir else None
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"device": "cpu", "threads": threads or f"default (torch {torch.get_num_threads()})",
                 "onnxruntime": ort.__version__}

    # 1. long stream: RSS must stay flat with stream length
    f = vae_preset(stream_preset).spatial_factor
    vae = random_vae(vae_preset(stream_preset), seed=seed)
    out["stream"] = {"preset": stream_preset, "video": [stream_size, stream_size],
                     **{b: long_stream(b, vae, stream_size // f, stream_latents, cache_dir)
                        for b in stream_backends}}

    # 2. steady-state decode cost per video frame
    out["decode"] = []
    for name, size in configs:
        cfg = vae_preset(name)
        vae = random_vae(cfg, seed=seed)
        latent = size // cfg.spatial_factor
        row = {"preset": name, "dim": cfg.dim, "video": [size, size], "latent": [latent, latent],
               "params_decoder_m": round(sum(p.numel() for p in vae.decoder.parameters()) / 1e6, 3)}
        for backend in ("torch", "onnx"):
            row[backend] = time_decode(backend, vae, latent, steps, cache_dir, threads)
        row["onnx_speedup"] = round(row["torch"]["ms_per_video_frame"] / row["onnx"]["ms_per_video_frame"], 2)
        out["decode"].append(row)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, default=3750, help="latent frames in the long stream")
    p.add_argument("--steps", type=int, default=20, help="timed steps per backend and config")
    p.add_argument("--cache-dir", default=None, help="ONNX export cache (default ~/.cache/avatarcast)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for both backends")
    args = p.parse_args()
    print(json.dumps(run(stream_latents=args.latents, steps=args.steps, cache_dir=args.cache_dir,
                         threads=args.threads), indent=2))


if __name__ == "__main__":
    main()
