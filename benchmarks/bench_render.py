"""Batch rendering benchmark: real-time factor per generation mode, and local vs Ray throughput.

RTF = media seconds rendered per wall second (>1: faster than real time), per file, excluding model
loading (which happens once per worker). Throughput = media seconds of the whole batch per wall second
of the batch, including worker start-up, for 2 files on 2 workers: a local process pool (--jobs 2) and
a local Ray cluster (ray.init(num_cpus=2), 2 actors). The Ray part runs inside a fresh network namespace
with only loopback (`unshare --net`), so Ray cannot bind an outside interface; where that is not
possible it is skipped with the reason.

    python -m benchmarks.bench_render [--seconds 8] [--steps N] [--threads N] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from app.render import InProcessBackend, render_batch
from app.render_progress import QuietReporter
from app.render_worker import MODES, RenderSettings

REPO = Path(__file__).resolve().parents[1]


def _speech_like(path: Path, seconds: float, seed: int, rate: int = 16_000) -> str:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)) / rate
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + seed), 0, None) ** 0.5
    pcm = 0.25 * envelope * sum(np.sin(k * phase) / k for k in range(1, 6)) * (1 + 0.2 * rng.standard_normal(t.size))
    sf.write(path, pcm.astype(np.float32), rate, subtype="PCM_16")
    return str(path)


def _summary(manifest: dict) -> dict:
    done = [r for r in manifest["results"] if r["status"] == "done"]
    s = manifest["summary"]
    return {"files": s["done"], "failed": s["failed"], "media_s": s["media_s"], "batch_wall_s": s["wall_s"],
            "throughput_rtf": s["rtf"], "per_file_rtf": [r["rtf"] for r in done]}


def bench_modes(files: list[str], out: Path, steps: int | None, threads: int | None) -> dict:
    results = {}
    for mode in MODES:
        settings = RenderSettings(mode=mode, steps=steps, decoder="torch")
        backend = InProcessBackend(settings, threads=threads)
        t0 = time.perf_counter()
        try:
            manifest = render_batch(files[:1], out / mode, avatar="demo:0", settings=settings, backend=backend,
                                    force=True, reporter=QuietReporter())
        finally:
            backend.close()
        r = manifest["results"][0]
        results[mode] = {"rtf": r["rtf"], "frames": r["frames"], "media_s": r["duration_s"], "render_s": r["wall_s"],
                         "load_s": round(time.perf_counter() - t0 - r["wall_s"], 3),
                         "steps": steps or ("4 (causal default)" if mode == "causal" else "25 (default)"),
                         "error": r["error"]}
    return results


def bench_local(files: list[str], out: Path, workers: int) -> dict:
    manifest = render_batch(files, out, avatar="demo:0", settings=RenderSettings(decoder="torch"), jobs=workers,
                            force=True, reporter=QuietReporter())
    return _summary(manifest)


def _ray_in_namespace(files: list[str], out: Path, workers: int) -> dict:
    """This module's --ray-only entry, re-executed in a loopback-only network namespace."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return {"skipped": "needs unshare and ip for a loopback-only network namespace"}
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed (pip install 'avatarcast[ray]')"}
    cmd = " ".join([sys.executable, "-m", "benchmarks.bench_render", "--ray-only", str(out), "--workers", str(workers),
                    *files])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {cmd}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"skipped": f"Ray run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ray_only(out: str, workers: int, files: list[str]) -> dict:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    try:
        manifest = render_batch(files, out, avatar="demo:0", settings=RenderSettings(decoder="torch"), jobs=workers,
                                backend="ray", force=True, reporter=QuietReporter())
        nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    finally:
        ray.shutdown()
    return {**_summary(manifest), "ray_init_s": round(init_s, 3), "nodes": nodes}


def run(seconds: float = 8.0, steps: int | None = None, workers: int = 2, with_ray: bool = True,
        threads: int | None = None) -> dict:
    """threads: torch intra-op threads for the per-mode runs (None: torch's default, all cores). On a
    shared, oversubscribed CPU, 1 thread avoids the stalls of a thread pool whose threads get descheduled.
    The 2-worker runs always use one thread per worker (the pool sets it; Ray sets OMP_NUM_THREADS=1)."""
    with tempfile.TemporaryDirectory(prefix="bench_render_") as tmp:
        tmp = Path(tmp)
        files = [_speech_like(tmp / f"clip{i}.wav", seconds, seed=i) for i in range(2)]
        t0 = time.perf_counter()
        modes = bench_modes(files, tmp / "modes", steps, threads)
        local = bench_local(files, tmp / "local", workers)
        ray_result = _ray_in_namespace(files, tmp / "ray", workers) if with_ray else {"skipped": "--no-ray"}
        return {
            "model": "tiny (random TINY weights, 32x32)", "clip_s": seconds, "cpu_count": os.cpu_count(),
            "torch_threads_per_mode_run": threads or "default",
            "rtf_by_mode": modes,
            f"local_{len(files)}_files_{workers}_workers": local,
            f"ray_{len(files)}_files_{workers}_workers": ray_result,
            "total_s": round(time.perf_counter() - t0, 1),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each synthetic clip")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: each mode's default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the per-mode runs")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--ray-only", metavar="OUT", help=argparse.SUPPRESS)  # the namespaced child
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ray_only:
        print(json.dumps(_ray_only(a.ray_only, a.workers, a.files)))
        return
    print(json.dumps(run(seconds=a.seconds, steps=a.steps, workers=a.workers, with_ray=not a.no_ray,
                         threads=a.threads), indent=2))


if __name__ == "__main__":
    main()
