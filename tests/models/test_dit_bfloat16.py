"""A DiT held in bfloat16 (how a GPU serves it) runs the cached block path and stays close to float32."""

from __future__ import annotations

import copy

import torch

from models.config import TINY
from models.dit import LayerNorm32, WanDiT

H = W = 4


@torch.no_grad()
def test_layer_norm_of_a_bfloat16_model_runs_in_float32():
    norm = LayerNorm32(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 8)
    expected = torch.nn.functional.layer_norm(x, (8,), norm.weight.bfloat16().float(), norm.bias.bfloat16().float(), 1e-6)
    out = norm.to(torch.bfloat16)(x)  # float32 residual stream in, bfloat16 parameters
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_bfloat16_cached_blocks_stay_close_to_float32(randomize):
    torch.manual_seed(0)
    fp32 = randomize(WanDiT(TINY).eval())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    n = 6
    x, y = torch.randn(1, 16, n, H, W, generator=g), torch.randn(1, 17, n, H, W, generator=g)
    audio = torch.randn(1, n, 4, TINY.audio_dim, generator=g)
    ctx, ref = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g), torch.randn(1, 16, H, W, generator=g)
    outs = []
    for model in (fp32, bf16):
        cache = model.init_cache(1, H, W, sink_frames=1, window_frames=2, block_frames=2, sink_follows=True)
        blocks = [model(x[:, :, s:s + 2], torch.tensor([500.0]), ctx, y=y[:, :, s:s + 2], audio=audio[:, s:s + 2],
                        reference=ref, cache=cache, start_frame=s) for s in (0, 2, 4)]  # the ring wraps at 4
        assert cache.k.dtype == model.dtype
        outs.append(torch.cat(blocks, dim=2))
    want, got = outs
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() / want.abs().max() < 0.05  # bfloat16 keeps ~3 significant digits
