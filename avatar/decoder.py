"""Streaming VAE decode for one session: latent frames in, uint8 RGB frames out.

The backend is anything with the streaming decoder interface (`init_state`, `decode_step`): the torch
`WanVAE` or the ONNX Runtime `OnnxVaeDecoder`. The decode state belongs to the session.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class StreamingDecoder(Protocol):
    def init_state(self, batch: int, latent_h: int, latent_w: int) -> Any: ...

    def decode_step(self, state: Any, z: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, n, H, W) in [-1, 1] -> (n, H, W, 3) uint8 (clamped, rounded)."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, n, H, W)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


OPENING_LATENTS = 5  # latents a still face takes to settle the causal decoder (measured on the demo VAE:
# consecutive frames of a held latent change by 2.2 grey levels at first, by 0.07 from the 5th latent on)


class FrameDecoder:
    """Per-session decode stream: the first latent gives 1 frame, every later one 4.

    A stream opens with `open_at` (frame 0, the decoder settled) and then decodes from latent 1 on. Its
    causal caches start empty, so decoded from cold even a perfectly still face changes visibly over the
    first two latents' frames (the whole face by 1-3 grey levels a frame, then less for about 16 frames):
    every stream would open with a shimmer that no audio asked for."""

    def __init__(self, backend: StreamingDecoder, latent_h: int, latent_w: int) -> None:
        self.backend = backend
        self.latent_hw = (latent_h, latent_w)
        self.state = backend.init_state(1, latent_h, latent_w)
        self.latents_decoded = 0

    def reset(self) -> None:
        self.state = self.backend.init_state(1, *self.latent_hw)
        self.latents_decoded = 0

    def open_at(self, latent: torch.Tensor) -> np.ndarray:
        """Start the stream as if `latent` (1, 16, 1, h, w) had been held still for a while: decode it
        OPENING_LATENTS times and keep the last frame, which is returned as frame 0 (1, H, W, 3). `latent`
        is the stream's latent 1 (a latent of 4 frames), so the frames that follow it start from a settled
        decoder and from the face they continue: the reference latent itself (what the generators put at
        latent 0) is the portrait's encoding, which the model's own drawing departs from."""
        if self.latents_decoded:
            raise RuntimeError("a decode stream opens once, before its first latent")
        for _ in range(OPENING_LATENTS):  # only the last frame is shown: the others are not converted
            video, self.state = self.backend.decode_step(self.state, latent[:, :, :1])
            self.latents_decoded += 1
        return to_uint8(video[:, :, -1:])

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (1, 16, n, h, w) -> frames (1 or 4 per latent, H, W, 3) uint8, in order."""
        out = []
        for i in range(latents.shape[2]):
            video, self.state = self.backend.decode_step(self.state, latents[:, :, i:i + 1])
            out.append(to_uint8(video))
            self.latents_decoded += 1
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
