"""A wider copy of a VAE's encoder that computes what the narrow one did (Net2Net-style widening).

The demo VAE's encoder is the bottleneck of its round trip, not its decoder: latents optimised through
the shipped decoder draw a held-out speaking clip at 32 dB with lip sync r 0.90, where the encoder's give
28 dB and 0.75. An encoder runs once per avatar and per training clip, so it can be wider at no cost to a
stream. Training a wider one from scratch would land on another latent space (and a DiT retrained from
scratch); this copy starts exactly where the narrow encoder is, so its latents, and a DiT trained on them,
stay close while it learns.

Every encoder channel c of width C becomes channels c and c + C with the same weights; a layer reading
widened channels halves its weights over the two copies, so each output is unchanged. The encoder's
norms are L2 norms over channels times sqrt(C), which two equal copies leave unchanged; its attention
scales q.k by 1/sqrt(C), so q is scaled by 1/sqrt(2) to keep the logits. Small noise on the copies lets
training tell them apart (two exact copies would get the same gradient forever).
"""

from __future__ import annotations

import torch

from models.vae import WanVAE

FACTOR = 2  # exact copies need a whole factor; 2 is what the demo encoder grows by


def _widen_axis(t: torch.Tensor, axis: int, blocks: int = 1) -> torch.Tensor:
    """Repeat `t` along `axis` the widened way: each of `blocks` equal parts [a] becomes [a, a]."""
    parts = t.chunk(blocks, dim=axis)
    return torch.cat([torch.cat([p, p], dim=axis) for p in parts], dim=axis)


@torch.no_grad()
def widen_encoder(vae: WanVAE, noise: float = 0.0, generator: torch.Generator | None = None) -> WanVAE:
    """A VAE whose encoder is FACTOR times as wide as `vae`'s and encodes the same (exactly at noise 0);
    conv1 (the latent statistics), conv2 and the decoder are `vae`'s own. `noise`: std of the noise added
    to each widened weight, relative to that weight tensor's std."""
    cfg = vae.cfg.replace(encoder_dim=FACTOR * vae.cfg.encoder_base)
    wide = WanVAE(cfg).to(vae.conv2.weight.dtype)
    narrow = vae.state_dict()
    state = {}
    for name, target in wide.state_dict().items():
        t = narrow[name]
        if name.startswith("encoder."):
            qkv = name.endswith("to_qkv.weight") or name.endswith("to_qkv.bias")
            if target.shape[0] == FACTOR * t.shape[0]:  # output channels: copies
                t = _widen_axis(t, 0, blocks=3 if qkv else 1)
                if qkv:  # q's first third: q.k over two copies doubles; 1/sqrt(2) on q restores it
                    q, k, v = t.chunk(3, dim=0)
                    t = torch.cat([q / FACTOR ** 0.5, k, v])
            if t.dim() > 1 and target.shape[1] == FACTOR * t.shape[1]:  # input channels: split between copies
                t = _widen_axis(t, 1) / FACTOR
            if noise > 0 and t.dim() > 1 and t.shape != narrow[name].shape:
                t = t + noise * t.std() * torch.randn(t.shape, generator=generator, dtype=t.dtype)
        if t.shape != target.shape:
            raise ValueError(f"cannot widen {name}: {tuple(narrow[name].shape)} -> {tuple(target.shape)}")
        state[name] = t
    wide.load_state_dict(state)
    return wide.train(vae.training)
