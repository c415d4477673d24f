"""The engine's contract with every driver (WebRTC, RTMP, files): torch-free data types.

A session turns pushed audio into `AvatarFrame`s, each one video frame plus exactly the audio samples
of that frame's 1/fps, stamped with its frame index as pts. Sync therefore comes from one clock: the
audio leaving is the audio that came in, cut at frame boundaries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import AsyncIterator, Protocol

import numpy as np

from audio.pcm import VIDEO_FPS

DEFAULT_FPS = VIDEO_FPS  # the audio front ends and the VAE geometry are built for it


def frame_sample_bounds(frame: int, sample_rate: int, fps: int) -> tuple[int, int]:
    """Samples [start, end) of video frame `frame`: floor(n * sr / fps) boundaries, so frames of a
    rate not divisible by fps differ by one sample and no sample is lost or duplicated."""
    return frame * sample_rate // fps, (frame + 1) * sample_rate // fps


def frames_for_samples(num_samples: int, sample_rate: int, fps: int) -> int:
    """Video frames needed to carry `num_samples` of audio: the last partial frame counts (ceil)."""
    return -(-num_samples * fps // sample_rate)


@dataclass(frozen=True)
class Timing:
    """Where one frame's latency went, in milliseconds (0 where a stage did not run for it)."""

    wait_ms: float = 0.0  # the block's audio arriving: its first sample -> its last needed one (lookahead incl.)
    features_ms: float = 0.0
    denoise_ms: float = 0.0
    decode_ms: float = 0.0
    emit_ms: float = 0.0  # from push of the frame's last audio sample to the frame being ready

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class AvatarFrame:
    """One video frame and the audio of its 1/fps. pts counts frames: time = pts * time_base."""

    video: np.ndarray  # (H, W, 3) uint8 RGB
    audio: np.ndarray  # (samples,) float32 mono in [-1, 1], at `sample_rate`
    sample_rate: int
    pts: int
    fps: int = DEFAULT_FPS
    segment: int = 0  # which speech segment the audio belongs to; idle frames keep the last one
    idle: bool = False  # generated without speech (silence-driven motion)
    held: bool = False  # a repeat of the last frame: the session fell behind real time (`max_lag_s`)
    timing: Timing = field(default_factory=Timing)

    @property
    def time_base(self) -> Fraction:
        return Fraction(1, self.fps)

    @property
    def time_s(self) -> float:
        return self.pts / self.fps


@dataclass(frozen=True)
class SegmentEnd:
    """In-band marker: all frames of speech segment `segment` have been yielded (up to `pts`)."""

    segment: int
    pts: int


@dataclass(frozen=True)
class SessionError:
    """The session failed and is closed; other sessions continue."""

    message: str


SessionItem = AvatarFrame | SegmentEnd | SessionError


@dataclass
class SessionStats:
    """A session's running counts, as drivers and the admin API report them."""

    frames: int = 0
    idle_frames: int = 0
    blocks: int = 0
    dropped_input_samples: int = 0
    dropped_frames: int = 0  # unsent frames discarded by interrupt()
    held_frames: int = 0  # frames that repeat the last one because the session fell behind (`max_lag_s`)
    nonfinite_input_samples: int = 0
    silence_inserted_s: float = 0.0  # input filled with silence: live audio late or missing, a segment's tail
    stage_ms: dict[str, deque] = field(default_factory=lambda: {k: deque(maxlen=200) for k in
                                                                ("wait", "features", "denoise", "decode", "block")})


class AvatarSessionProtocol(Protocol):
    """What drivers use and read (the shape of LiveKit's avatar VideoGenerator and Pipecat's video
    services); `avatar.session.AvatarSession` implements it."""

    id: str
    stats: SessionStats

    def push_audio(self, pcm: np.ndarray, sample_rate: int, speaker: int = 0, channels: int = 1,
                   layout: str = "interleaved") -> None: ...

    def end_segment(self) -> None: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[SessionItem]: ...
