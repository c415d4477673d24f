"""LoRA on the DiT through peft: inject, load (OmniAvatar / ComfyUI / our keys), merge, unmerge, unload.

Adapters are injected with `peft.inject_adapter_in_model`, so module paths become
`blocks.{i}.self_attn.q.lora_A.default.weight`, exactly the keys of OmniAvatar's `pytorch_model.pt`.
peft matches target names by suffix: "q" hits both `self_attn.q` and `cross_attn.q` of every block, and
never the avatar adapters, whose projections are named `to_q`, `to_k`, ...
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
ADAPTER = "default"


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS,
                init: bool | str = True) -> nn.Module:
    """Add LoRA layers (B initialised to zero, so the model's output is unchanged) in place."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive; got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, OmniAvatar-style keys (`...lora_A.default.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


_COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.")


def normalize_lora_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Accept OmniAvatar (`lora_A.default.weight`), peft-saved (`lora_A.weight`) and ComfyUI/kohya
    (`diffusion_model.…lora_down.weight` + `.alpha`) spellings; return peft keys and per-module alphas."""
    out, alphas = {}, {}
    for key, value in sd.items():
        k = key
        for p in _COMFY_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        k = k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
        if k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = float(value)
            continue
        k = re.sub(r"\.lora_([AB])\.weight$", rf".lora_\1.{ADAPTER}.weight", k)
        out[k] = value
    return out, alphas


def lora_rank_of(sd: dict[str, torch.Tensor]) -> int:
    ranks = {v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    if len(ranks) > 1:
        raise ValueError(f"LoRA weights with mixed ranks {sorted(ranks)} are not supported")
    return ranks.pop() if ranks else 0


def lora_targets_of(sd: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Target suffixes present in a LoRA state dict, e.g. ('q', 'k', 'v', 'o', 'ffn.0', 'ffn.2')."""
    found = set()
    for k in sd:
        m = re.search(r"\.(self_attn|cross_attn)\.(\w+)\.lora_A\.", k) or re.search(r"\.(ffn)\.(\d+)\.lora_A\.", k)
        if m:
            found.add(m.group(2) if m.group(1) != "ffn" else f"ffn.{m.group(2)}")
    order = list(DEFAULT_TARGETS)
    return tuple(sorted(found, key=lambda t: order.index(t) if t in order else len(order)))


def load_lora(model: nn.Module, sd: dict[str, torch.Tensor], alpha: float | None = None,
              source: str = "LoRA weights") -> int:
    """Inject adapters matching `sd` (if not present yet) and load them. Returns the rank.

    `alpha` defaults to the file's own `.alpha` values, else to the rank (scale 1).
    """
    sd, alphas = normalize_lora_keys(sd)
    rank = lora_rank_of(sd)
    if not rank:
        raise ValueError(f"{source}: no lora_A/lora_B tensors found")
    if alpha is None:
        values = set(alphas.values())
        if len(values) > 1:
            raise ValueError(f"{source}: per-module alphas differ ({sorted(values)}); pass alpha explicitly")
        alpha = values.pop() if values else float(rank)
    if not has_lora(model):
        inject_lora(model, rank, alpha, lora_targets_of(sd))
    own = model.state_dict()
    problems = [k for k in sd if k not in own]
    if problems:
        raise KeyError(f"{source}: {len(problems)} LoRA keys have no matching module, e.g. {problems[0]!r}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    missing = [k for k in own if ".lora_" in k and k not in sd]
    if missing:
        raise KeyError(f"{source}: the model has {len(missing)} LoRA tensors the file lacks, e.g. {missing[0]!r}")
    model.load_state_dict(sd, strict=False)
    return rank


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (fast inference); reversible with `unmerge_lora`."""
    for _, layer in lora_layers(model):
        if not layer.merged:
            layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA layer by its base layer (merged into it first unless merge=False)."""
    for name, layer in lora_layers(model):
        if merge and not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model
