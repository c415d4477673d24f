"""The DiT's extra loss terms: through the frozen decoder (the mouth crop it decodes, what it compares, where
it applies), and on the change from latent to latent."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.config import VAE_DEMO
from models.sampling import add_noise
from models.vae import WanVAE
from training.latents import LatentClip, LatentStore
from training.train_dit import (Batches, DiTTrainConfig, decoded_loss, dit_loss, frame_sigmas, mouth_crops,
                                train_dit)


def _decoder() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAE_DEMO).requires_grad_(False).eval()


def test_the_crop_is_the_square_around_the_mouth_kept_inside_the_frame():
    z = torch.arange(2 * 1 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 1, 8, 8)
    mouth = torch.zeros(2, 8, 8)
    mouth[0, 4:6, 3:5] = 1.0  # centre (4.5, 3.5): the 4x4 square from (3, 2)
    mouth[1, 7, 7] = 1.0  # in the corner: the square is pushed back inside
    crops = mouth_crops(z, mouth, 4)
    assert crops.shape == (2, 1, 1, 4, 4)
    assert torch.equal(crops[0], z[0, :, :, 3:7, 2:6])
    assert torch.equal(crops[1], z[1, :, :, 4:8, 4:8])
    assert torch.equal(mouth_crops(z, torch.zeros(2, 8, 8), 4)[0], z[0, :, :, 2:6, 2:6])  # no mouth: the centre
    with pytest.raises(ValueError, match="does not fit"):
        mouth_crops(z, mouth, 9)


def test_the_decoded_loss_sees_the_mouth_crop_only_and_leaves_the_decoder_frozen():
    vae = _decoder()
    g = torch.Generator().manual_seed(1)
    target = torch.randn(1, 16, 3, 8, 8, generator=g)
    mouth = torch.zeros(1, 8, 8)
    mouth[0, 1:3, 1:3] = 1.0  # a 4-cell crop at rows / columns 0-3
    assert float(decoded_loss(vae, target, target, mouth, 4)) == 0.0
    outside = target.clone()
    outside[..., 6:, 6:] += 3.0
    assert float(decoded_loss(vae, outside, target, mouth, 4)) == 0.0
    inside = target.clone().requires_grad_(True)
    loss = decoded_loss(vae, inside + 3.0 * (torch.arange(8) < 4).float().view(1, 1, 1, 1, 8), target, mouth, 4)
    assert float(loss.detach()) > 0
    loss.backward()
    assert inside.grad[..., :4, :4].abs().sum() > 0 and inside.grad[..., 4:, :].abs().sum() == 0
    assert all(p.grad is None for p in vae.parameters())  # the decoder stays frozen


def _clip(faces: int) -> LatentClip:
    rng = np.random.default_rng(faces)
    w = 8 * faces
    mouth = np.zeros((8, w), np.float32)
    mouth[5:7, 3:5] = 1.0
    return LatentClip(latents=rng.standard_normal((16, 8, 8, w)).astype(np.float16),
                      emotion=rng.standard_normal((16, 1, 8, w)).astype(np.float16),
                      features=rng.standard_normal((faces, 29, 80)).astype(np.float32),
                      masks=np.ones((faces, 4, 4 * faces), np.float32), motion=0.5, emotions=("happy",) * faces,
                      mouth=mouth)


class _FixedVelocity(torch.nn.Module):
    """Predicts one fixed velocity, so the loss's terms can be recomputed by hand."""

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.v = v

    def forward(self, xt, *args, **kwargs):
        return self.v.expand_as(xt)


@pytest.mark.parametrize("faces", [1, 2])
def test_dit_loss_adds_the_decoded_term_on_the_predicted_clean_latents_of_single_face_windows(faces):
    vae = _decoder()
    cfg = DiTTrainConfig(stage="audio", batch=1, window_latents=3, block_latents=1, decoded_weight=2.0,
                         decoded_crop=4)
    batch = {k: torch.as_tensor(v)[None] for k, v in Batches._window(_clip(faces), s=2, n=3).items()}
    model = _FixedVelocity(torch.randn(1, 16, 1, 8, 8 * faces, generator=torch.Generator().manual_seed(2)))
    without = dataclasses.replace(cfg, decoded_weight=0.0)
    plain = float(dit_loss(model, batch, without, torch.Generator().manual_seed(3)))
    total = float(dit_loss(model, batch, cfg, torch.Generator().manual_seed(3), vae))
    if faces == 2:  # a scene's two mouths do not fit one crop: the velocity loss alone
        assert total == plain
        return
    # the same draws as dit_loss: its noise levels, then its noise
    g = torch.Generator().manual_seed(3)
    x0 = batch["latents"]
    sigma = frame_sigmas(1, x0.shape[2], cfg, g)
    eps = torch.randn(x0.shape, generator=g)
    xt = add_noise(x0, eps, sigma)
    x0_pred = xt - sigma[:, None, :, None, None] * model.v
    assert not torch.allclose(x0_pred[:, :, 1:], x0[:, :, 1:])
    expected = plain + 2.0 * float(decoded_loss(vae, x0_pred[:, :, 1:], x0[:, :, 1:], batch["mouth"], 4))
    assert total == pytest.approx(expected, rel=1e-5)


def test_a_decoded_weight_without_a_decoder_is_refused(tmp_path):
    store = LatentStore(tmp_path / "latents")
    store.write("c", _clip(1))
    with pytest.raises(ValueError, match="needs the decoder"):
        train_dit(store, tmp_path, DiTTrainConfig(stage="base", steps=1, decoded_weight=1.0))


class _CleanPlusError(torch.nn.Module):
    """Predicts the velocity whose clean latents are the data's plus `error` (B, 16, n, h, w) on the window."""

    def __init__(self, x0: torch.Tensor, error: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.error = x0, error

    def forward(self, xt, t, *args, **kwargs):
        sigma = (t / 1000.0)[:, None, :, None, None]  # (B, 1, F, 1, 1)
        want = torch.cat([self.x0[:, :, :1], self.x0[:, :, 1:] + self.error], dim=2)
        return torch.where(sigma > 0, (xt - want) / sigma.clamp(min=1e-6), torch.zeros_like(xt))


def test_the_temporal_term_costs_a_change_from_latent_to_latent_not_a_steady_error():
    cfg = DiTTrainConfig(stage="audio", batch=1, window_latents=4, block_latents=1, mouth_weight=1.0)
    batch = {k: torch.as_tensor(v)[None] for k, v in Batches._window(_clip(1), s=2, n=4).items()}
    x0 = batch["latents"].float()
    steady = torch.full((1, 16, 4, 8, 8), 0.3)
    flicker = steady * torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 4, 1, 1)  # the same size, sign flipping

    def loss(error, weight):
        return float(dit_loss(_CleanPlusError(x0, error), batch, dataclasses.replace(cfg, temporal_weight=weight),
                              torch.Generator().manual_seed(4)))

    assert loss(steady, 2.0) == pytest.approx(loss(steady, 0.0), rel=1e-4)  # a steady error does not change
    # a flipping one does: each of its 3 changes is 0.6, squared 0.36, times the weight 2
    assert loss(flicker, 2.0) - loss(flicker, 0.0) == pytest.approx(2.0 * 0.36, rel=1e-3)
