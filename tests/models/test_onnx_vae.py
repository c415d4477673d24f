"""The VAE decoder under ONNX Runtime: parity with torch streaming, export cache, state, errors, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from models.config import VAE_TINY
from models.onnx_vae import (
    OnnxVaeDecoder,
    cached_export,
    export_path,
    weights_hash,
)
from models.vae import WanVAE

from helpers import decode_interleaved

LATENT = 4  # 4x4 latents -> 32x32 video: small enough for a 2-core CPU


@pytest.fixture(scope="module")
def vae(oracles) -> WanVAE:
    """The oracle's weights with Wan2.1's real latent statistics, so normalisation is in the graph."""
    weights = {k.removeprefix("weights."): v
               for k, v in load_file(oracles / "wan21_vae_tiny.safetensors").items() if k.startswith("weights.")}
    model = WanVAE(VAE_TINY).eval()
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="module")
def exported(vae, export_dir):
    """One export per test module (the slow part)."""
    path, exported_now = cached_export(vae, LATENT, LATENT, cache_dir=export_dir)
    assert exported_now
    return path


@pytest.fixture(scope="module")
def decoder(exported) -> OnnxVaeDecoder:
    return OnnxVaeDecoder(exported)


def latents(seed: int, frames: int) -> torch.Tensor:
    return torch.randn(1, 16, frames, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def torch_steps(vae: WanVAE, z: torch.Tensor) -> list[torch.Tensor]:
    state = vae.init_state(1, LATENT, LATENT)
    out = []
    for t in range(z.shape[2]):
        frames, state = vae.decode_step(state, z[:, :, t:t + 1])
        out.append(frames)
    return out


@pytest.mark.parametrize("io_binding", [True, False], ids=["iobinding", "plain_run"])
def test_onnx_streaming_matches_torch_streaming(vae, exported, io_binding):
    dec = OnnxVaeDecoder(exported, io_binding=io_binding)
    z = latents(0, 7)
    expected = torch_steps(vae, z)
    state = dec.init_state(1, LATENT, LATENT)
    for t in range(7):
        frames, state = dec.decode_step(state, z[:, :, t:t + 1])
        assert frames.shape == expected[t].shape == (1, 3, 1 if t == 0 else 4, 32, 32)
        assert frames.dtype == torch.float32
        assert (frames - expected[t]).abs().max() <= 1e-4, f"latent frame {t}"
    assert state.caches and all(isinstance(c, ort.OrtValue if io_binding else np.ndarray) for c in state.caches)


def test_offline_decode_and_numpy_input(vae, decoder):
    z = latents(1, 3)
    out = decoder.decode(z)
    assert out.shape == (1, 3, 9, 32, 32)
    assert (out - vae.decode(z)).abs().max() <= 1e-4
    frames, _ = decoder.decode_step(decoder.init_state(1, LATENT, LATENT), z[:, :, :1].numpy())
    assert torch.equal(frames, out[:, :, :1])


def test_provider_in_use_is_reported(decoder):
    assert decoder.provider == decoder._step.get_providers()[0]
    assert decoder.provider in ort.get_available_providers()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert decoder.provider == "CPUExecutionProvider"


def test_graphs_have_explicit_cache_inputs_and_outputs(vae, exported):
    n = len(vae.decoder.cache_shapes(1, LATENT, LATENT))
    step = onnx.load(str(exported), load_external_data=False)
    first = onnx.load(str(exported.with_name("decoder.first.onnx")), load_external_data=False)
    for g in (step, first):
        assert [i.name for i in g.graph.input] == ["z"] + [f"cache_{i:02d}" for i in range(n)]
        assert [o.name for o in g.graph.output] == ["frames"] + [f"new_cache_{i:02d}" for i in range(n)]
        shapes = [tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in g.graph.input[1:]]
        assert shapes == [tuple(s) for s in vae.decoder.cache_shapes(1, LATENT, LATENT)]  # static
    meta = {p.key: p.value for p in step.metadata_props}
    assert meta["weights_sha256"] == weights_hash(vae) and meta["role"] == "step"
    assert (meta["latent_h"], meta["latent_w"], meta["batch"]) == (str(LATENT), str(LATENT), "1")
    assert json.loads(meta["config"])["dim"] == VAE_TINY.dim


def test_export_cache_is_reused(vae, exported, export_dir, monkeypatch):
    mtime = exported.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("re-exported although a cached export exists")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    path, exported_now = cached_export(vae, LATENT, LATENT, cache_dir=export_dir)
    assert (path, exported_now) == (exported, False) and path.stat().st_mtime_ns == mtime
    dec = OnnxVaeDecoder.from_vae(vae, LATENT, LATENT, cache_dir=export_dir)  # a "second start"
    assert dec.paths[0] == exported


def test_cache_key_covers_weights_resolution_and_opset(vae, export_dir, monkeypatch):
    base = export_path(vae, LATENT, LATENT, cache_dir=export_dir)
    assert export_path(vae, LATENT, 6, cache_dir=export_dir) != base
    assert export_path(vae, LATENT, LATENT, batch=2, cache_dir=export_dir) != base
    assert export_path(vae, LATENT, LATENT, opset=17, cache_dir=export_dir) != base
    other = WanVAE(VAE_TINY)
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        other.decoder.head[2].bias.add_(1e-3)
    assert export_path(other, LATENT, LATENT, cache_dir=export_dir) != base
    monkeypatch.setenv("AVATARCAST_CACHE", str(export_dir / "env"))
    assert str(export_path(vae, LATENT, LATENT)).startswith(str(export_dir / "env"))


def test_onnx_state_isolation(vae, decoder):
    za, zb = latents(2, 3), latents(3, 3)
    alone_a, alone_b = decoder.decode(za), decoder.decode(zb)
    other = OnnxVaeDecoder(decoder.paths[0])  # a second decoder instance on the same files
    out_a, out_b = decode_interleaved([(decoder, za), (other, zb)])
    assert torch.equal(out_a, alone_a) and torch.equal(out_b, alone_b)


def test_onnx_bad_inputs(decoder):
    state = decoder.init_state(1, LATENT, LATENT)
    with pytest.raises(ValueError, match="8 channels.*expects 16"):
        decoder.decode_step(state, torch.zeros(1, 8, 1, LATENT, LATENT))
    nan = torch.zeros(1, 16, 1, LATENT, LATENT)
    nan[..., 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        decoder.decode_step(state, nan)
    with pytest.raises(ValueError, match="exported for batch 1 and 4x4 latents"):
        decoder.init_state(1, 5, 4)
    with pytest.raises(FileNotFoundError):
        OnnxVaeDecoder(decoder.paths[0].with_name("nope.onnx"))


def test_export_onnx_cli(tmp_path, vae):
    from typer.testing import CliRunner

    from app.cli import app
    from models.vae_loading import save_vae

    weights = save_vae(vae, tmp_path / "tiny_vae.safetensors")
    out = tmp_path / "export" / "decoder.onnx"
    result = CliRunner().invoke(app, ["export-onnx", "--vae", str(weights), "--height", "32", "--width", "32",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["step_graph"] == str(out) and out.is_file() and out.with_name("decoder.first.onnx").is_file()
    dec = OnnxVaeDecoder(out)
    z = latents(4, 2)
    assert (dec.decode(z) - vae.decode(z)).abs().max() <= 1e-4
    bad = CliRunner().invoke(app, ["export-onnx", "--vae", "tiny", "--height", "30", "--width", "32",
                                   "--out", str(tmp_path / "x.onnx")])
    assert bad.exit_code != 0 and "multiples of 8" in bad.output


@pytest.mark.gpu
def test_cuda_iobinding_keeps_caches_on_device(vae, exported):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA execution provider")
    dec = OnnxVaeDecoder(exported)
    assert dec.provider == "CUDAExecutionProvider"
    z = latents(5, 3)
    expected = torch_steps(vae, z)
    state = dec.init_state(1, LATENT, LATENT)
    for t in range(3):
        frames, state = dec.decode_step(state, z[:, :, t:t + 1].cuda())
        assert all(c.device_name() == "cuda" for c in state.caches)
        assert (frames.cpu() - expected[t]).abs().max() <= 1e-4
