"""Audio -> per-video-frame ``FaceState``: the teacher's definition of lip sync, blinks, motion, emotion.

Video frame ``f`` owns the samples ``[spf * f, spf * (f + 1))`` (``spf`` = 640 at 25 fps), as
everywhere in ``audio/``. Per frame:

1. mouth opening: RMS level of the frame's own samples in dBFS, mapped linearly from
   ``open_floor_dbfs`` (closed) to ``open_full_dbfs`` (open), gated by ``audio.vad`` (a frame is
   speech if any 20 ms VAD frame inside it is), smoothed with a Gaussian of ``smooth_frames`` (a
   symmetric kernel: zero phase, so the opening lags the audio by exactly 0 frames), then gated again
   so that the mouth is closed in every frame the VAD calls silence.
2. mouth width: spectral centroid of the frame's log-mel (``audio.features.MelFeatures``; low for
   rounded vowels such as "oo", high for "ee" and fricatives) on a log scale, smoothed the same way and
   faded to the rest width as the mouth closes, so a shut mouth does not twitch.
3. blinks: a renewal process, one every 2-6 s (uniform), ~150 ms each: closed at one frame centre,
   closing over 60 ms before it and opening over 90 ms after.
4. head motion: Gaussian-smoothed white noise (about 0.6 s correlation) per pose channel plus a small
   nod with the speech level, all scaled by ``motion``; ``motion=0`` gives exactly zero pose.
5. emotion: a constant smile / brow offset per clip (``EMOTIONS``), plus mouth gain and width offset.

``identity_seed`` sets a speaking style (mouth gain); ``seed`` drives the random processes (blinks,
motion). Both are deterministic. Levels assume speech around -20 dBFS RMS (the corpus normalises to
that); much quieter audio opens the mouth less.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter1d

from audio.features.mel import MelFeatures
from audio.pcm import MODEL_SAMPLE_RATE, as_mono_float32
from audio.vad import VadConfig, detect_speech
from avatar.drawn.emotions import EMOTIONS
from avatar.drawn.face import FaceState


@dataclass(frozen=True)
class AnimationConfig:
    open_floor_dbfs: float = -42.0  # frame RMS at or below this: closed
    open_full_dbfs: float = -10.0  # at or above this: fully open
    smooth_frames: float = 0.8  # Gaussian sigma, video frames (zero phase)
    centroid_mid: float = 0.16  # mel-centroid (fraction of the mel bands) of a mid-width mouth ...
    centroid_octaves: float = 1.32  # ... and its natural-log span from narrowest to widest
    rest_width: float = 0.5
    blink_interval_s: tuple[float, float] = (2.0, 6.0)
    blink_close_s: float = 0.06
    blink_open_s: float = 0.09
    motion_corr_s: float = 0.6  # head-motion noise correlation (Gaussian sigma)
    motion_dx: float = 0.025  # amplitudes at motion=1 (one standard deviation)
    motion_dy: float = 0.015
    motion_roll_deg: float = 5.0
    motion_scale: float = 0.03
    nod_dy: float = 0.012  # head dips this much at full mouth opening (times motion)
    brow_motion: float = 0.15  # brow wiggle at motion=1

    def __post_init__(self) -> None:
        if self.open_full_dbfs <= self.open_floor_dbfs:
            raise ValueError("open_full_dbfs must be above open_floor_dbfs")
        lo, hi = self.blink_interval_s
        if not 0 < lo <= hi:
            raise ValueError(f"blink_interval_s must be 0 < low <= high, got {self.blink_interval_s}")


def animate(wav16k: np.ndarray, identity_seed: int, fps: int = 25, motion: float = 0.0,
            emotion: str = "neutral", seed: int = 0, *, blinks: bool = True,
            config: AnimationConfig | None = None) -> list[FaceState]:
    """One ``FaceState`` per video frame (``ceil(len / spf)`` frames) for 16 kHz mono ``wav16k``."""
    c = config or AnimationConfig()
    x = as_mono_float32(wav16k, name="animate")
    spf = _samples_per_frame(fps)
    if not 0.0 <= float(motion) <= 1.0:
        raise ValueError(f"motion must be in [0, 1], got {motion!r}")
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {sorted(EMOTIONS)}")
    emo = EMOTIONS[emotion]
    n = -(-x.size // spf)
    if n == 0:
        return []
    style = np.random.default_rng([_seed(identity_seed, "identity_seed"), 0x5717])
    rng_blink, rng_motion = (np.random.default_rng([_seed(seed, "seed"), k]) for k in (1, 2))

    # 1. mouth opening: per-frame level, VAD-gated, zero-phase smoothing, gated again
    gate = speech_gate(x, n, spf)
    level = np.clip((frame_dbfs(x, n, spf) - c.open_floor_dbfs) / (c.open_full_dbfs - c.open_floor_dbfs), 0, 1)
    opening = _smooth(level * gate, c.smooth_frames) * gate
    opening = np.clip(opening * style.uniform(0.85, 1.1) * emo.open_gain, 0.0, 1.0)
    # 2. mouth width from the spectral centroid, faded to rest as the mouth closes
    width = np.clip(0.5 + (np.log(mel_centroid(x, n, fps)) - np.log(c.centroid_mid)) / c.centroid_octaves, 0, 1)
    width = _smooth(width, c.smooth_frames)
    fade = np.clip(opening * 3.0, 0.0, 1.0)
    width = np.clip(c.rest_width + emo.width_offset + (width - c.rest_width) * fade, 0.0, 1.0)
    # 3. blinks
    blink = blink_track(n, fps, rng_blink, c) if blinks else np.zeros(n)
    # 4. head motion (and brows) from smooth noise, scaled by motion
    noise = _smooth_noise(rng_motion, n, 5, c.motion_corr_s * fps)
    m = float(motion)
    dx = m * c.motion_dx * noise[0]
    dy = m * (c.motion_dy * noise[1] + c.nod_dy * opening)
    roll = m * c.motion_roll_deg * noise[2]
    scale = 1.0 + m * c.motion_scale * noise[3]
    brow = np.clip(emo.brow_raise + m * c.brow_motion * noise[4], 0.0, 1.0)
    # 5. assemble (pose clipped into FaceState's ranges)
    return [
        FaceState(mouth_open=float(opening[f]), mouth_width=float(width[f]), smile=emo.smile,
                  blink=float(blink[f]), brow_raise=float(brow[f]), dx=float(np.clip(dx[f], -0.25, 0.25)),
                  dy=float(np.clip(dy[f], -0.25, 0.25)), roll=float(np.clip(roll[f], -30, 30)),
                  scale=float(np.clip(scale[f], 0.7, 1.3)))
        for f in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Per-frame audio measurements (each frame f: samples [spf f, spf (f + 1)), zero-padded at the end)


def frame_dbfs(x: np.ndarray, n: int, spf: int) -> np.ndarray:
    """RMS level of each video frame's own samples in dBFS (floored at -100)."""
    frames = _pad(x, n * spf).reshape(n, spf).astype(np.float64)
    return 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-10)


def speech_gate(x: np.ndarray, n: int, spf: int) -> np.ndarray:
    """1.0 where any 20 ms VAD frame overlapping the video frame is speech, else 0.0."""
    vad = detect_speech(x)
    fs = VadConfig().frame_samples
    starts = np.arange(n) * spf // fs
    stops = np.minimum(-(-(np.arange(1, n + 1) * spf) // fs), vad.size)
    csum = np.concatenate([[0], np.cumsum(vad)])
    return (csum[np.maximum(stops, starts)] - csum[np.minimum(starts, vad.size)] > 0).astype(np.float64)


def mel_centroid(x: np.ndarray, n: int, fps: int) -> np.ndarray:
    """Spectral centroid per video frame, as a fraction of the mel bands (~0.07 "oo" .. ~0.7 "s")."""
    if fps == 25:  # MelFeatures is defined on the 25 fps grid
        mel = _mel_features()(x, n)
    else:  # other rates: analyse on the 25 fps grid and take the nearest 25 fps frame
        n25 = -(-x.size // 640)
        mel = _mel_features()(x, n25)[np.minimum((np.arange(n) + 0.5) * 25 / fps, n25 - 1).astype(int)]
    power = 10.0 ** (4.0 * mel.astype(np.float64) - 4.0)  # undo MelFeatures' (log10 + 4) / 4
    bands = np.arange(power.shape[1]) / (power.shape[1] - 1)
    return np.clip((power * bands).sum(axis=1) / (power.sum(axis=1) + 1e-20), 1e-3, 1.0)


def blink_track(n: int, fps: int, rng: np.random.Generator, c: AnimationConfig) -> np.ndarray:
    """Eyelid closure per frame: blinks 2-6 s apart, each fully closed at one frame centre."""
    out = np.zeros(n)
    t_frame = (np.arange(n) + 0.5) / fps
    t = rng.uniform(0.3, c.blink_interval_s[1])  # first blink
    while t < n / fps + c.blink_open_s:
        apex = (np.floor(t * fps) + 0.5) / fps  # snapped to a frame centre: every blink closes fully
        d = t_frame - apex
        closing = np.clip(1.0 + d / c.blink_close_s, 0.0, 1.0) * (d <= 0)
        opening = np.clip(1.0 - d / c.blink_open_s, 0.0, 1.0) * (d > 0)
        out = np.maximum(out, closing + opening)
        t += rng.uniform(*c.blink_interval_s)
    return out


# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mel_features() -> MelFeatures:
    return MelFeatures()  # stateless offline; building the filterbank once is enough


def _smooth(v: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase (symmetric) Gaussian smoothing; zeros beyond the ends for levels would bias the
    edges, so the edge values are repeated (``nearest``)."""
    return gaussian_filter1d(v.astype(np.float64), sigma, mode="nearest") if sigma > 0 else v.astype(np.float64)


def _smooth_noise(rng: np.random.Generator, n: int, channels: int, sigma: float) -> np.ndarray:
    """(channels, n) smooth noise with unit standard deviation (normalised analytically, so a frame's
    value does not depend on the clip length)."""
    pad = int(4 * sigma) + 1
    white = rng.standard_normal((channels, n + 2 * pad))
    smooth = gaussian_filter1d(white, sigma, axis=1, mode="constant")[:, pad: pad + n]
    return smooth * np.sqrt(2.0 * np.sqrt(np.pi) * sigma)


def _samples_per_frame(fps: int) -> int:
    if isinstance(fps, bool) or int(fps) != fps or fps <= 0 or MODEL_SAMPLE_RATE % int(fps):
        raise ValueError(f"fps must be a positive divisor of {MODEL_SAMPLE_RATE}, got {fps!r}")
    return MODEL_SAMPLE_RATE // int(fps)


def _seed(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _pad(x: np.ndarray, length: int) -> np.ndarray:
    return np.pad(x, (0, length - x.size)) if x.size < length else x[:length]
