"""Parity of the DiT with tensors recorded from upstream Wan2.1 and OmniAvatar code (float32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models.config import DiTConfig
from models.dit import WanDiT, group_video_frames

ATOL = 1e-5


def _load(oracles, name):
    tensors = load_file(oracles / f"{name}.safetensors")
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    return tensors, weights


@pytest.fixture(scope="module")
def wan(oracles):
    tensors, weights = _load(oracles, "wan21_dit_tiny")
    cfg = DiTConfig(name="wan-oracle", dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16)
    model = WanDiT(cfg).eval()
    model.load_state_dict(weights, strict=True)
    return model, tensors


@pytest.fixture(scope="module")
def omni(oracles):
    tensors, weights = _load(oracles, "omniavatar_dit_tiny")
    cfg = DiTConfig(name="omni-oracle", dim=64, ffn_dim=128, num_heads=2, num_layers=6, in_dim=33,
                    text_dim=32, text_len=16, audio_dim=10752, audio_hidden=16)
    model = WanDiT(cfg).eval()
    model.load_state_dict(weights, strict=True)
    return model, tensors


@torch.no_grad()
def test_wan_case1_single_sample(wan):
    model, o = wan
    out = model(o["input.x"], o["input.t"], o["input.context"])
    torch.testing.assert_close(out, o["output"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_wan_case1_intermediates(wan):
    """Time path and patch embedding agree with the recorded intermediates (locates a mismatch)."""
    model, o = wan
    from models.dit import sinusoidal_embedding

    e = model.time_embedding(sinusoidal_embedding(256, o["input.t"]))
    torch.testing.assert_close(e, o["intermediate.time_embedding"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.time_projection(e), o["intermediate.time_projection"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.patch_embedding(o["input.x"]), o["intermediate.patch_embedding"],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(model.embed_context(o["input.context"], 1), o["intermediate.text_embedding"],
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_wan_case2_batch_with_short_context(wan):
    """Batch of two, per-sample timesteps 0 and 999; sample 1's context has 10 real rows (zero-padded)."""
    model, o = wan
    out = model(o["case2.input.x"], o["case2.input.t"], o["case2.input.context"])
    torch.testing.assert_close(out, o["case2.output"], atol=ATOL, rtol=0)
    # The same context passed unpadded gives the same result (padding happens inside).
    out1 = model(o["case2.input.x"][1:], o["case2.input.t"][1:], o["case2.input.context"][1:, :10])
    torch.testing.assert_close(out1, o["case2.output"][1:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_wan_case3_mixed_frame_counts(wan):
    """Samples of 3 and 5 latent frames in one batch, through per-sample lengths."""
    model, o = wan
    x0, x1 = o["case3.input.x.0"], o["case3.input.x.1"]
    x = torch.zeros(2, 16, 5, 8, 8)
    x[0, :, :3], x[1] = x0[0], x1[0]
    x[0, :, 3:] = 123.0  # padding content must not matter
    out = model(x, o["case3.input.t"], o["case3.input.context"], frame_lens=torch.tensor([3, 5]))
    torch.testing.assert_close(out[:1, :, :3], o["case3.output.0"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:], o["case3.output.1"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_omniavatar_with_audio(omni):
    model, o = omni
    audio = group_video_frames(o["input.audio_emb"])  # (1, 3, 4, 10752)
    out = model(o["input.x"], o["input.timestep"], o["input.context"], y=o["input.y"], audio=audio)
    torch.testing.assert_close(out, o["output"], atol=ATOL, rtol=0)
    packed = model.audio_proj(audio)
    torch.testing.assert_close(packed, o["intermediate.audio_proj"].view(1, 3, 16), atol=ATOL, rtol=0)


@torch.no_grad()
def test_omniavatar_unconditional_audio_branch(omni):
    model, o = omni
    audio = torch.zeros(1, 3, 4, 10752)
    out = model(o["input.x"], o["input.timestep"], o["input.context"], y=o["input.y"], audio=audio)
    torch.testing.assert_close(out, o["case2.output"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_omniavatar_batch_of_two_equals_each_alone(omni):
    """Upstream only handles batch 1; ours batches conditional and unconditional branches together."""
    model, o = omni
    audio = group_video_frames(o["input.audio_emb"])
    audio2 = torch.cat([audio, torch.zeros_like(audio)])
    rep = lambda k: o[k].expand(2, *o[k].shape[1:])  # noqa: E731
    out = model(rep("input.x"), o["input.timestep"].expand(2), rep("input.context"), y=rep("input.y"),
                audio=audio2)
    torch.testing.assert_close(out[:1], o["output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:], o["case2.output"], atol=ATOL, rtol=0)


def test_oracle_configs_match_what_we_build(oracles):
    from safetensors import safe_open

    with safe_open(oracles / "omniavatar_dit_tiny.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["config"])
    cfg = DiTConfig.from_wan_config({**meta, "num_heads": meta["num_heads"], "use_audio": True}, name="x")
    assert (cfg.dim, cfg.in_dim, cfg.num_layers, cfg.audio_hidden) == (64, 33, 6, 16)
    assert cfg.audio_layers == (2, 3)
