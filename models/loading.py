"""Checkpoint loading: local files only, every format a user of Wan-based avatars has on disk.

Formats:
* Wan2.1 original: `diffusion_pytorch_model*.safetensors` (+ `.index.json` when sharded) + `config.json`.
* diffusers: `WanTransformer3DModel` directory (or its `transformer/` subfolder); keys renamed here.
* OmniAvatar: `pytorch_model.pt` (+ `config.json`): LoRA + audio + 33-channel patch embedding, loaded
  on top of the Wan2.1 base it was trained from (`base=`).
* LiveTalk / Self-Forcing / CausVid: one merged file (`model.safetensors`, or a `.pt` dict holding
  `generator`/`generator_ema`), wrapper prefixes such as `model.` are stripped.
* avatarcast: `model.safetensors` with our config in its metadata (+ optional `lora.safetensors`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.config import DIT_PRESETS, DiTConfig
from models.dit import WanDiT
from models.lora import load_lora, lora_rank_of, normalize_lora_keys

CONFIG_META_KEY = "avatarcast.dit_config"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "model.", "generator.", "diffusion_model.", "transformer.")
_WRAPPER_KEYS = ("generator_ema", "generator", "state_dict", "module", "model")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and the problem."""


# ---- diffusers <-> Wan2.1 names -----------------------------------------------------------------
# (ours, diffusers) name templates; one table serves both directions. A template ending in "." renames
# a prefix, others a whole key. {b}: block index, {x}: q/k/v, {n}: norm_q/norm_k.
_NAME_MAP = [
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("blocks.{b}.modulation", "blocks.{b}.scale_shift_table"),
    ("blocks.{b}.self_attn.{x}.", "blocks.{b}.attn1.to_{x}."),
    ("blocks.{b}.self_attn.o.", "blocks.{b}.attn1.to_out.0."),
    ("blocks.{b}.self_attn.{n}.", "blocks.{b}.attn1.{n}."),
    ("blocks.{b}.cross_attn.{x}.", "blocks.{b}.attn2.to_{x}."),
    ("blocks.{b}.cross_attn.o.", "blocks.{b}.attn2.to_out.0."),
    ("blocks.{b}.cross_attn.{n}.", "blocks.{b}.attn2.{n}."),
    ("blocks.{b}.norm3.", "blocks.{b}.norm2."),
    ("blocks.{b}.ffn.0.", "blocks.{b}.ffn.net.0.proj."),
    ("blocks.{b}.ffn.2.", "blocks.{b}.ffn.net.2."),
]
_FIELDS = {"b": r"\d+", "x": "[qkv]", "n": "norm_[qk]"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, ...
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for i, p in enumerate(parts))
    return re.compile("^" + body + ("" if template.endswith(".") else "$"))


_RULES = {  # direction -> [(regex on the source name, template of the target name)]
    "to_diffusers": [(_template_regex(a), b) for a, b in _NAME_MAP],
    "from_diffusers": [(_template_regex(b), a) for a, b in _NAME_MAP],
}


def _rename(key: str, direction: str) -> str:
    for pattern, target in _RULES[direction]:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict()) + key[m.end():]
    return key


def to_diffusers_key(key: str) -> str:
    return _rename(key, "to_diffusers")


def from_diffusers_key(key: str) -> str:
    """Inverse of `to_diffusers_key` (q/k/v names come back from to_q/to_k/to_v)."""
    return _rename(key, "from_diffusers")


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


# ---- reading files ------------------------------------------------------------------------------
def _expect(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    return path


def weight_files(path: Path) -> list[Path]:
    """The weight file(s) a checkpoint path stands for, shards in index order."""
    path = _expect(Path(path), "a checkpoint file or directory")
    if path.is_file():
        return [path]
    if (path / "transformer").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "transformer"  # a diffusers pipeline directory
    for index in sorted(path.glob("*.safetensors.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [_expect(path / s, f"shard listed in {index.name}") for s in shards]
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.pt",
                 "pytorch_model.bin", "lora.safetensors"):
        if (path / name).exists() and name != "lora.safetensors":
            return [path / name]
    found = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.name != "lora.safetensors")
    if not found:
        raise FileNotFoundError(f"{path}: no weights found (expected model.safetensors, "
                                "diffusion_pytorch_model*.safetensors(+index), or pytorch_model.pt)")
    return found


def _unwrap(obj, source: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(f"{source}: a dict without tensors (keys {list(obj)[:6]})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_wrapper_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a prefix shared by every key (`model.`, `module.`, `_orig_mod.`, ...), repeatedly."""
    changed = True
    while changed and sd:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, wrapper prefixes stripped, diffusers names mapped to ours."""
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = _unwrap(torch.load(f, map_location="cpu", weights_only=True, mmap=True), f)
        except (CheckpointError, FileNotFoundError):
            raise
        except Exception as exc:  # corrupt or foreign file: say which one
            raise CheckpointError(f"{f}: cannot read weights ({type(exc).__name__}: {exc})") from exc
        sd.update(part)
    sd = strip_wrapper_prefix(sd)
    if is_diffusers_layout(sd):
        sd = {from_diffusers_key(k): v for k, v in sd.items()}
    return sd


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes without loading tensors (safetensors headers; mmap for .pt), our names."""
    return _read_shapes(path)[0]


def _read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(Path(path)):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as h:
                shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        else:
            sd = _unwrap(torch.load(f, map_location="cpu", weights_only=True, mmap=True), f)
            shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    shapes = strip_wrapper_prefix(shapes)
    if is_diffusers_layout(shapes):
        return {from_diffusers_key(k): v for k, v in shapes.items()}, "diffusers"
    return shapes, "wan"


def read_config(path: Path) -> DiTConfig | None:
    """Our config from safetensors metadata or config.json; Wan/OmniAvatar/diffusers config.json too."""
    path = Path(path)
    files = weight_files(path)
    if files[0].suffix == ".safetensors":
        with safe_open(str(files[0]), "pt") as h:
            meta = h.metadata() or {}
        if CONFIG_META_KEY in meta:
            return DiTConfig.from_dict(json.loads(meta[CONFIG_META_KEY]))
    folder = files[0].parent
    cfg_file = folder / "config.json"
    if cfg_file.exists():
        d = json.loads(cfg_file.read_text())
        if d.get("format") == "avatarcast":
            return DiTConfig.from_dict(d["dit"])
        try:
            return DiTConfig.from_wan_config(d, name=folder.name)
        except KeyError:
            return None
    return None


# ---- building a model from files ----------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did: which file supplied what, and which modules were left at their init."""

    config: DiTConfig
    files: list[str]
    loaded: int = 0
    left_at_init: list[str] = field(default_factory=list)  # extension names, e.g. "face_audio_adapter"
    lora_rank: int = 0
    lora_merged: bool = False


def _lora_alpha_in_config(path: Path) -> float | None:
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        return None
    d = json.loads(cfg_file.read_text())
    alpha = d.get("lora_alpha") or d.get("dit", {}).get("lora_alpha")
    return float(alpha) if alpha else None


def _extension_of(key: str) -> str | None:
    for name, prefixes in WanDiT.EXTENSIONS.items():
        if key.startswith(prefixes):
            return name
    return None


def _check_shapes(model_sd, sd, source) -> None:
    for k, v in sd.items():
        if k in model_sd and model_sd[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, but the model "
                                  f"expects {tuple(model_sd[k].shape)}")


def load_dit(
    path: str | Path,
    config: DiTConfig | str | None = None,
    *,
    base: str | Path | None = None,
    merge_lora: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[WanDiT, LoadReport]:
    """Build a DiT from local files.

    path: the checkpoint (file or directory). base: a Wan2.1 checkpoint to load first when `path` only
    holds a fine-tune (OmniAvatar's pytorch_model.pt). config: a DiTConfig or preset name; by default
    read from the checkpoint's own config. Core weights must all be present; extension modules that
    the files lack stay at their (no-op) initialisation and are listed in the report.
    """
    path = Path(path)
    cfg = DIT_PRESETS[config] if isinstance(config, str) else config
    cfg = cfg or read_config(path) or (read_config(Path(base)) if base else None)
    if cfg is None:
        raise CheckpointError(f"{path}: no config.json or embedded config; pass a preset (e.g. omniavatar-1.3b)")
    sources = ([Path(base)] if base else []) + [path]
    model = WanDiT(cfg)
    own = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for src in sources:
        sd = read_state_dict(src)
        if src != path:  # the base may differ where the fine-tune replaces a tensor (patch_embedding 16->33)
            overlay = read_shapes(path)
            sd = {k: v for k, v in sd.items() if not (k in overlay and own.get(k) is not None
                                                      and v.shape != own[k].shape)}
        core = {k: v for k, v in sd.items() if ".lora_" not in k}
        _check_shapes(own, core, src)
        unknown = [k for k in core if k not in own]
        if unknown:
            raise CheckpointError(f"{src}: {len(unknown)} tensors match nothing in a {cfg.name} DiT, "
                                  f"e.g. {unknown[0]!r} {tuple(core[unknown[0]].shape)}")
        merged.update(sd)
    lora = {k: v for k, v in merged.items() if ".lora_" in k or k.endswith(".alpha")}
    core = {k: v for k, v in merged.items() if k not in lora}
    missing = [k for k in own if k not in core]
    missing_core = [k for k in missing if _extension_of(k) is None]
    if missing_core:
        raise CheckpointError(f"{', '.join(map(str, sources))}: missing {len(missing_core)} core tensors, "
                              f"e.g. {missing_core[0]!r} {tuple(own[missing_core[0]].shape)}")
    model.load_state_dict(core, strict=False)
    report = LoadReport(config=cfg, files=[str(s) for s in sources], loaded=len(core),
                        left_at_init=sorted({_extension_of(k) for k in missing}))
    lora_file = path / "lora.safetensors" if path.is_dir() else None
    if lora_file is not None and lora_file.exists():
        lora.update(load_file(str(lora_file)))
        report.files.append(str(lora_file))
    if lora:
        # LoRA scale: the checkpoint's own config.json (OmniAvatar writes lora_alpha there) wins.
        alpha = _lora_alpha_in_config(path) or cfg.lora_alpha or None
        report.lora_rank = load_lora(model, lora, alpha=alpha, source=str(path))
        if merge_lora:
            from models.lora import unload_lora

            unload_lora(model, merge=True)
            report.lora_merged = True
    return model.to(device=device, dtype=dtype).eval(), report


def save_dit(model: WanDiT, folder: str | Path, lora_separate: bool = True) -> Path:
    """Write our format: model.safetensors (config in metadata) [+ lora.safetensors]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    lora = {k: v for k, v in sd.items() if ".lora_" in k}
    core = {k.replace(".base_layer.", "."): v for k, v in sd.items() if k not in lora}
    meta = {CONFIG_META_KEY: json.dumps(model.cfg.to_dict())}
    if lora and not lora_separate:
        raise ValueError("merge or unload the LoRA before saving it into the base weights")
    _atomic_save(core, folder / "model.safetensors", meta)
    if lora:
        _atomic_save(lora, folder / "lora.safetensors", {"rank": str(lora_rank_of(lora))})
    return folder


def _atomic_save(tensors, dest: Path, meta: dict[str, str]) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(dest)


# ---- inspection ---------------------------------------------------------------------------------
def preset_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a preset, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare_shapes(have: dict, want: dict) -> dict:
    return {
        "missing": sorted(k for k in want if k not in have),
        "unexpected": sorted(k for k in have if k not in want),
        "mismatched": sorted(k for k in want if k in have and tuple(have[k]) != tuple(want[k])),
    }


def inspect_checkpoint(path: str | Path) -> dict:
    """What a checkpoint holds and which preset it matches (exactly, or as a base without extensions)."""
    path = Path(path)
    shapes, layout = _read_shapes(path)
    lora_keys, _ = normalize_lora_keys({k: torch.empty(0) for k in shapes if ".lora_" in k})
    core = {k: v for k, v in shapes.items() if ".lora_" not in k and not k.endswith(".alpha")}
    rank = next((shapes[k][0] for k in shapes if ".lora_A" in k or ".lora_down" in k), 0)
    params = sum(int(torch.tensor(s).prod()) if s else 1 for s in shapes.values())
    matches = []
    for name, cfg in DIT_PRESETS.items():
        diff = compare_shapes(core, preset_shapes(cfg))
        core_missing = [k for k in diff["missing"] if _extension_of(k) is None]
        if not diff["unexpected"] and not diff["mismatched"] and not core_missing:
            matches.append({"preset": name, "exact": not diff["missing"],
                            "extensions_absent": sorted({_extension_of(k) for k in diff["missing"]})})
    partial = None
    if not matches:
        best = min(DIT_PRESETS.values(), key=lambda c: sum(map(len, compare_shapes(core, preset_shapes(c)).values())))
        d = compare_shapes(core, preset_shapes(best))
        partial = {"preset": best.name, **{k: len(v) for k, v in d.items()},
                   "examples": {k: v[:3] for k, v in d.items()}}
    cfg = None
    try:
        cfg = read_config(path)
    except Exception:  # inspection must not fail on a foreign config
        pass
    return {
        "path": str(path),
        "files": [str(f) for f in weight_files(path)],
        "layout": layout,
        "tensors": len(shapes),
        "parameters": params,
        "lora": {"tensors": len(lora_keys), "rank": rank} if lora_keys else None,
        "audio_path": any(k.startswith("audio_proj.") for k in shapes),
        "in_dim": core.get("patch_embedding.weight", (None, None))[1],
        "config": cfg.to_dict() if cfg else None,
        "matches": matches,
        "closest": partial,
    }

