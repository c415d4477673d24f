"""Our DiT against diffusers' WanTransformer3DModel given the same weights (names mapped)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from models.config import DiTConfig
from models.dit import WanDiT
from models.loading import from_diffusers_key, to_diffusers_key

CFG = DiTConfig(name="wan-diffusers", dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=24, text_len=12)


def _diffusers_model(seed=0):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
                              text_dim=24, ffn_dim=96, num_layers=2, rope_max_seq_len=1024).eval()
    with torch.no_grad():  # make the zero-initialised parts non-zero so they are tested
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


def test_name_mapping_round_trips_and_covers_every_key():
    ours = WanDiT(CFG).state_dict()
    theirs = _diffusers_model().state_dict()
    mapped = {to_diffusers_key(k) for k in ours}
    assert mapped == set(theirs)
    assert {from_diffusers_key(k) for k in theirs} == set(ours)
    for k in ours:
        assert from_diffusers_key(to_diffusers_key(k)) == k


@pytest.mark.parametrize("frames,t", [(3, [500.0]), (2, [0.0]), (5, [999.0])])
@torch.no_grad()
def test_forward_matches_diffusers(frames, t):
    ref = _diffusers_model()
    ours = WanDiT(CFG).eval()
    ours.load_state_dict({from_diffusers_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, frames, 8, 12, generator=g)
    ctx = torch.randn(1, CFG.text_len, 24, generator=g)  # full length: diffusers does not pad
    tt = torch.tensor(t)
    expected = ref(hidden_states=x, timestep=tt, encoder_hidden_states=ctx, return_dict=False)[0]
    got = ours(x, tt, ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_matches_diffusers_with_peft_lora():
    """The same LoRA attached through diffusers' peft integration and through ours."""
    from peft import LoraConfig

    from models.lora import inject_lora

    ref = _diffusers_model()
    ours = WanDiT(CFG).eval()
    ours.load_state_dict({from_diffusers_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                               init_lora_weights=False), adapter_name="default")
    inject_lora(ours, rank=4, alpha=8, targets=("q", "k", "v", "o"))
    mapped = {}
    for k, v in ref.state_dict().items():
        if ".lora_" in k:
            base, _, rest = k.partition(".lora_")
            mapped[from_diffusers_key(base + ".x").removesuffix(".x") + ".lora_" + rest] = v
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and not [m for m in missing if ".lora_" in m]
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, CFG.text_len, 24, generator=g)
    expected = ref(hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=ctx, return_dict=False)[0]
    torch.testing.assert_close(ours(x, torch.tensor([300.0]), ctx), expected, atol=1e-5, rtol=0)
