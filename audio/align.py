"""Video-frame features -> latent-frame groups, as the DiT's audio adapters consume them.

The Wan VAE compresses time 4x causally: latent frame 0 encodes video frame 0 alone, latent frame
``j >= 1`` encodes video frames ``4j-3 .. 4j``. A clip of ``L = 1 + 4k`` video frames therefore has
``1 + k`` latent frames. OmniAvatar's Audio Pack (and HunyuanVideo-Avatar's FAA) give every latent
frame four audio vectors, so latent 0 is filled by repeating video frame 0 (upstream:
``cat(repeat(a[:, :, :1], 3), a)`` -> ``L + 3 = 4(k + 1)`` frames, then groups of 4).

Table (latent -> video frames):   0 -> [0, 0, 0, 0]   1 -> [1, 2, 3, 4]   2 -> [5, 6, 7, 8]   j -> [4j-3 .. 4j]

Streaming generation works in blocks of ``n`` latents starting at latent ``s``; a block with ``s > 0``
needs video frames ``4s-3 .. 4(s+n)-4`` and no replication (``video_frames_for_block``).

Layouts (numpy in / numpy out; the model side converts to torch):
- Audio Pack: ``group_by_latent(features (T_video, D)) -> (T_lat, 4, D)``; the DiT flattens the last
  two axes (4 * D) before its Linear.
- FAA tokens: ``faa_tokens(features (T_video, D) or (T_video, K, D)) -> (T_lat, 4 * K, D)``: a latent
  frame's tokens are its four video frames' vectors (K tokens each, in time order).
"""

from __future__ import annotations

import numpy as np

from audio.pcm import VIDEO_FRAMES_PER_LATENT as _P

__all__ = [
    "faa_tokens", "group_by_latent", "latent_gather_index", "latent_to_video_frames",
    "num_latent_frames", "num_video_frames", "video_frames_for_block", "video_to_latent_frame",
]


def _check_index(value: int, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def num_latent_frames(num_video_frames: int) -> int:
    """Latent frames for ``1 + 4k`` video frames (raises for other counts; see ``num_video_frames``)."""
    t = _check_index(num_video_frames, "num_video_frames", 1)
    if (t - 1) % _P:
        raise ValueError(
            f"{t} video frames do not fill whole latent frames; a clip needs 1 + 4k frames "
            f"(nearest: {1 + _P * ((t - 1) // _P)} or {1 + _P * ((t - 1) // _P + 1)})"
        )
    return 1 + (t - 1) // _P


def num_video_frames(num_latents: int) -> int:
    """Video frames a clip of ``num_latents`` latent frames decodes to: ``1 + 4(num_latents - 1)``."""
    n = _check_index(num_latents, "num_latents", 1)
    return 1 + _P * (n - 1)


def latent_to_video_frames(latent_index: int) -> list[int]:
    """The four video frames whose features fill latent frame ``latent_index`` (latent 0: frame 0 x4)."""
    j = _check_index(latent_index, "latent_index")
    return [0] * _P if j == 0 else list(range(_P * j - _P + 1, _P * j + 1))


def video_to_latent_frame(video_index: int) -> int:
    """The latent frame that encodes video frame ``video_index``."""
    v = _check_index(video_index, "video_index")
    return 0 if v == 0 else (v + _P - 1) // _P


def video_frames_for_block(start_latent: int, num_latents: int) -> range:
    """Video frames whose features a block of latents ``[start_latent, start_latent + num_latents)``
    needs: ``0 .. 4n-4`` for the first block, ``4s-3 .. 4(s+n)-4`` after it."""
    s = _check_index(start_latent, "start_latent")
    n = _check_index(num_latents, "num_latents", 1)
    first = 0 if s == 0 else _P * s - _P + 1
    return range(first, _P * (s + n) - _P + 1)


def latent_gather_index(start_latent: int, num_latents: int) -> np.ndarray:
    """``(num_latents, 4)`` indices into the block's own feature rows (``video_frames_for_block``),
    replicating row 0 for latent 0."""
    frames = video_frames_for_block(start_latent, num_latents)
    table = np.array(
        [latent_to_video_frames(j) for j in range(start_latent, start_latent + num_latents)], dtype=np.int64
    )
    return table - frames.start


def group_by_latent(features: np.ndarray, start_latent: int = 0) -> np.ndarray:
    """Audio Pack layout: ``(T_video, ...)`` features of a block -> ``(T_lat, 4, ...)``.

    ``start_latent == 0``: ``T_video = 1 + 4k`` frames starting at video frame 0 (frame 0 replicated).
    ``start_latent = s > 0``: ``T_video = 4n`` frames starting at video frame ``4s - 3``.
    """
    x = np.asarray(features)
    if x.ndim < 1:
        raise ValueError("features must have a leading video-frame axis")
    t = x.shape[0]
    s = _check_index(start_latent, "start_latent")
    if s == 0:
        n = num_latent_frames(t) if t else 0
    else:
        if t % _P:
            raise ValueError(
                f"a block starting at latent {s} needs a multiple of {_P} video frames "
                f"(frames {_P * s - _P + 1}..), got {t}"
            )
        n = t // _P
    if n == 0:
        return np.zeros((0, _P, *x.shape[1:]), dtype=x.dtype)
    return x[latent_gather_index(s, n)]


def faa_tokens(features: np.ndarray, start_latent: int = 0) -> np.ndarray:
    """FAA layout: ``(T_video, D)`` or ``(T_video, K, D)`` -> ``(T_lat, 4 * K, D)`` audio tokens per
    latent frame, video frames in time order, each frame's K tokens contiguous."""
    x = np.asarray(features)
    if x.ndim not in (2, 3):
        raise ValueError(f"features must be (T_video, D) or (T_video, K, D), got shape {x.shape}")
    grouped = group_by_latent(x if x.ndim == 3 else x[:, None, :], start_latent)  # (T_lat, 4, K, D)
    t_lat, four, k, d = grouped.shape
    return grouped.reshape(t_lat, four * k, d)
