"""GPU smoke benchmark: the real-size live path on one CUDA device, random weights; prints JSON.

Phases, each timed and reported on its own (one failing never loses the others' figures):

  env          device, versions, ONNX Runtime providers, whether the project's modules import
  dit_causal   one session through the live generator (`CausalGenerator`: few denoising steps against
               the KV cache, then the clean-context pass), with 1 and 2 guidance passes: block ms, fps
  dit_batched  B = 1/2/4/8 sessions' blocks stacked on the batch dimension, one KV cache of batch B
               (each row one session's cache): block ms, fps per session, aggregate fps; then a parity
               check of the stacked call against `CausalGenerator` run one session at a time
  vae_onnx     the Wan2.1 VAE decoder exported to ONNX at the frame size and decoded latent by latent on
               the CUDAExecutionProvider (the provider that really ran is read from the session)
  vae_torch    the same decoder in torch on the device, float32 and the run's dtype, for comparison

Default geometry: OmniAvatar-1.3B (Wan2.1-1.3B + audio path) at 512x512, bfloat16, the engine's causal
settings for Wan 1.3B (3-latent blocks, 12-latent window, 4 steps). GPU memory is the phase's
`torch.cuda.max_memory_allocated`. Nothing is downloaded and nothing is installed.

    python benchmarks/gpu_smoke.py --out smoke.json            # CUDA machine, well under 10 minutes
    python benchmarks/gpu_smoke.py --phases env,dit_batched --batches 1,4
    python benchmarks/gpu_smoke.py --cpu-check                 # same code paths, TINY at 32x32 on CPU

Exit status: 0 all selected phases ran, 1 some phase failed (its error is in the JSON), 2 it cannot run
here (no CUDA device without --cpu-check, torch missing, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_smoke.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

try:
    import torch
except Exception as exc:  # reported as JSON by main()
    torch = None
    TORCH_ERROR = f"{type(exc).__name__}: {exc}"

PHASES = ("env", "dit_causal", "dit_batched", "vae_onnx", "vae_torch")
PROJECT_MODULES = ("models.config", "models.kv_cache", "models.dit", "avatar.generator", "models.vae",
                   "models.vae_loading", "models.onnx_vae", "benchmarks.stacked_sessions")
VIDEO_FPS = 25
FRAMES_PER_LATENT = 4  # a later latent frame decodes to 4 video frames (models.config.VIDEO_FRAMES_PER_LATENT)


@dataclass(frozen=True)
class SmokeConfig:
    """What one run measures. GPU_RUN is the real geometry; CPU_CHECK runs the same code paths tiny."""

    device: str
    dtype: str  # torch dtype name of the DiT (and of the second torch VAE run)
    dit_preset: str
    vae_preset: str
    size: int  # square frame, pixels
    block_frames: int = 3  # the engine's causal defaults for Wan 1.3B (avatar/engine.py PRESET_DEFAULTS)
    window_frames: int = 12
    sink_frames: int = 1
    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    batches: tuple[int, ...] = (1, 2, 4, 8)
    timed_blocks: int = 5  # per measurement, after the warm-up blocks
    parity_blocks: int = 5  # enough for the ring to wrap: (window / block) + 1
    vae_warmup: int = 2
    vae_steps: int = 10
    text_rows: int = 16  # rows of random text context (the DiT pads them to text_len)
    seed: int = 0

    @property
    def warmup_blocks(self) -> int:
        """Blocks before the cost is steady: the cold first one, and until the window is full."""
        return max(1, math.ceil(self.window_frames / self.block_frames))

    @property
    def frames_per_block(self) -> int:
        return FRAMES_PER_LATENT * self.block_frames


GPU_RUN = SmokeConfig(device="cuda", dtype="bfloat16", dit_preset="omniavatar-1.3b", vae_preset="wan2.1", size=512)
CPU_CHECK = SmokeConfig(device="cpu", dtype="float32", dit_preset="tiny", vae_preset="tiny", size=32,
                        window_frames=6, batches=(1, 2), timed_blocks=2, parity_blocks=3, vae_warmup=1,
                        vae_steps=2)


def _error(exc: BaseException) -> dict:
    tb = traceback.format_exc()
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tb[-3000:]}


def _has_error(d) -> bool:
    if isinstance(d, dict):
        return d.get("status") == "error" or any(_has_error(v) for v in d.values())
    return False


def _peaks(d) -> list[float]:
    """Every `gpu_mem_mib.peak` in a (nested) result."""
    if not isinstance(d, dict):
        return []
    own = [d["gpu_mem_mib"]["peak"]] if isinstance(d.get("gpu_mem_mib"), dict) else []
    return own + [x for v in d.values() if v is not d.get("gpu_mem_mib") for x in _peaks(v)]


def _stats(ms: list[float], prefix: str) -> dict:
    return {f"{prefix}_median": round(statistics.median(ms), 3), f"{prefix}_min": round(min(ms), 3),
            f"{prefix}_max": round(max(ms), 3)}


def _mib(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)


class Smoke:
    """One run: the config, the clock and budget, the JSON report, the DiT shared by the DiT phases."""

    def __init__(self, cfg: SmokeConfig, mode: str, budget_s: float, out: Path | None) -> None:
        self.cfg, self.budget_s, self.out = cfg, budget_s, out
        self.t0 = time.perf_counter()
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.report: dict = {"benchmark": "gpu_smoke", "mode": mode, "config": asdict(cfg),
                             "budget_s": budget_s, "phases": {}}
        self._dit = None
        self.dit_info: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def log(self, msg: str) -> None:
        print(f"[gpu_smoke {self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def mem_begin(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def mem_end(self, start: int) -> dict:
        """torch's allocations (start, peak, end) and the device's use by everyone (ONNX Runtime's too)."""
        if not self.cuda:
            return {}
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return {"gpu_mem_mib": {"at_start": _mib(start), "peak": _mib(torch.cuda.max_memory_allocated(self.device)),
                                "at_end": _mib(torch.cuda.memory_allocated(self.device)),
                                "device_used": _mib(total - free)}}

    # ---- phases -------------------------------------------------------------------------------
    def run_phase(self, name: str, fn) -> None:
        if self.over_budget() and name != "env":  # env costs nothing and explains every other figure
            self.report["phases"][name] = {"status": "skipped", "reason": f"wall budget of {self.budget_s:g} s "
                                           f"spent ({self.elapsed():.0f} s)"}
            self.log(f"{name}: skipped (budget)")
            self.save()
            return
        if name.startswith("vae"):
            self.release_dit()
        t0 = time.perf_counter()
        start = 0
        try:
            start = self.mem_begin()
            result = fn(self)
            result.setdefault("status", "error" if _has_error(result) else "ok")
        except Exception as exc:  # one phase failing must not lose the others' figures
            result = _error(exc)
        try:
            result.update(self.mem_end(start))
            if "gpu_mem_mib" in result:  # measurements inside the phase reset the peak: the phase's is the max
                result["gpu_mem_mib"]["peak"] = max(_peaks(result))
        except Exception as exc:  # a broken CUDA context: keep the phase's own result
            result["gpu_mem_error"] = f"{type(exc).__name__}: {exc}"
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        self.report["phases"][name] = result
        self.log(f"{name}: {result['status']} in {result['wall_s']} s"
                 + (f" ({result['error']})" if result.get("error") else ""))
        if self.cuda and result["status"] == "error":
            try:
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - the next phase will report a broken device itself
                self.log(f"empty_cache after {name} failed: {exc}")
        self.save()

    def save(self) -> None:
        """Rewrite --out after every phase, so a run killed from outside still leaves its figures."""
        if self.out is None:
            return
        self.report["total_s"] = round(self.elapsed(), 2)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.report, indent=2))
            os.replace(tmp, self.out)
        except OSError as exc:  # stdout still gets the report
            self.log(f"cannot write {self.out}: {exc}")

    def finish(self) -> dict:
        phases = self.report["phases"]
        self.report["total_s"] = round(self.elapsed(), 2)
        self.report.setdefault("ok", not any(p.get("status") == "error" for p in phases.values()))
        self.report["summary"] = summarize(phases)
        self.save()
        return self.report

    # ---- the DiT shared by the DiT phases -----------------------------------------------------
    def dit(self):
        if self._dit is None:
            from models.config import dit_preset
            from models.dit import WanDiT

            cfg = dit_preset(self.cfg.dit_preset)
            t0 = time.perf_counter()
            torch.manual_seed(self.cfg.seed)
            with torch.device(self.device):  # initialise on the device: 1.3B parameters in seconds
                dit = WanDiT(cfg)
            with torch.no_grad():
                for p in dit.parameters():
                    if not bool(p.any()):  # Wan's zero-initialised head (and biases, gates): outputs would be 0
                        p.normal_(0.0, 0.02)
            self._dit = dit.to(self.dtype).eval()
            self.sync()
            params = sum(p.numel() for p in dit.parameters())
            self.dit_info = {"preset": cfg.name, "params_m": round(params / 1e6, 1), "dtype": self.cfg.dtype,
                             "weights_mib": _mib(sum(p.numel() * p.element_size() for p in dit.parameters())),
                             "build_s": round(time.perf_counter() - t0, 2),
                             "lora": "not applied (a merged LoRA costs nothing per step)"}
        return self._dit

    def release_dit(self) -> None:
        if self._dit is not None:
            self._dit = None
            if self.cuda:
                torch.cuda.empty_cache()

    @property
    def latent_hw(self) -> tuple[int, int]:
        from models.config import vae_preset

        f = vae_preset(self.cfg.vae_preset).spatial_factor
        return self.cfg.size // f, self.cfg.size // f

    def causal_options(self):
        from avatar.generator import CausalOptions

        c = self.cfg
        return CausalOptions(block_frames=c.block_frames, sink_frames=c.sink_frames, window_frames=c.window_frames,
                             steps=c.steps, shift=c.shift)

    def sessions(self, count: int, first_seed: int) -> list:
        from benchmarks.stacked_sessions import random_sessions

        return random_sessions(self.dit().cfg, count, self.latent_hw, self.cfg.block_frames, self.cfg.text_rows,
                               first_seed, self.device)


def _cache_mib(cache) -> float:
    return _mib(2 * cache.k.numel() * cache.k.element_size())


# ---- phases --------------------------------------------------------------------------------------
def phase_env(s: Smoke) -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", device_count=torch.cuda.device_count(),
                   total_memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 check=False, capture_output=True, text=True, timeout=15)
            out["driver"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        except Exception as exc:
            out["driver"] = f"unknown ({type(exc).__name__})"
    try:
        import onnxruntime as ort

        out["onnxruntime"] = {"version": ort.__version__, "available_providers": ort.get_available_providers()}
    except Exception as exc:
        out["onnxruntime"] = {"error": f"{type(exc).__name__}: {exc}"}
    imports = {}
    for mod in PROJECT_MODULES:
        try:
            __import__(mod)
            imports[mod] = "ok"
        except Exception as exc:
            imports[mod] = f"{type(exc).__name__}: {exc}"
    out["imports"] = imports
    if any(v != "ok" for v in imports.values()):
        out.update(status="error", error="some project modules fail to import (see imports)")
    return out


def _block_figures(s: Smoke, ms: list[float], batch: int) -> dict:
    fps = s.cfg.frames_per_block * 1e3 / statistics.median(ms)
    return {**_stats(ms, "block_ms"), "timed_blocks": len(ms), "fps_per_session": round(fps, 2),
            "aggregate_fps": round(batch * fps, 2), "realtime_factor_per_session": round(fps / VIDEO_FPS, 3)}


def _causal_session(s: Smoke, guidance) -> dict:
    """One session through the live generator, exactly as the engine's worker runs it."""
    from avatar.generator import CausalGenerator, Conditions

    gen = CausalGenerator(s.dit(), replace(s.causal_options(), guidance=guidance))
    x = s.sessions(1, s.cfg.seed + 100)[0]
    start = s.mem_begin()
    state = gen.init_state(Conditions(reference=x.reference, context=x.context), seed=x.seed)
    t0 = time.perf_counter()
    gen.prefill_reference(state, x.first_audio)
    s.sync()
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    ms, cut, w = [], False, s.cfg.warmup_blocks
    for i in range(w + s.cfg.timed_blocks):
        t0 = time.perf_counter()
        x0 = gen.generate_block(state, x.audio)
        s.sync()
        ms.append(1e3 * (time.perf_counter() - t0))
        if i >= w and s.over_budget():
            cut = True
            break
    return {"status": "ok", "guidance_passes": guidance.passes, "prefill_ms": round(prefill_ms, 3),
            "first_block_ms": round(ms[0], 3), **_block_figures(s, ms[w:], 1), "cut_by_budget": cut,
            "kv_cache_mib": _cache_mib(state.cache), "finite": bool(torch.isfinite(x0).all()), **s.mem_end(start)}


def phase_dit_causal(s: Smoke) -> dict:
    from avatar.generator import Guidance

    tokens = s.dit().cfg.tokens_per_frame(*s.latent_hw) * s.cfg.block_frames
    out = {"dit": s.dit_info, "latent_hw": list(s.latent_hw), "warmup_blocks": s.cfg.warmup_blocks,
           "tokens_per_block": tokens, "dit_calls_per_block": len(s.cfg.steps) + 1,
           "video_frames_per_block": s.cfg.frames_per_block}
    # one pass (a distilled student), two (audio CFG as OmniAvatar and the demo model run it: batch 2)
    for passes, guidance in ((1, Guidance()), (2, Guidance(audio_scale=2.0))):
        try:
            out[f"passes_{passes}"] = _causal_session(s, guidance)
        except Exception as exc:
            out[f"passes_{passes}"] = _error(exc)
    return out


def _run_batch(s: Smoke, gen, b: int) -> dict:
    from benchmarks.stacked_sessions import BatchedSessions

    start = s.mem_begin()
    batched = BatchedSessions(gen, s.sessions(b, s.cfg.seed + 1000 * b))
    batched.prefill()
    w = s.cfg.warmup_blocks
    total, denoise, clean, cut = [], [], [], False
    for i in range(w + s.cfg.timed_blocks):
        x0, d_ms, c_ms = batched.block(s.sync)
        total.append(d_ms + c_ms)
        denoise.append(d_ms)
        clean.append(c_ms)
        if i >= w and s.over_budget():
            cut = True
            break
    return {"status": "ok", "first_block_ms": round(total[0], 3), **_block_figures(s, total[w:], b),
            **_stats(denoise[w:], "denoise_ms"), **_stats(clean[w:], "clean_pass_ms"), "cut_by_budget": cut,
            "kv_cache_mib": _cache_mib(batched.cache), "finite": bool(torch.isfinite(x0).all()),
            **s.mem_end(start)}


def phase_dit_batched(s: Smoke) -> dict:
    from avatar.generator import CausalGenerator

    gen = CausalGenerator(s.dit(), s.causal_options())
    per_batch = {}
    for b in s.cfg.batches:
        if s.over_budget():
            per_batch[str(b)] = {"status": "skipped", "reason": "wall budget spent"}
            continue
        try:
            per_batch[str(b)] = _run_batch(s, gen, b)
        except Exception as exc:  # an out-of-memory at B=8 keeps B=1..4
            per_batch[str(b)] = _error(exc)
            if s.cuda:
                torch.cuda.empty_cache()
        s.log(f"dit_batched B={b}: {per_batch[str(b)]['status']}")
    pb = min((b for b in s.cfg.batches if b > 1), default=2)
    try:
        if s.over_budget():
            parity = {"status": "skipped", "reason": "wall budget spent"}
        else:
            from benchmarks.stacked_sessions import stacked_vs_alone

            parity = {"status": "ok", "batch": pb, "blocks": s.cfg.parity_blocks, "dtype": s.cfg.dtype,
                      **stacked_vs_alone(gen, s.sessions(pb, s.cfg.seed + 7), s.cfg.parity_blocks, s.sync)}
    except Exception as exc:
        parity = _error(exc)
    return {"dit": s.dit_info, "warmup_blocks": s.cfg.warmup_blocks, "per_batch": per_batch,
            "parity_vs_causal_generator": parity}


def _random_vae(s: Smoke):
    from models.config import vae_preset
    from models.vae_loading import random_vae

    cfg = vae_preset(s.cfg.vae_preset)
    return random_vae(cfg, seed=s.cfg.seed), s.cfg.size // cfg.spatial_factor


def _time_decoder(s: Smoke, dec, lat: int) -> dict:
    """Stream latents through a decoder (`init_state` / `decode_step`): first, warm-up, timed."""
    g = torch.Generator().manual_seed(s.cfg.seed)
    zs = [torch.randn(1, 16, 1, lat, lat, generator=g).to(s.device)
          for _ in range(1 + s.cfg.vae_warmup + s.cfg.vae_steps)]
    state = dec.init_state(1, lat, lat)
    ms = []
    for z in zs:
        s.sync()
        t0 = time.perf_counter()
        frames, state = dec.decode_step(state, z)
        s.sync()
        ms.append(1e3 * (time.perf_counter() - t0))
    timed = ms[1 + s.cfg.vae_warmup:]
    step = statistics.median(timed)
    return {"first_latent_ms": round(ms[0], 3), **_stats(timed, "latent_ms"), "timed_latents": len(timed),
            "ms_per_video_frame": round(step / FRAMES_PER_LATENT, 3),
            "decode_fps": round(FRAMES_PER_LATENT * 1e3 / step, 1), "frames_shape": list(frames.shape),
            "frames_device": str(frames.device), "finite": bool(torch.isfinite(frames).all())}


def phase_vae_onnx(s: Smoke) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"status": "skipped", "reason": f"onnxruntime is not installed ({exc})"}
    available = ort.get_available_providers()
    out: dict = {"onnxruntime": ort.__version__, "available_providers": available}
    if s.cuda and "CUDAExecutionProvider" not in available:
        return {**out, "status": "skipped", "reason": "onnxruntime-gpu is not installed: this onnxruntime has no "
                "CUDAExecutionProvider (`make install-gpu` installs onnxruntime-gpu)"}
    if s.cuda and hasattr(ort, "preload_dlls"):  # the CUDA / cuDNN libraries torch's wheels brought
        try:
            ort.preload_dlls()
            out["preload_dlls"] = "ok"
        except Exception as exc:
            out["preload_dlls"] = f"{type(exc).__name__}: {exc}"
    from models.onnx_vae import OnnxVaeDecoder, cached_export, default_providers

    vae, lat = _random_vae(s)
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-onnx-") as tmp:
        t0 = time.perf_counter()
        path, _ = cached_export(vae, lat, lat, cache_dir=tmp)
        out.update(vae=vae.cfg.name, video=[s.cfg.size, s.cfg.size], latent=[lat, lat],
                   export_s=round(time.perf_counter() - t0, 2), graph_mib=_mib(path.stat().st_size))
        t0 = time.perf_counter()
        dec = OnnxVaeDecoder(path, providers=default_providers() if s.cuda else ["CPUExecutionProvider"])
        out.update(session_open_s=round(time.perf_counter() - t0, 2), provider=dec.provider,
                   session_providers=dec.providers)
        if s.cuda and dec.provider != "CUDAExecutionProvider":
            return {**out, "status": "error", "error": f"asked for the CUDAExecutionProvider, the session runs on "
                    f"{dec.provider}: the CUDA EP did not load (CUDA / cuDNN libraries for this onnxruntime?)"}
        out.update(_time_decoder(s, dec, lat))
    return out


def phase_vae_torch(s: Smoke) -> dict:
    vae, lat = _random_vae(s)
    out: dict = {"vae": vae.cfg.name, "video": [s.cfg.size, s.cfg.size], "latent": [lat, lat]}
    for name in dict.fromkeys(("float32", s.cfg.dtype)):
        try:
            start = s.mem_begin()
            vae = vae.to(s.device, getattr(torch, name))
            out[name] = {"status": "ok", **_time_decoder(s, vae, lat), **s.mem_end(start)}
        except Exception as exc:
            out[name] = _error(exc)
    return out


PHASE_FNS = {"env": phase_env, "dit_causal": phase_dit_causal, "dit_batched": phase_dit_batched,
             "vae_onnx": phase_vae_onnx, "vae_torch": phase_vae_torch}


def summarize(phases: dict) -> dict:
    """The headline figures in one place (each also sits in its phase)."""
    out: dict = {}
    env = phases.get("env", {})
    out["device"] = env.get("device_name", "cpu")
    causal = phases.get("dit_causal", {})
    out["causal"] = {k: {"block_ms": r["block_ms_median"], "fps": r["fps_per_session"]}
                     for k, r in causal.items() if isinstance(r, dict) and "block_ms_median" in r}
    batched = phases.get("dit_batched", {}).get("per_batch", {})
    out["batched"] = {b: {k: r[k] for k in ("block_ms_median", "fps_per_session", "aggregate_fps")}
                      for b, r in batched.items() if "block_ms_median" in r}
    onnx = phases.get("vae_onnx", {})
    if "latent_ms_median" in onnx:
        out["onnx_vae"] = {"provider": onnx["provider"], "latent_ms": onnx["latent_ms_median"],
                           "decode_fps": onnx["decode_fps"]}
    torch_vae = phases.get("vae_torch", {})
    out["torch_vae_latent_ms"] = {k: r["latent_ms_median"] for k, r in torch_vae.items()
                                  if isinstance(r, dict) and "latent_ms_median" in r}
    out["gpu_peak_mib"] = {name: p["gpu_mem_mib"]["peak"] for name, p in phases.items() if "gpu_mem_mib" in p}
    out["status"] = {name: p.get("status") for name, p in phases.items()}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-check", action="store_true", help="run the same code paths on CPU at a tiny geometry")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall budget: phases (and batch sizes) not started by then are skipped")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here, rewritten after every phase")
    p.add_argument("--batches", default=None, help="batch sizes of dit_batched, e.g. 1,2,4,8")
    p.add_argument("--size", type=int, default=None, help="square frame size in pixels")
    p.add_argument("--preset", default=None, help="DiT preset (models/config.py)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per measurement")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "cpu-check" if args.cpu_check else "gpu"
    if torch is None:
        print(json.dumps({"benchmark": "gpu_smoke", "mode": mode, "ok": False,
                          "reason": f"torch failed to import: {TORCH_ERROR}"}, indent=2))
        return 2
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in phases if x not in PHASES]
    cfg = CPU_CHECK if args.cpu_check else GPU_RUN
    try:
        given = {"batches": tuple(int(b) for b in args.batches.split(",")) if args.batches else None,
                 "size": args.size, "dit_preset": args.preset, "dtype": args.dtype, "timed_blocks": args.blocks}
        overrides = {k: v for k, v in given.items() if v is not None}
        cfg = replace(cfg, **overrides)
        if unknown or cfg.size % 16 or min(cfg.batches) < 1 or cfg.timed_blocks < 1:
            raise ValueError(f"unknown phases {unknown}" if unknown else
                             "size must be a multiple of 16, batches and blocks at least 1")
    except ValueError as exc:
        print(json.dumps({"benchmark": "gpu_smoke", "mode": mode, "ok": False, "reason": f"bad arguments: {exc}"},
                         indent=2))
        return 2
    s = Smoke(cfg, mode, args.budget_s, args.out)
    s.run_phase("env", phase_env)  # always: the context every other figure needs
    if not args.cpu_check and not torch.cuda.is_available():
        s.report["ok"] = False
        s.report["reason"] = (f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) "
                              "sees none, and this benchmark measures the real-size path on one GPU. "
                              "`--cpu-check` runs the same code paths on CPU at a tiny geometry.")
        print(json.dumps(s.finish(), indent=2))
        return 2
    for name in phases:
        if name != "env":
            s.run_phase(name, PHASE_FNS[name])
    report = s.finish()
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
