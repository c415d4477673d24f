"""LoRA through peft: merge equals adapter output, unmerge restores, foreign key spellings load."""

from __future__ import annotations

import pytest
import torch

from models.config import TINY
from models.dit import WanDiT
from models.lora import (
    inject_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    lora_targets_of,
    merge_lora,
    unload_lora,
    unmerge_lora,
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 33, 2, 4, 4, generator=g), torch.tensor([321.0]),
            torch.randn(1, TINY.text_len, TINY.text_dim, generator=g))


def _run(m):
    x, t, c = _inputs()
    with torch.no_grad():
        return m(x, t, c)


def _model_with_trained_lora(rank=4, alpha=8.0):
    torch.manual_seed(0)
    m = WanDiT(TINY).eval()
    torch.nn.init.normal_(m.head.head.weight, std=0.05)  # fresh Wan init has a zero head
    base = _run(m)
    assert base.abs().max() > 1e-3
    inject_lora(m, rank, alpha)
    assert torch.equal(_run(m), base)  # B = 0 at injection: no change
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m, base


def test_targets_hit_q_k_v_o_and_ffn_but_never_the_adapters():
    m, _ = _model_with_trained_lora()
    names = [n for n, _ in lora_layers(m)]
    assert len(names) == TINY.num_layers * (4 + 4 + 2)  # self q,k,v,o + cross q,k,v,o + ffn.0, ffn.2
    assert not [n for n in names if "adapters" in n or "to_" in n or "norm" in n]
    assert lora_targets_of(lora_state_dict(m)) == ("q", "k", "v", "o", "ffn.0", "ffn.2")


def test_merged_output_equals_adapter_output_and_unmerge_restores():
    m, base = _model_with_trained_lora()
    adapted = _run(m)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(m)
    torch.testing.assert_close(_run(m), adapted, atol=1e-5, rtol=0)
    unmerge_lora(m)
    torch.testing.assert_close(_run(m), adapted, atol=1e-5, rtol=0)
    unload_lora(m)
    assert not lora_layers(m)
    torch.testing.assert_close(_run(m), adapted, atol=1e-5, rtol=0)
    assert set(m.state_dict()) == set(WanDiT(TINY).state_dict())


def test_omniavatar_key_format_round_trip():
    m, _ = _model_with_trained_lora(alpha=2.0)
    sd = lora_state_dict(m)
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in sd)
    fresh = WanDiT(TINY).eval()
    fresh.load_state_dict({k.replace(".base_layer.", "."): v for k, v in m.state_dict().items()
                           if ".lora_" not in k})
    assert load_lora(fresh, sd, alpha=2.0) == 4
    torch.testing.assert_close(_run(fresh), _run(m), atol=1e-6, rtol=0)


def test_comfy_key_format_with_alpha():
    m, _ = _model_with_trained_lora(alpha=2.0)
    comfy = {}
    for k, v in lora_state_dict(m).items():
        k2 = "diffusion_model." + k.replace(".lora_A.default.", ".lora_down.").replace(".lora_B.default.", ".lora_up.")
        comfy[k2] = v
        if ".lora_down." in k2:
            comfy[k2.replace(".lora_down.weight", ".alpha")] = torch.tensor(2.0)
    fresh = WanDiT(TINY).eval()
    fresh.load_state_dict({k.replace(".base_layer.", "."): v for k, v in m.state_dict().items()
                           if ".lora_" not in k})
    load_lora(fresh, comfy)
    torch.testing.assert_close(_run(fresh), _run(m), atol=1e-6, rtol=0)


def test_bad_lora_files_are_named():
    m = WanDiT(TINY)
    with pytest.raises(ValueError, match="no lora_A"):
        load_lora(m, {"blocks.0.self_attn.q.weight": torch.zeros(1)}, source="x.safetensors")
    sd = lora_state_dict(_model_with_trained_lora()[0])
    sd = {k: (v[:2] if "blocks.0.self_attn.q.lora_A" in k else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="mixed ranks"):
        load_lora(WanDiT(TINY), sd)
