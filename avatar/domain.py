"""Whether a portrait lies in a model's domain, measured with the model's own VAE.

A model bundle may declare a `ModelDomain`: the embedded demo model was trained on drawn procedural faces
(avatar/drawn/) only, and its VAE was trained on them too, so it reconstructs drawn faces well and detailed
photos poorly. A portrait whose VAE round trip (the reference latent the preparation already made,
decoded once) falls below the domain's PSNR threshold is out of the domain: the DiT, which only ever saw
latents of drawn faces, will smear it. That is a warning, never a refusal. Real weights (Wan2.1,
OmniAvatar) declare no domain and are never checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

REAL_WEIGHTS_HINT = "use real weights (README: 'Using real weights (Wan2.1, OmniAvatar, LiveTalk)')"


@dataclass(frozen=True)
class ModelDomain:
    """What a model was trained to draw, and the VAE round trip (PSNR, dB) a portrait of it reaches."""

    name: str  # for people: "drawn faces"
    min_psnr_db: float  # below this the portrait is out of the domain
    advice: str = REAL_WEIGHTS_HINT  # what to do instead

    def warning(self, psnr_db: float, source: str = "this portrait") -> str | None:
        """The message for a portrait with this round trip; None when it is in the domain."""
        if psnr_db >= self.min_psnr_db:
            return None
        return (f"{source} looks unlike the {self.name} this model was trained on (VAE round trip "
                f"{psnr_db:.1f} dB < {self.min_psnr_db:g} dB): it will be smeared; {self.advice}")


# The demo model's domain, calibrated with its shipped VAE (app/demo_model/vae.safetensors, its decoder
# adapted to the DiT's latents) on the crops prepare_avatar makes (128x128, two faces 128x256). Round-trip
# PSNR, dB (`avatarcast bench domain`; tests/avatar/test_domain.py re-measures a few):
#   held-out drawn faces (seeds >= 1,000,000): 100 identities x 4 emotions 24.34-29.79 (median 27.25),
#   JPEG q75 24.56-29.93, 30 two-face scenes 24.22-28.14: lowest 24.22, 0.82 dB above the threshold.
#   photos: skimage astronaut 21.62, insightface t1.jpg 22.52, camera 22.55, china.jpg 22.13, coffee 19.35,
#   horse 18.38, flower.jpg 20.7: highest 22.55, 0.85 dB below.
# (The VAE before the decoder's adaptation: drawn faces from 24.54 and photos up to 23.24, at 24.0.)
# Smooth or blurry images reconstruct well and pass: chelsea (a cat) 25.3, coins 24.5, rocket 26.1, moon
# 31.1, clock 32.1. The check catches detailed photos, which is what users bring; the margins are thin
# (about 0.8 dB each side), so recalibrate whenever the demo VAE is retrained.
# Whole-crop PSNR separated faces better than the face box alone (drawn faces go down to 20.1 dB there,
# the astronaut is 20.3) or the gain over a bicubic 4x/8x down-up (overlaps on both sides).
DEMO_DOMAIN = ModelDomain(name="drawn faces", min_psnr_db=23.4)


@torch.no_grad()
def roundtrip_psnr(vae, image: np.ndarray, latent: torch.Tensor) -> float:
    """PSNR (dB) of `image` (H, W, 3) uint8 against the VAE's decode of its latent (1, C, 1, H/8, W/8),
    normalised as `WanVAE.encode` returns it."""
    from skimage.metrics import peak_signal_noise_ratio  # only models with a domain need it

    p = next(vae.parameters())
    decoded = vae.decode(latent.to(p.device, p.dtype), clamp=True)[0, :, 0]  # (3, H, W) in [-1, 1]
    recon = ((decoded.float() + 1) * 127.5).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return float(peak_signal_noise_ratio(image.astype(np.float32), recon, data_range=255.0))
