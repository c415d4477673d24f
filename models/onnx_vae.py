"""The streaming VAE decoder as ONNX graphs with explicit caches, and its ONNX Runtime runner.

Two graphs per deployment (batch and latent size fixed, so TensorRT-style static shapes hold):

  <stem>.first.onnx  z (B, 16, 1, h, w), cache_00..31 -> frames (B, 3, 1, 8h, 8w), new_cache_00..31
  <stem>.onnx        z (B, 16, 1, h, w), cache_00..31 -> frames (B, 3, 4, 8h, 8w), new_cache_00..31

The first graph decodes a stream's first latent (upstream's first-call rule: the temporal upsamplers
skip their time conv) from zero caches. Each `new_cache_i` feeds `cache_i` of the next step. Exports are cached on disk under a key of weights hash + batch + latent size + opset, so a
restart reuses them. `OnnxVaeDecoder` has the torch decoder's interface: `init_state`, `decode_step`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from models.config import VAEConfig
from models.vae import WanVAE, check_latent_step, decode_all

ort.set_default_logger_severity(3)  # CUDA EP load failures on CPU hosts are expected; keep them quiet

GRAPH_VERSION = 1  # bump when the exported computation or its inputs/outputs change
DEFAULT_OPSET = 18


def default_cache_dir() -> Path:
    """$AVATARCAST_CACHE or ~/.cache/avatarcast, then onnx/."""
    root = os.environ.get("AVATARCAST_CACHE") or Path.home() / ".cache" / "avatarcast"
    return Path(root).expanduser() / "onnx"


def cache_names(n: int) -> tuple[list[str], list[str]]:
    return [f"cache_{i:02d}" for i in range(n)], [f"new_cache_{i:02d}" for i in range(n)]


# ---- export -------------------------------------------------------------------------------------


class _DecodeGraph(nn.Module):
    """`WanVAE.decode_latent` with the caches spread out as positional tensors, for tracing."""

    def __init__(self, vae: WanVAE, first: bool) -> None:
        super().__init__()
        self.vae, self.first = vae, first

    def forward(self, z: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames, new = self.vae.decode_latent(z, caches, self.first)
        return (frames, *new)


def weights_hash(vae: WanVAE) -> str:
    """sha256 over what the decode graph computes with: config, conv2, decoder, latent statistics."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in vae.cfg.to_dict().items() if k != "name"}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("decoder.", "conv2.")):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs notes at WARNING (missing torchvision, constant outputs kept as initializers)."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.__trace")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write_graph(vae: WanVAE, first: bool, batch: int, latent_h: int, latent_w: int, path: Path,
                 opset: int, metadata: dict[str, str]) -> None:
    # Both graphs take every cache as an input (zeros on a stream's first call) rather than making
    # zeros inside: constant zero caches would be stored in the file, over 2 GB at 480x832.
    shapes = vae.decoder.cache_shapes(batch, latent_h, latent_w)
    ins, outs = cache_names(len(shapes))
    args = (torch.randn(batch, vae.cfg.z_dim, 1, latent_h, latent_w), *(torch.randn(s) for s in shapes))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(_DecodeGraph(vae, first), args, tmp, dynamo=True, verbose=False,
                          external_data=False, opset_version=opset,
                          input_names=["z", *ins], output_names=["frames", *outs])
    model = onnx.load(str(tmp))
    for k, v in {**metadata, "role": "first" if first else "step"}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(tmp))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def export_decoder(vae: WanVAE, latent_h: int, latent_w: int, out: str | Path, batch: int = 1,
                   opset: int = DEFAULT_OPSET, weights_sha256: str | None = None) -> tuple[Path, Path]:
    """Write the steady-state graph to `out` and the first-frame graph next to it (`<stem>.first.onnx`).

    Graphs are float32 (exported on CPU), with batch and latent size fixed.
    """
    step_path = Path(out)
    first_path = step_path.with_name(step_path.stem + ".first.onnx")
    step_path.parent.mkdir(parents=True, exist_ok=True)
    p = vae.conv2.weight
    if p.dtype != torch.float32 or p.device.type != "cpu":
        vae = copy.deepcopy(vae).to("cpu", torch.float32)
    meta = {
        "avatarcast": "vae_decoder", "graph_version": str(GRAPH_VERSION), "config": json.dumps(vae.cfg.to_dict()),
        "batch": str(batch), "latent_h": str(latent_h), "latent_w": str(latent_w),
        "weights_sha256": weights_sha256 or weights_hash(vae), "first_graph": first_path.name,
    }
    _write_graph(vae, True, batch, latent_h, latent_w, first_path, opset, meta)
    _write_graph(vae, False, batch, latent_h, latent_w, step_path, opset, meta)
    return step_path, first_path


def export_path(vae: WanVAE, latent_h: int, latent_w: int, batch: int = 1, opset: int = DEFAULT_OPSET,
                cache_dir: str | Path | None = None) -> Path:
    """Where the cached step graph for (weights, batch, latent size, opset) lives."""
    return _export_path(weights_hash(vae), latent_h, latent_w, batch, opset, cache_dir)


def _export_path(digest: str, latent_h: int, latent_w: int, batch: int, opset: int,
                 cache_dir: str | Path | None) -> Path:
    key = f"{digest[:20]}-b{batch}-{latent_h}x{latent_w}-op{opset}-v{GRAPH_VERSION}"
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / "vae_decoder" / key / "decoder.onnx"


def cached_export(vae: WanVAE, latent_h: int, latent_w: int, batch: int = 1, opset: int = DEFAULT_OPSET,
                  cache_dir: str | Path | None = None) -> tuple[Path, bool]:
    """The step graph for this (weights, batch, size, opset), exporting only if it is not on disk yet.

    Returns (path, exported_now).
    """
    digest = weights_hash(vae)
    step_path = _export_path(digest, latent_h, latent_w, batch, opset, cache_dir)
    first_path = step_path.with_name("decoder.first.onnx")
    if step_path.is_file() and first_path.is_file():
        return step_path, False
    export_decoder(vae, latent_h, latent_w, step_path, batch=batch, opset=opset, weights_sha256=digest)
    return step_path, True


# ---- runtime ------------------------------------------------------------------------------------


def default_providers() -> list[Any]:
    """CUDA EP first where this onnxruntime build has it, CPU EP always last."""
    available = ort.get_available_providers()
    providers: list[Any] = []
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": 0}))
    providers.append("CPUExecutionProvider")
    return providers


@dataclass(frozen=True)
class OnnxDecodeState:
    """One stream's decoder caches as ONNX Runtime values (OrtValues on the session's device with
    IOBinding, numpy arrays without), zeros at the start; `first` as in `VaeDecodeState`."""

    caches: tuple[Any, ...]
    first: bool
    batch: int
    latent_h: int
    latent_w: int


class OnnxVaeDecoder:
    """Streaming VAE decoder on ONNX Runtime, interchangeable with `WanVAE` for `init_state` /
    `decode_step` / `decode`. Weights are shared; all per-stream memory is in the state."""

    def __init__(self, step_path: str | Path, first_path: str | Path | None = None,
                 providers: list[Any] | None = None, io_binding: bool = True,
                 session_options: ort.SessionOptions | None = None) -> None:
        step_path = Path(step_path)
        if not step_path.is_file():
            raise FileNotFoundError(f"ONNX VAE decoder not found at {step_path}")
        so = session_options or ort.SessionOptions()
        providers = providers or default_providers()
        self._step = ort.InferenceSession(str(step_path), so, providers=providers)
        meta = self._step.get_modelmeta().custom_metadata_map
        if meta.get("avatarcast") != "vae_decoder" or meta.get("role") != "step":
            raise ValueError(f"{step_path}: not an avatarcast VAE decoder step graph (see export_decoder)")
        first_path = Path(first_path) if first_path else step_path.with_name(meta["first_graph"])
        if not first_path.is_file():
            raise FileNotFoundError(f"first-frame graph {first_path} (exported with {step_path}) is missing")
        self._first = ort.InferenceSession(str(first_path), so, providers=providers)
        first_meta = self._first.get_modelmeta().custom_metadata_map
        if first_meta.get("role") != "first" or first_meta.get("weights_sha256") != meta["weights_sha256"]:
            raise ValueError(f"{first_path} is not the first-frame graph exported with {step_path}")
        self.cfg = VAEConfig.from_dict(json.loads(meta["config"]))
        self.batch, self.latent_h, self.latent_w = (int(meta[k]) for k in ("batch", "latent_h", "latent_w"))
        self.weights_sha256 = meta["weights_sha256"]
        self.paths = (step_path, first_path)
        self._cache_shapes = [tuple(i.shape) for i in self._step.get_inputs()[1:]]
        self._cache_in, self._cache_out = cache_names(len(self._cache_shapes))
        self._outputs = ["frames", *self._cache_out]
        self.io_binding = io_binding
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        options = self._step.get_provider_options().get(self.provider, {})
        self._device_id = int(options.get("device_id", 0)) if self._device == "cuda" else 0

    @classmethod
    def from_vae(cls, vae: WanVAE, latent_h: int, latent_w: int, batch: int = 1, opset: int = DEFAULT_OPSET,
                 cache_dir: str | Path | None = None, **kwargs: Any) -> OnnxVaeDecoder:
        """Export (or reuse a cached export of) `vae`'s decoder for this size and open it."""
        path, _ = cached_export(vae, latent_h, latent_w, batch=batch, opset=opset, cache_dir=cache_dir)
        return cls(path, **kwargs)

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on (not merely one that was requested)."""
        return self._step.get_providers()[0]

    @property
    def providers(self) -> list[str]:
        return list(self._step.get_providers())

    # ---- streaming ------------------------------------------------------------------------------
    def init_state(self, batch: int, latent_h: int, latent_w: int) -> OnnxDecodeState:
        if (batch, latent_h, latent_w) != (self.batch, self.latent_h, self.latent_w):
            raise ValueError(f"this ONNX decoder was exported for batch {self.batch} and "
                             f"{self.latent_h}x{self.latent_w} latents, not batch {batch} and "
                             f"{latent_h}x{latent_w}; export another one for that size")
        zeros = [np.zeros(shape, dtype=np.float32) for shape in self._cache_shapes]
        if self.io_binding:  # one upload per stream; afterwards the caches never leave the device
            caches = tuple(ort.OrtValue.ortvalue_from_numpy(c, self._device, self._device_id) for c in zeros)
        else:
            caches = tuple(zeros)
        return OnnxDecodeState(caches=caches, first=True, batch=batch, latent_h=latent_h, latent_w=latent_w)

    def decode_step(self, state: OnnxDecodeState, z: torch.Tensor | np.ndarray
                    ) -> tuple[torch.Tensor, OnnxDecodeState]:
        """z (B, 16, 1, h, w), normalised -> frames (B, 3, 1 or 4, 8h, 8w) float32, next state."""
        check_latent_step(self.cfg, state.batch, state.latent_h, state.latent_w, z)
        session = self._first if state.first else self._step
        if self.io_binding:
            frames, caches = self._run_bound(session, state, z)
        else:
            frames, caches = self._run_plain(session, state, z)
        return frames, replace(state, caches=caches, first=False)

    def decode(self, z: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """Offline decode through the streaming steps: (B, 16, T, h, w) -> (B, 3, 1 + 4(T-1), 8h, 8w)."""
        return decode_all(self, z, clamp)

    # ---- execution paths ------------------------------------------------------------------------
    @staticmethod
    def _host_latent(z: torch.Tensor | np.ndarray) -> np.ndarray:
        arr = z.detach().to("cpu", torch.float32).numpy() if isinstance(z, torch.Tensor) else z
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("latents contain NaN or Inf values")
        return arr

    def _run_plain(self, session: ort.InferenceSession, state: OnnxDecodeState, z
                   ) -> tuple[torch.Tensor, tuple[np.ndarray, ...]]:
        feed = {"z": self._host_latent(z), **dict(zip(self._cache_in, state.caches))}
        frames, *caches = session.run(self._outputs, feed)
        return torch.from_numpy(frames), tuple(caches)

    def _run_bound(self, session: ort.InferenceSession, state: OnnxDecodeState, z
                   ) -> tuple[torch.Tensor, tuple[ort.OrtValue, ...]]:
        """IOBinding: caches stay OrtValues on the session's device from one step to the next."""
        io = session.io_binding()
        if self._device == "cuda" and isinstance(z, torch.Tensor) and z.is_cuda:
            z = z.detach().to(f"cuda:{self._device_id}", torch.float32).contiguous()  # zero-copy: bind torch's device buffer
            if not bool(torch.isfinite(z).all()):
                raise ValueError("latents contain NaN or Inf values")
            io.bind_input("z", "cuda", self._device_id, np.float32, tuple(z.shape), z.data_ptr())
        else:
            z_value = ort.OrtValue.ortvalue_from_numpy(self._host_latent(z), self._device, self._device_id)
            io.bind_ortvalue_input("z", z_value)
        for name, value in zip(self._cache_in, state.caches):
            io.bind_ortvalue_input(name, value)
        for name in self._outputs:
            io.bind_output(name, self._device, self._device_id)
        io.synchronize_inputs()
        session.run_with_iobinding(io)
        io.synchronize_outputs()
        frames, *caches = io.get_outputs()
        return self._to_torch(frames), tuple(caches)

    def _to_torch(self, value: ort.OrtValue) -> torch.Tensor:
        if self._device == "cuda" and torch.cuda.is_available():
            try:  # stay on the device
                return torch.from_dlpack(value._ortvalue.to_dlpack())
            except (AttributeError, RuntimeError):
                pass
        return torch.from_numpy(value.numpy())
