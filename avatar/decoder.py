"""Streaming VAE decode for one session: latent frames in, uint8 RGB frames out.

The backend is anything with the streaming decoder interface (`init_state`, `decode_step`): the torch
`WanVAE` or the ONNX Runtime `OnnxVaeDecoder`. The decode state belongs to the session.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from audio.align import video_frames_for_block
from avatar.types import frame_sample_bounds


class StreamingDecoder(Protocol):
    def init_state(self, batch: int, latent_h: int, latent_w: int) -> Any: ...

    def decode_step(self, state: Any, z: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, n, H, W) in [-1, 1] -> (n, H, W, 3) uint8 (clamped, rounded)."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, n, H, W)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


OPENING_LATENTS = 5  # latents a still face takes to settle the causal decoder (measured on the demo VAE:
# consecutive frames of a held latent change by 2.2 grey levels at first, by 0.07 from the 5th latent on)
SETTLED_OPENING_LATENTS = 2  # latent 1's decodes when the decoder is already settled on the reference: its
# frames are 47-57 dB from a cold 5-latent opening's (demo model, 4 clips; 1 decode: 40-44 dB)


STILL_OPENING_DBFS = -50.0  # a first latent's audio (RMS) under this: the stream opens still, on latent 1 held


def first_latent_samples(sample_rate: int, fps: int) -> slice:
    """The audio samples of latent 1's video frames (1-4) at `sample_rate`."""
    frames = video_frames_for_block(1, 1)
    return slice(frame_sample_bounds(frames.start, sample_rate, fps)[0],
                 frame_sample_bounds(frames.stop - 1, sample_rate, fps)[1])


def speaks_in(pcm: np.ndarray) -> bool:
    """Float samples (any rate) louder than STILL_OPENING_DBFS RMS."""
    x = np.asarray(pcm, np.float64)
    return bool(x.size) and 10 * np.log10(np.mean(x * x) + 1e-12) > STILL_OPENING_DBFS


def opens_moving(first_latent_audio: list[np.ndarray], faces: int) -> bool:
    """A stream opens moving: frame 0 the settled reference and latent 1 decoded from it
    (`FrameDecoder.open_still`, then `decode`), not latent 1 held (`open_at`). Held, frames 0-4 show latent
    1's last picture: right for a still face, but speech starting there would freeze mid-word for 200 ms.
    Only with one face: a silent one would shimmer into place, from the portrait to the model's drawing,
    while the other speaks. `first_latent_audio`: each speaker's samples of `first_latent_samples`."""
    return faces == 1 and any(speaks_in(x) for x in first_latent_audio)


@dataclass(frozen=True)
class Deflicker:
    """Takes part of a still pixel's step into a new latent back, on that latent's first frame only.

    Each latent redraws a face's still regions (hair, skin, background) slightly differently, and a causal
    decoder puts most of that change on the latent's first frame: a flicker every 4 frames (the demo model:
    0.4-0.6 grey levels into a latent vs 0.35-0.5 inside one where the teacher does not move). A pixel
    whose step is under `still_levels` grey levels (its largest channel) has `strength` x (1 - step /
    still_levels) of it taken back, so larger steps, motion such as a speaking mouth, pass untouched and
    nothing is delayed; the rest of a small step arrives with the next frame. Causal: it needs only the
    frame before."""

    strength: float = 0.5
    still_levels: float = 8.0

    def __post_init__(self) -> None:
        if not 0 <= self.strength <= 1 or not self.still_levels > 0:
            raise ValueError(f"deflicker strength must be in [0, 1] and still_levels positive, got "
                             f"{self.strength} and {self.still_levels}")

    def apply(self, frame: np.ndarray, before: np.ndarray) -> np.ndarray:
        """frame, before: (H, W, 3) uint8 -> frame with its still pixels' step from `before` reduced."""
        f = frame.astype(np.float32)
        step = f - before
        share = self.strength * np.clip(1 - np.abs(step).max(-1, keepdims=True) / self.still_levels, 0, 1)
        return np.clip(np.rint(f - share * step), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SettledReference:
    """A decoder state after the reference latent was held OPENING_LATENTS times, and its last frame.
    Decoder states are immutable (`decode_step` returns a new one), so sessions share it read-only."""

    state: Any
    frame: torch.Tensor  # (1, 3, 1, H, W)


class SettledReferences:
    """The settled decoder per reference latent (LRU, `capacity` entries), shared by an engine's sessions:
    an avatar's sessions after its first skip the reference's OPENING_LATENTS decodes. An entry is one
    stream's decoder caches (demo model: 9.1 MB; a 480p Wan VAE's are far larger), hence few of them: an
    avatar with an emotion reference per emotion takes one per emotion."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, SettledReference] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @staticmethod
    def key(backend, reference: torch.Tensor) -> str:
        data = reference.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return f"{id(backend)}:{tuple(reference.shape)}:{hashlib.sha1(data).hexdigest()}"

    def get(self, backend, reference: torch.Tensor, latent_hw: tuple[int, int]) -> SettledReference:
        key = self.key(backend, reference)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        state = backend.init_state(1, *latent_hw)
        for _ in range(OPENING_LATENTS):
            video, state = backend.decode_step(state, reference)
        settled = SettledReference(state, video[:, :, -1:])
        with self._lock:
            self._entries[key] = settled
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return settled


class FrameDecoder:
    """Per-session decode stream: the first latent gives 1 frame, every later one 4.

    A stream opens with `open_at` (frame 0, the decoder settled) and then decodes from latent 1 on. Its
    causal caches start empty, so decoded from cold even a perfectly still face changes visibly over the
    first two latents' frames (the whole face by 1-3 grey levels a frame, then less for about 16 frames):
    every stream would open with a shimmer that no audio asked for."""

    def __init__(self, backend: StreamingDecoder, latent_h: int, latent_w: int,
                 settled: SettledReferences | None = None, deflicker: Deflicker | None = None) -> None:
        self.backend = backend
        self.latent_hw = (latent_h, latent_w)
        self.settled_cache = settled
        self.deflicker = deflicker
        self.state = backend.init_state(1, latent_h, latent_w)
        self.latents_decoded = 0
        self._settled: SettledReference | None = None
        self._last: np.ndarray | None = None  # the last frame given out: what `deflicker` steps from

    def reset(self) -> None:
        self.state = self.backend.init_state(1, *self.latent_hw)
        self.latents_decoded = 0
        self._settled = None
        self._last = None

    def settle(self, reference: torch.Tensor) -> None:
        """Before the stream's first frame (the session still waits for audio): start from the decoder
        settled on `reference` (1, 16, 1, h, w), the reference latent, shared through `settled` and
        computed on first use, so that `open_at` needs SETTLED_OPENING_LATENTS decodes, not OPENING_LATENTS."""
        if self.latents_decoded or self._settled is not None:
            raise RuntimeError("a decode stream settles once, before its first latent")
        cache = self.settled_cache if self.settled_cache is not None else SettledReferences(capacity=1)
        self._settled = cache.get(self.backend, reference[:, :, :1], self.latent_hw)
        self.state = self._settled.state

    def open_still(self) -> np.ndarray:
        """Frame 0 (1, H, W, 3): the settled reference's last frame. Where nothing was generated after the
        reference (a held unit follows; its latents never reach the decoder), and where the stream opens
        moving (`opens_moving`: latent 1 then decodes from the settled state)."""
        if self._settled is None:
            raise RuntimeError("open_still needs a settled stream (settle)")
        if self.latents_decoded:
            raise RuntimeError("a decode stream opens once, before its first latent")
        self.latents_decoded = 1
        return self._given(to_uint8(self._settled.frame))

    def open_at(self, latent: torch.Tensor) -> np.ndarray:
        """Start the stream as if `latent` (1, 16, 1, h, w) had been held still for a while: decode it
        OPENING_LATENTS times and keep the last frame, which is returned as frame 0 (1, H, W, 3). `latent`
        is the stream's latent 1 (a latent of 4 frames), so the frames that follow it start from a settled
        decoder and from the face they continue: the reference latent itself (what the generators put at
        latent 0) is the portrait's encoding, which the model's own drawing departs from."""
        if self.latents_decoded:
            raise RuntimeError("a decode stream opens once, before its first latent")
        for _ in range(SETTLED_OPENING_LATENTS if self._settled is not None else OPENING_LATENTS):
            # only the last frame is shown: the others are not converted
            video, self.state = self.backend.decode_step(self.state, latent[:, :, :1])
            self.latents_decoded += 1
        return self._given(to_uint8(video[:, :, -1:]))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (1, 16, n, h, w) -> frames (1 or 4 per latent, H, W, 3) uint8, in order."""
        out = []
        for i in range(latents.shape[2]):
            video, self.state = self.backend.decode_step(self.state, latents[:, :, i:i + 1])
            out.append(self._given(to_uint8(video)))
            self.latents_decoded += 1
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)

    def _given(self, frames: np.ndarray) -> np.ndarray:
        """One decode step's frames on their way out: a latent's first frame deflickered (all of a later
        latent's frames come from one step; a stream's first frame starts none)."""
        if self.deflicker is not None and self._last is not None and frames.shape[0] > 1:
            frames[0] = self.deflicker.apply(frames[0], self._last)
        self._last = frames[-1]
        return frames
