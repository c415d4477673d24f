"""Wan2.1 causal 3D VAE: oracle and diffusers parity, streaming == one-shot, causality, state, loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models.config import (
    VAE_DEMO,
    VAE_PRESETS,
    VAE_TINY,
    VAE_WAN_2_1,
    WAN_VAE_LATENTS_MEAN,
    WAN_VAE_LATENTS_STD,
    VAEConfig,
    vae_preset,
)
from models.vae import WanVAE, param_count, video_frames
from models.vae_loading import (
    diffusers_to_wan,
    infer_config,
    load_vae,
    save_vae,
    wan_to_diffusers,
)

from helpers import decode_interleaved

IDENTITY = dict(latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16)  # the oracle's scale: no (de)normalisation


@pytest.fixture(scope="module")
def oracle(oracles) -> dict[str, torch.Tensor]:
    return load_file(oracles / "wan21_vae_tiny.safetensors")


@pytest.fixture(scope="module")
def weights(oracle) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weights."): v for k, v in oracle.items() if k.startswith("weights.")}


@pytest.fixture(scope="module")
def vae(weights) -> WanVAE:
    """The oracle's weights with identity latent statistics, as the oracle was recorded."""
    model = WanVAE(VAE_TINY.replace(**IDENTITY)).eval()
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def oracle_decode(vae, oracle) -> list[torch.Tensor]:
    """Streamed decode of the oracle latents, one tensor per step (computed once per module)."""
    z = oracle["decode.input"]
    state = vae.init_state(1, 8, 8)
    steps = []
    for t in range(z.shape[2]):
        frames, state = vae.decode_step(state, z[:, :, t:t + 1])
        steps.append(frames)
    return steps


def small_latents(seed: int, frames: int, size: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, size, size, generator=g)


# ---- architecture -------------------------------------------------------------------------------


def test_parameter_names_and_shapes_match_wan21_checkpoint(oracles):
    expected = json.loads((oracles / "wan21_vae_keys.json").read_text())
    with torch.device("meta"):
        model = WanVAE(VAE_WAN_2_1)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert param_count(model) == 126_892_531


def test_tiny_has_the_oracle_key_set(weights):
    with torch.device("meta"):
        model = WanVAE(VAE_TINY)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in weights.items()}


def test_cache_slots_and_shapes():
    with torch.device("meta"):
        model = WanVAE(VAE_WAN_2_1)
    # 32 cached convs in the decoder (33 upstream slots minus the uncached 1x1x1 shortcut), 24 in the encoder
    dec = model.decoder.cache_shapes(1, 60, 104)
    assert len(dec) == 32 and len(model.encoder.cache_shapes(1, 480, 832)) == 24
    assert dec[0] == (1, 16, 2, 60, 104) and dec[-1] == (1, 96, 2, 480, 832)
    assert sorted({s[3] for s in dec}) == [60, 120, 240, 480]


def test_presets_and_config():
    assert vae_preset("tiny") is VAE_TINY and set(VAE_PRESETS) == {"tiny", "demo", "wan2.1"}
    assert VAE_WAN_2_1.dim == 96 and VAE_DEMO.dim < VAE_WAN_2_1.dim
    assert (VAE_TINY.spatial_factor, VAE_TINY.temporal_factor) == (8, 4)
    assert VAE_TINY.temporal_upsample == (True, True, False)
    assert VAE_TINY.latents_mean == WAN_VAE_LATENTS_MEAN and VAE_TINY.latents_std[0] == 2.8184
    assert VAEConfig.from_dict(VAE_DEMO.to_dict()) == VAE_DEMO
    with pytest.raises(KeyError, match="unknown VAE preset"):
        vae_preset("huge")
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAEConfig(name="bad", temporal_downsample=(True,))
    with pytest.raises(ValueError, match="z_dim"):
        VAEConfig(name="bad", z_dim=8)
    wide = VAE_DEMO.replace(encoder_dim=16)  # an encoder of its own width; the decoder keeps dim
    assert (wide.encoder_base, VAE_DEMO.encoder_base) == (16, VAE_DEMO.dim)
    assert VAEConfig.from_dict(wide.to_dict()) == wide
    with pytest.raises(ValueError, match="encoder_dim must be positive"):
        VAEConfig(name="bad", encoder_dim=0)


def test_diffusers_latent_statistics_match_ours():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ref = AutoencoderKLWan()
    cfg = VAEConfig.from_diffusers_config(dict(ref.config), name="wan2.1")
    assert cfg == VAE_WAN_2_1
    assert tuple(ref.config.latents_std) == WAN_VAE_LATENTS_STD


# ---- parity -------------------------------------------------------------------------------------


def test_decode_matches_oracle(oracle_decode, oracle):
    out = torch.cat(oracle_decode, dim=2)
    assert out.shape == (1, 3, 9, 64, 64)
    assert [f.shape[2] for f in oracle_decode] == [1, 4, 4]  # first latent -> 1 frame, later -> 4
    assert (out - oracle["decode.output"]).abs().max() <= 1e-4  # unclamped, as recorded


def test_encode_matches_oracle(vae, oracle):
    out = vae.encode(oracle["encode.input"])
    assert out.shape == (1, 16, 3, 8, 8)
    assert (out - oracle["encode.output"]).abs().max() <= 1e-5


def test_matches_diffusers_autoencoder_kl_wan(vae, weights):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    ref.load_state_dict(wan_to_diffusers(weights, VAE_TINY), strict=True)
    back = diffusers_to_wan(ref.state_dict(), VAE_TINY)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)

    z = small_latents(0, 3)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_video = ref.decode(z).sample  # diffusers clamps to [-1, 1]
        ref_latent = ref.encode(video).latent_dist.mode()
    assert (vae.decode(z, clamp=True) - ref_video).abs().max() <= 1e-4
    assert (vae.encode(video) - ref_latent).abs().max() <= 1e-5


# ---- streaming, causality, state ----------------------------------------------------------------


def test_streaming_decode_equals_one_shot(vae, oracle, oracle_decode):
    """Per-step frames, concatenated, are the upstream one-shot decode and our offline `decode`."""
    streamed = torch.cat(oracle_decode, dim=2)
    assert torch.equal(streamed, vae.decode(oracle["decode.input"]))
    assert (streamed - oracle["decode.output"]).abs().max() <= 1e-4


def test_streaming_encode_equals_one_shot(vae, oracle):
    video = oracle["encode.input"]
    state = vae.init_encode_state(1, 64, 64)
    latents = []
    for start, stop in [(0, 1), (1, 5), (5, 9)]:
        latent, state = vae.encode_step(state, video[:, :, start:stop])
        latents.append(latent)
    streamed = torch.cat(latents, dim=2)
    assert torch.equal(streamed, vae.encode(video))
    assert (streamed - oracle["encode.output"]).abs().max() <= 1e-5


def test_decode_is_causal(vae):
    z = small_latents(2, 3)
    full = vae.decode(z)
    assert full.shape[2] == video_frames(VAE_TINY, 3) == 9
    for n in (1, 2):
        assert torch.equal(vae.decode(z[:, :, :n]), full[:, :, :video_frames(VAE_TINY, n)])


def test_encode_is_causal(vae):
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    full = vae.encode(video)
    assert torch.equal(vae.encode(video[:, :, :5]), full[:, :, :2])
    assert torch.equal(vae.encode(video[:, :, :1]), full[:, :, :1])


def test_state_isolation_interleaved_streams(vae):
    za, zb = small_latents(4, 3), small_latents(5, 3)
    alone_a, alone_b = vae.decode(za), vae.decode(zb)
    out_a, out_b = decode_interleaved([(vae, za), (vae, zb)])
    assert torch.equal(out_a, alone_a) and torch.equal(out_b, alone_b)


def test_state_is_functional_bounded_and_resettable(vae):
    z = small_latents(6, 4)
    attrs_before = {name: set(vars(m)) for name, m in vae.named_modules()}
    state0 = vae.init_state(1, 4, 4)
    assert state0.first and all(c.abs().sum() == 0 for c in state0.caches)
    _, state1 = vae.decode_step(state0, z[:, :, :1])
    assert state0.first and all(c.abs().sum() == 0 for c in state0.caches)  # the old state is untouched
    assert not state1.first
    state = state1
    for t in range(1, 4):
        _, state = vae.decode_step(state, z[:, :, t:t + 1])
        assert [c.shape for c in state.caches] == [c.shape for c in state0.caches]  # no growth
    fresh, _ = vae.decode_step(state.reset(), z[:, :, :1])
    again, _ = vae.decode_step(vae.init_state(1, 4, 4), z[:, :, :1])
    assert torch.equal(fresh, again) and fresh.shape[2] == 1
    # nothing was stashed on any module: same attributes, and the only buffers are the latent statistics
    assert {name: set(vars(m)) for name, m in vae.named_modules()} == attrs_before
    assert [name for name, _ in vae.named_buffers()] == ["latents_mean", "latents_std"]


def test_latent_normalisation(weights):
    """Decoding normalised z with Wan's statistics == decoding z * std + mean with identity ones."""
    real = WanVAE(VAE_TINY).eval()
    real.load_state_dict(weights)
    ident = WanVAE(VAE_TINY.replace(**IDENTITY)).eval()
    ident.load_state_dict(weights)
    z = small_latents(7, 2)
    std = torch.tensor(WAN_VAE_LATENTS_STD).view(1, 16, 1, 1, 1)
    mean = torch.tensor(WAN_VAE_LATENTS_MEAN).view(1, 16, 1, 1, 1)
    assert (real.decode(z) - ident.decode(z * std + mean)).abs().max() <= 1e-5
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    assert (real.encode(video) - (ident.encode(video) - mean) / std).abs().max() <= 1e-5


def test_bad_inputs_raise_clear_errors(vae):
    state = vae.init_state(1, 4, 4)
    with pytest.raises(ValueError, match="8 channels.*expects 16"):
        vae.decode_step(state, torch.zeros(1, 8, 1, 4, 4))
    bad = torch.zeros(1, 16, 1, 4, 4)
    bad[0, 3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vae.decode_step(state, bad)
    with pytest.raises(ValueError, match="one latent frame at a time"):
        vae.decode_step(state, torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="does not match the stream"):
        vae.decode_step(state, torch.zeros(1, 16, 1, 4, 5))
    with pytest.raises(ValueError, match="latent_h must be a positive int"):
        vae.init_state(1, 0, 4)
    with pytest.raises(ValueError, match="multiples of 8.*63x64"):
        vae.encode(torch.zeros(1, 3, 5, 63, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.init_encode_state(1, 36, 32)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="4 channels.*expects 3"):
        vae.encode(torch.zeros(1, 4, 5, 32, 32))
    enc = vae.init_encode_state(1, 32, 32)
    with pytest.raises(ValueError, match="first chunk must have 1 frame"):
        vae.encode_step(enc, torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        vae.encode(torch.full((1, 3, 1, 32, 32), float("nan")))


# ---- loading ------------------------------------------------------------------------------------


def test_load_wan21_pth(tmp_path, weights, vae):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(weights, path)
    model = load_vae(path)
    assert model.cfg.dim == 8 and model.cfg.dim_mult == (1, 2, 4, 4)
    assert model.cfg.temporal_downsample == (False, True, True) and model.cfg.num_res_blocks == 2
    assert model.cfg.latents_mean == WAN_VAE_LATENTS_MEAN  # the real wrapper's statistics
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), vae.state_dict().values()))


def test_load_diffusers_directory(tmp_path, weights):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True])
    ref.load_state_dict(wan_to_diffusers(weights, VAE_TINY))
    ref.save_pretrained(tmp_path / "vae")
    model = load_vae(tmp_path)  # a pipeline folder: finds vae/
    assert model.cfg == VAE_TINY.replace(name="vae")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_own_safetensors_round_trip(tmp_path, vae):
    path = save_vae(vae, tmp_path / "vae.safetensors")
    model = load_vae(path)
    assert model.cfg == vae.cfg  # config travels in the metadata (identity statistics included)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), vae.state_dict().values()))


def test_infer_config_from_tensors(weights, oracles):
    assert infer_config(weights, name="x") == VAE_TINY.replace(name="x")
    real = {k: torch.empty(shape, device="meta")
            for k, shape in json.loads((oracles / "wan21_vae_keys.json").read_text()).items()}
    assert infer_config(real, name="Wan2.1_VAE") == VAE_WAN_2_1.replace(name="Wan2.1_VAE")


def test_loading_errors_name_file_key_and_shapes(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth.*config.json"):
        load_vae(tmp_path / "missing.pth")
    bad = dict(weights)
    bad["decoder.head.2.bias"] = torch.zeros(4)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"bad\.pth.*decoder\.head\.2\.bias.*\(4,\).*\(3,\)"):
        load_vae(path, config=VAE_TINY)
    del bad["decoder.head.2.bias"]
    torch.save(bad, path)
    with pytest.raises(ValueError, match="1 missing.*decoder.head.2.bias"):
        load_vae(path, config=VAE_TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown VAE file type"):
        load_vae(tmp_path / "w.npz")
