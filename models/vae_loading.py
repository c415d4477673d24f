"""Wan2.1 VAE weights in, and out: `Wan2.1_VAE.pth`, diffusers `AutoencoderKLWan`, our safetensors.

Our parameter names are upstream Wan2.1's (`models/vae.py`), so `Wan2.1_VAE.pth` loads as is. diffusers
renames them; the map is positional (encoder.downsamples.N <-> encoder.down_blocks.N; decoder stage s,
item j <-> up_blocks.s.{resnets.j | upsamplers.0}) except in the mid-blocks, where upstream middle.0 /
middle.1 / middle.2 are diffusers mid_block.resnets.0 / attentions.0 / resnets.1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.config import WAN_VAE_LATENTS_MEAN, VAEConfig
from models.vae import WanVAE

FORMAT_TAG = "avatarcast.wan_vae"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPECTED = ("a Wan2.1_VAE.pth file, a diffusers AutoencoderKLWan directory (config.json + "
            f"{DIFFUSERS_WEIGHTS}) or an avatarcast .safetensors file")

_RESNET = {"residual.0.gamma": "norm1.gamma", "residual.2.": "conv1.", "residual.3.gamma": "norm2.gamma",
           "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}


# ---- name mapping -------------------------------------------------------------------------------


def _resnet_part(rest: str) -> str:
    for ours, theirs in _RESNET.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    return rest  # attention (norm/to_qkv/proj) and resample (resample.1/time_conv) names are shared


def wan_to_diffusers_key(key: str, cfg: VAEConfig) -> str:
    """Upstream Wan2.1 parameter name -> diffusers AutoencoderKLWan name."""
    if key.startswith(("conv1.", "conv2.")):
        return ("quant_conv." if key.startswith("conv1.") else "post_quant_conv.") + key[6:]
    part, rest = key.split(".", 1)  # "encoder" | "decoder"
    if rest.startswith("conv1."):
        return f"{part}.conv_in.{rest[6:]}"
    if rest.startswith("head.0."):
        return f"{part}.norm_out.{rest[7:]}"
    if rest.startswith("head.2."):
        return f"{part}.conv_out.{rest[7:]}"
    if m := re.match(r"middle\.(\d)\.(.*)", rest):
        return f"{part}.{_MIDDLE[m[1]]}.{_resnet_part(m[2])}"
    if m := re.match(r"downsamples\.(\d+)\.(.*)", rest):
        return f"{part}.down_blocks.{m[1]}.{_resnet_part(m[2])}"
    if m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
        per_stage = cfg.num_res_blocks + 2  # num_res_blocks + 1 resnets, then one upsampler
        stage, j = divmod(int(m[1]), per_stage)
        inner = f"resnets.{j}" if j <= cfg.num_res_blocks else "upsamplers.0"
        return f"{part}.up_blocks.{stage}.{inner}.{_resnet_part(m[2])}"
    raise KeyError(f"no diffusers name for VAE parameter {key!r}")


def _model_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in WanVAE(cfg).state_dict().items()}


def diffusers_to_wan(state: Mapping[str, torch.Tensor], cfg: VAEConfig, source: str = "state dict"
                     ) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKLWan state dict to upstream Wan2.1 names."""
    back = {wan_to_diffusers_key(k, cfg): k for k in _model_shapes(cfg)}
    unknown = [k for k in state if k not in back]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} diffusers tensor(s) have no Wan2.1 counterpart for "
                         f"config {cfg.name!r}, e.g. {unknown[:3]}")
    return {back[k]: v for k, v in state.items()}


def wan_to_diffusers(state: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    return {wan_to_diffusers_key(k, cfg): v for k, v in state.items()}


# ---- config from tensors ------------------------------------------------------------------------


def infer_config(state: Mapping[str, torch.Tensor], name: str = "checkpoint") -> VAEConfig:
    """Read the architecture off upstream-named tensors (widths, stages, temporal flags)."""
    try:
        first = state["encoder.conv1.weight"]
        dim, in_channels = first.shape[0], first.shape[1]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{name}: not a Wan2.1 VAE state dict (missing {e.args[0]!r})") from None
    blocks = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    resamples = [n for n in blocks if f"encoder.downsamples.{n}.resample.1.weight" in state]
    per_stage = resamples[0] if resamples else len(blocks)  # res blocks per encoder stage
    stages = len(resamples) + 1
    mult = tuple(state[f"encoder.downsamples.{s * (per_stage + 1)}.residual.2.weight"].shape[0] // dim
                 for s in range(stages))
    temporal = tuple(f"encoder.downsamples.{n}.time_conv.weight" in state for n in resamples)
    kw = dict(name=name, dim=dim, z_dim=z_dim, dim_mult=mult, num_res_blocks=per_stage,
              temporal_downsample=temporal, in_channels=in_channels)
    decoder = state.get("decoder.conv1.weight")  # (dim * dim_mult[-1], z, 3, 3, 3)
    if decoder is not None and decoder.shape[0] != dim * mult[-1]:  # an encoder wider than its decoder
        kw.update(dim=decoder.shape[0] // mult[-1], encoder_dim=dim)
    if z_dim != len(WAN_VAE_LATENTS_MEAN):  # Wan2.1's statistics only fit 16 channels
        kw.update(latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
    return VAEConfig(**kw)


# ---- load / save --------------------------------------------------------------------------------


def load_into(model: WanVAE, state: Mapping[str, torch.Tensor], source: str) -> WanVAE:
    """Strict load with errors that name the file, the key and both shapes."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ValueError(f"{source}: tensor names do not match the {model.cfg.name!r} VAE: " + "; ".join(parts))
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, but the "
                             f"{model.cfg.name!r} VAE expects {tuple(want[k].shape)}")
    model.load_state_dict(dict(state), strict=True)
    return model


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return obj


def _diffusers_dir(path: Path) -> Path | None:
    for d in (path, path / "vae"):
        if (d / "config.json").is_file() and (d / DIFFUSERS_WEIGHTS).is_file():
            return d
    return None


def load_vae(path: str | Path, config: VAEConfig | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load a Wan2.1 VAE from any of the supported formats; `config` overrides the inferred one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE weights not found at {path}: expected {EXPECTED}")
    if path.is_dir() or path.name == DIFFUSERS_WEIGHTS:
        d = _diffusers_dir(path if path.is_dir() else path.parent)
        if d is None:
            raise FileNotFoundError(f"{path}: no diffusers VAE here; expected config.json and "
                                    f"{DIFFUSERS_WEIGHTS} (or a vae/ subfolder with them)")
        cfg = config or VAEConfig.from_diffusers_config(json.loads((d / "config.json").read_text()), name=d.name)
        source = str(d / DIFFUSERS_WEIGHTS)
        state = diffusers_to_wan(load_file(d / DIFFUSERS_WEIGHTS), cfg, source)
    elif path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
        if "post_quant_conv.weight" in state:
            raise ValueError(f"{path}: diffusers-named tensors; pass the directory with its config.json")
        cfg = config or (VAEConfig.from_dict(json.loads(meta["config"])) if "config" in meta
                         else infer_config(state, name=path.stem))
        source = str(path)
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = _read_pth(path)
        cfg = config or infer_config(state, name=path.stem)
        source = str(path)
    else:
        raise ValueError(f"{path}: unknown VAE file type {path.suffix!r}; expected {EXPECTED}")
    model = load_into(WanVAE(cfg), state, source)
    return model.to(device=device, dtype=dtype).eval()


def save_vae(vae: WanVAE, path: str | Path) -> Path:
    """Our format: upstream names, fp as stored, config JSON in the safetensors metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, path, metadata={"format": FORMAT_TAG, "config": json.dumps(vae.cfg.to_dict())})
    return path


def random_vae(cfg: VAEConfig, seed: int = 0) -> WanVAE:
    """Randomly initialised weights for a preset (tests, benchmarks, export dry runs)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        return WanVAE(cfg).eval()
