"""aiortc tracks: the avatar's video and audio out (both read from one pacer on one clock), the mic in.

Outgoing: aiortc's sender calls `recv()` in a loop and sends whatever it returns at once, so pacing is
the track's job. `AvatarVideoTrack` returns slot k at `t0 + k/fps` stamped `k * 3600` (90 kHz; aiortc's
own `VideoStreamTrack` is hard-wired to 30 fps); `AvatarAudioTrack` returns 20 ms packets of 48 kHz s16
mono stamped with their sample count at `t0 + n/48000`. A track that wakes up late by more than the
pacer's `max_lag_frames` skips to the slot due now (the pacer counts the frames it jumped over) rather
than returning a burst of early frames.

Incoming: aiortc decodes the mic into an unbounded queue, so `MicReader` drains it continuously on its
own task into the session (`push_audio` converts and appends under the session's bounded buffer, a
fraction of a millisecond per 20 ms packet, and never waits for generation).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from audio.pcm import MEDIA_SAMPLE_RATE
from audio.resample import PcmFormat, pcm_from_av_frame
from streaming.clock import VIDEO_TIME_BASE
from streaming.pacer import Pacer, PacerClosed, Slot

log = logging.getLogger(__name__)


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar's picture, one pacer slot per 1/fps."""

    kind = "video"

    def __init__(self, pacer: Pacer, on_sent: Callable[[Slot, float], None] | None = None) -> None:
        super().__init__()
        self._pacer, self._clock = pacer, pacer.clock
        self._on_sent = on_sent
        self._next = 0  # next slot to send
        self.sent = 0
        self.skipped = 0  # slots jumped over after a stall

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        clock = self._clock
        try:
            await self._pacer.wait_started()
            k = self._pacer.catch_up(self._next)  # SKIP_LATE: no burst after a stall
            self.skipped += k - self._next
            await clock.sleep_until(clock.video_due(k))
            slot = self._pacer.slot(k)
        except PacerClosed:
            self.stop()
            raise MediaStreamError from None
        frame = VideoFrame.from_ndarray(slot.video, format="rgb24")
        frame.pts = clock.video_pts(k)
        frame.time_base = VIDEO_TIME_BASE
        self._next = k + 1
        self.sent += 1
        if self._on_sent is not None:
            self._on_sent(slot, clock.now())
        return frame


class AvatarAudioTrack(MediaStreamTrack):
    """The audio paired with the avatar's frames, in 20 ms packets on the same clock."""

    kind = "audio"

    def __init__(self, pacer: Pacer) -> None:
        super().__init__()
        self._pacer, self._clock = pacer, pacer.clock
        self._next = 0  # next sample to send
        self.sent = 0
        self.skipped_samples = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        clock = self._clock
        n_pkt = clock.samples_per_packet
        try:
            await self._pacer.wait_started()
            n = self._next
            if clock.now() - clock.audio_due(n) > self._pacer.options.max_lag_frames / clock.fps:
                n = clock.audio_sample_at(clock.now())  # SKIP_LATE, packet-aligned
                self.skipped_samples += n - self._next
            await clock.sleep_until(clock.audio_due(n))
            pcm = self._pacer.audio(n, n_pkt)
        except PacerClosed:
            self.stop()
            raise MediaStreamError from None
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = clock.sample_rate
        frame.pts = n
        frame.time_base = clock.audio_time_base
        self._next = n + n_pkt
        self.sent += 1
        return frame


class MicReader:
    """Drains an inbound audio track into `push(pcm, fmt)` until the track ends."""

    def __init__(self, track: MediaStreamTrack, push: Callable[[np.ndarray, PcmFormat], None],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.track, self._push, self._now = track, push, now
        self.frames = 0
        self.seconds = 0.0  # of audio received
        self.rejected = 0  # packets push() refused (bad format, closed session)
        self.last_at: float | None = None

    async def run(self) -> None:
        """Returns when the remote track ends (the peer went away or closed)."""
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            self.seconds += frame.samples / (frame.sample_rate or MEDIA_SAMPLE_RATE)
            self.last_at = self._now()
            try:
                pcm, fmt = pcm_from_av_frame(frame)
                self._push(pcm, fmt)
            except (ValueError, RuntimeError) as exc:  # one bad packet never ends the call
                self.rejected += 1
                if self.rejected <= 3:
                    log.warning("mic packet rejected: %s", exc)

    def snapshot(self) -> dict:
        ago = None if self.last_at is None else round(self._now() - self.last_at, 3)
        return {"frames": self.frames, "seconds": round(self.seconds, 2), "rejected": self.rejected,
                "last_packet_s_ago": ago}
