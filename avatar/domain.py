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


# The demo model's domain, calibrated with its shipped VAE (app/demo_model/vae.safetensors) on the crops
# prepare_avatar makes (128x128, two faces 128x256). Round-trip PSNR, dB (tests/avatar/test_domain.py
# re-measures a few; `avatarcast bench domain` prints the separation):
#   held-out drawn faces (seeds >= 1,000,000), 680 crops: 100 identities x 4 emotions 24.81-31.01 (median
#   27.9), portraits of 128-1024 px 24.65-29.73, JPEG q75 24.54-30.11, random mouth/blink/pose states
#   25.18-31.41, 30 two-face scenes x 4 emotions 24.54-29.17: lowest 24.54, 0.54 dB above the threshold.
#   photos of people: skimage astronaut 21.88, insightface t1.jpg's faces 22.64-23.24: highest 23.24,
#   0.76 dB below. Other photos: coffee 19.6, camera 23.0, horse 17.6-18.7, flower.jpg 21.1-21.6,
#   china.jpg 22.1.
# Smooth or blurry images reconstruct well and pass: chelsea (a cat) 25.5, rocket 26.9, moon 31.4, clock
# 36.3, 25-px LFW faces upscaled 26.0-34.2. The check catches detailed photos, which is what users bring;
# the margins are thin (about 0.5-0.8 dB each side), so recalibrate whenever the demo VAE is retrained.
# Whole-crop PSNR separated faces better than the face box alone (drawn faces go down to 20.1 dB there,
# the astronaut is 20.3) or the gain over a bicubic 4x/8x down-up (overlaps on both sides).
DEMO_DOMAIN = ModelDomain(name="drawn faces", min_psnr_db=24.0)


@torch.no_grad()
def roundtrip_psnr(vae, image: np.ndarray, latent: torch.Tensor) -> float:
    """PSNR (dB) of `image` (H, W, 3) uint8 against the VAE's decode of its latent (1, C, 1, H/8, W/8),
    normalised as `WanVAE.encode` returns it."""
    from skimage.metrics import peak_signal_noise_ratio  # only models with a domain need it

    p = next(vae.parameters())
    decoded = vae.decode(latent.to(p.device, p.dtype), clamp=True)[0, :, 0]  # (3, H, W) in [-1, 1]
    recon = ((decoded.float() + 1) * 127.5).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return float(peak_signal_noise_ratio(image.astype(np.float32), recon, data_range=255.0))
