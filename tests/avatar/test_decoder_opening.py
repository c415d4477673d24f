"""A decode stream opens on a settled decoder (`FrameDecoder.open_at`): a still face stays still from frame 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.decoder import OPENING_LATENTS, FrameDecoder
from models.vae import WanVAE


def _frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute change between consecutive frames, in grey levels."""
    return np.abs(np.diff(frames.astype(np.float32), axis=0)).mean((1, 2, 3))


def test_a_still_face_shimmers_when_decoded_from_cold_and_not_once_the_decoder_is_opened():
    """The demo VAE (the one users get): a drawn face's latent held still. Decoded from cold, the frames of
    the first latents change by grey levels; opened at that latent, frame 0 and the 12 frames after it
    change by under a tenth of a grey level."""
    from app.render_worker import demo_model_available, load_demo_models
    from avatar.drawn.face import Identity, render

    if not demo_model_available():
        pytest.skip("app/demo_model weights are not in the tree")
    models = load_demo_models(device="cpu")
    face = np.asarray(render(Identity.from_seed(1000011), size=(128, 128))[0])
    x = torch.from_numpy(face.copy()).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        still = models.vae.encode(x.expand(-1, -1, 13, -1, -1).contiguous())[:, :, 2:3]  # a latent of 4 frames

    cold = FrameDecoder(models.vae, 16, 16).decode(still.expand(-1, -1, 4, -1, -1).contiguous())  # 13 frames
    opened = FrameDecoder(models.vae, 16, 16)
    frames = np.concatenate([opened.open_at(still), opened.decode(still.expand(-1, -1, 3, -1, -1).contiguous())])
    print(f"\nframe-to-frame change, cold: {_frame_changes(cold).round(2)}; opened: {_frame_changes(frames).round(3)}")
    assert _frame_changes(cold)[:4].min() > 0.5
    assert _frame_changes(frames).max() < 0.1
    assert opened.latents_decoded == OPENING_LATENTS + 3


def test_a_stream_opens_once_before_its_first_latent():
    from models.config import vae_preset

    dec = FrameDecoder(WanVAE(vae_preset("tiny")).eval(), 4, 4)
    z = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        assert dec.open_at(z).shape == (1, 32, 32, 3)
        with pytest.raises(RuntimeError, match="opens once"):
            dec.open_at(z)
