"""Media time for one outgoing stream: 90 kHz video pts, a sample clock for audio, one wall-clock origin.

Both tracks of a session derive their timestamps from the same origin `t0`: video frame slot `k` is
due at `t0 + k / fps` and stamped `k * 90000 / fps`; audio sample `n` is due at `t0 + n / sample_rate`
and stamped `n`. The browser lip-syncs from RTCP sender reports, which pair a packet's send time with its
RTP timestamp, so each track's pts must advance in step with real send time from the shared origin:
a track that falls behind skips its pts forward to "now" (`video_slot_at` / `audio_sample_at`) and both
stay anchored to `t0`; nothing is ever sent early to catch up.

`now` and `sleep` are injectable, so the pacer and tracks can be tested with a fake clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from fractions import Fraction
from typing import Awaitable, Callable

from audio.pcm import MEDIA_SAMPLE_RATE, VIDEO_FPS

VIDEO_CLOCK_RATE = 90_000  # RTP video clock (Hz)
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_PTIME_S = 0.020  # 20 ms audio packets


class MediaClock:
    """One session's media clock. `start()` fixes the origin; until then nothing is due."""

    def __init__(self, fps: int = VIDEO_FPS, sample_rate: int = MEDIA_SAMPLE_RATE, *,
                 now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if fps <= 0 or VIDEO_CLOCK_RATE % fps:
            raise ValueError(f"fps must divide {VIDEO_CLOCK_RATE} (got {fps})")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive (got {sample_rate})")
        self.fps, self.sample_rate = fps, sample_rate
        self.now, self._sleep = now, sleep
        self.t0: float | None = None
        self.audio_time_base = Fraction(1, sample_rate)

    # ---- origin -------------------------------------------------------------------------------------
    def start(self, t0: float | None = None) -> float:
        """Fix the shared origin (idempotent: the first call wins)."""
        if self.t0 is None:
            self.t0 = self.now() if t0 is None else t0
        return self.t0

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def _origin(self) -> float:
        if self.t0 is None:
            raise RuntimeError("the media clock has not started")
        return self.t0

    # ---- video: slot k <-> 90 kHz pts <-> wall time ----------------------------------------------------
    @property
    def video_ticks_per_frame(self) -> int:
        return VIDEO_CLOCK_RATE // self.fps  # 3600 at 25 fps

    def video_pts(self, slot: int) -> int:
        return slot * self.video_ticks_per_frame

    def video_due(self, slot: int) -> float:
        return self._origin() + slot / self.fps

    def video_slot_at(self, t: float) -> int:
        """The slot whose time window contains wall time t (the one to send now when late)."""
        return max(0, math.floor((t - self._origin()) * self.fps + 1e-9))

    # ---- audio: sample count <-> wall time ----------------------------------------------------------
    @property
    def samples_per_packet(self) -> int:
        return round(self.sample_rate * AUDIO_PTIME_S)  # 960 at 48 kHz

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps  # 1920 at 48 kHz / 25 fps

    def audio_due(self, sample: int) -> float:
        return self._origin() + sample / self.sample_rate

    def audio_sample_at(self, t: float) -> int:
        """The packet-aligned sample position due at wall time t."""
        n = max(0, math.floor((t - self._origin()) * self.sample_rate + 1e-6))
        return n - n % self.samples_per_packet

    # ---- waiting --------------------------------------------------------------------------------------
    async def sleep_until(self, t: float) -> None:
        """Sleep until wall time t (returns at once when t has passed; never sends early)."""
        delay = t - self.now()
        if delay > 0:
            await self._sleep(delay)


class FakeClock:
    """A manual clock for tests: `sleep` advances time instantly; `advance` simulates a stall."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.sleeps.append(dt)
        self.t += max(0.0, dt)
        await asyncio.sleep(0)

    def advance(self, dt: float) -> None:
        self.t += dt

    def media_clock(self, fps: int = VIDEO_FPS, sample_rate: int = MEDIA_SAMPLE_RATE) -> MediaClock:
        return MediaClock(fps, sample_rate, now=self.now, sleep=self.sleep)
