"""The bounded buffer between a session's paired frames and what sends them: a call's two WebRTC
tracks, or a broadcaster.

The engine hands out `AvatarFrame`s (one video frame + exactly its 1/fps of audio) in bursts, one
generation block at a time. The pacer holds them and assigns them to output *slots*: slot `k` is the
k-th 1/fps of wall time after the media clock's origin. Both tracks read the same slot — video takes
its picture, audio takes its samples in 20 ms packets — so what leaves together was generated together.

Rules (the named policies):
- start: the clock starts when the first `start_frames` frames are in; both tracks wait for it.
- underrun (REPEAT_LAST): a slot that comes due with nothing buffered repeats the last picture with
  silence; time keeps moving, nothing bursts later.
- overflow (`audio.buffer.OverflowPolicy`): at `max_frames` buffered, DROP_OLDEST discards the oldest
  unplayed frame (latency stays bounded), DROP_NEWEST the arriving one (continuity, latency grows), and
  RAISE refuses it (a feeder that waits for room, as the broadcaster does, never gets there).
- stall (SKIP_LATE): a reader more than `max_lag_frames` behind jumps to the slot due now; the slots
  in between are resolved (their frames are dropped and counted) instead of being sent in a burst.
- trim (TRIM_EXCESS): if the buffer never fell below `trim_above_frames` for `trim_window_frames`
  slots, the excess is dropped so the latency that a hiccup added comes back down.
Everything runs on the event loop; the pacer only moves arrays.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from audio.buffer import BufferOverflowError, OverflowPolicy
from avatar.types import AvatarFrame
from streaming.clock import MediaClock


class PacerClosed(Exception):
    """The pacer was closed: its tracks end."""


@dataclass(frozen=True)
class PacerOptions:
    max_frames: int = 50  # hard bound on buffered frames (2 s at 25 fps)
    overflow: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    start_frames: int = 1  # frames buffered before the clock starts
    max_lag_frames: int = 3  # a track later than this skips forward instead of bursting
    trim_above_frames: int | None = 12  # None disables latency trimming
    trim_window_frames: int = 125  # 5 s of slots
    history_slots: int = 64  # resolved slots kept for the track that reads a slot second

    def __post_init__(self) -> None:
        if self.max_frames < 1 or not 1 <= self.start_frames <= self.max_frames:
            raise ValueError("need max_frames >= 1 and 1 <= start_frames <= max_frames")
        if self.max_lag_frames < 1 or self.history_slots < self.max_lag_frames + 2:
            raise ValueError("need max_lag_frames >= 1 and history_slots >= max_lag_frames + 2")


@dataclass(frozen=True)
class Slot:
    """What goes out during one 1/fps of wall time."""

    index: int
    video: np.ndarray  # (H, W, 3) uint8 RGB, C-contiguous
    audio: np.ndarray  # (samples_per_frame,) int16 mono, as the WebRTC tracks send it
    pcm: np.ndarray  # (samples_per_frame,) float32 mono: the frame's own samples (a broadcast encodes these)
    repeated: bool  # underrun: last picture again, silence
    idle: bool  # made without speech (a repeated slot too)
    pts: int | None = None  # the engine's frame index; None on underrun
    arrived_at: float | None = None  # wall time the frame entered the pacer; None on underrun
    audio_at: float | None = None  # wall time the frame's newest input audio arrived; None for idle frames


@dataclass
class PacerStats:
    pushed: int = 0
    slots: int = 0  # slots resolved (output time)
    played: int = 0  # slots that carried a new frame
    repeated: int = 0  # underrun slots
    dropped_overflow: int = 0
    dropped_late: int = 0  # frames of slots skipped after a stall
    dropped_trim: int = 0
    max_level: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class PacerListener(Protocol):
    def on_drop(self, reason: str, count: int) -> None: ...

    def on_repeat(self) -> None: ...


@dataclass
class _Queued:
    video: np.ndarray
    audio: np.ndarray
    pcm: np.ndarray
    idle: bool
    pts: int
    arrived_at: float
    audio_at: float | None


class Pacer:
    """Frames in (`push`), slots out (`slot`, `audio`), on one `MediaClock`."""

    def __init__(self, clock: MediaClock, options: PacerOptions = PacerOptions(),
                 listener: PacerListener | None = None) -> None:
        self.clock, self.options, self.listener = clock, options, listener
        self.stats = PacerStats()
        self._frames: deque[_Queued] = deque()
        self._history: OrderedDict[int, Slot] = OrderedDict()
        self._next_slot = 0  # first slot not yet resolved
        self._last_video: np.ndarray | None = None
        self._silence = np.zeros(clock.samples_per_frame, np.int16)
        self._silence_pcm = np.zeros(clock.samples_per_frame, np.float32)
        self._started = asyncio.Event()
        self._closed = False
        self._window_min: int | None = None  # lowest buffer level seen in the current trim window
        self._window_slots = 0

    # ---- input (the session feeder) ------------------------------------------------------------------
    @property
    def level(self) -> int:
        return len(self._frames)

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, frame: AvatarFrame) -> None:
        """Queue one engine frame; starts the clock when enough frames are in."""
        if self._closed:
            return
        spf = self.clock.samples_per_frame
        if frame.sample_rate != self.clock.sample_rate or frame.audio.size != spf:
            raise ValueError(f"frame audio is {frame.audio.size} samples at {frame.sample_rate} Hz; the pacer "
                             f"needs {spf} at {self.clock.sample_rate} Hz (open the session at that rate)")
        if frame.fps != self.clock.fps:
            raise ValueError(f"the frame is at {frame.fps} fps; the pacer runs at {self.clock.fps} fps")
        full = len(self._frames) >= self.options.max_frames
        if full and self.options.overflow is OverflowPolicy.RAISE:
            raise BufferOverflowError(f"the pacer already holds {self.options.max_frames} frames; wait for "
                                      "room before pushing")
        pcm = np.asarray(frame.audio, np.float32)
        audio = (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16)
        now = self.clock.now()
        audio_at = None
        if not frame.idle and frame.timing.emit_ms > 0:
            audio_at = now - frame.timing.emit_ms / 1000.0
        item = _Queued(np.ascontiguousarray(frame.video, dtype=np.uint8), audio, pcm, frame.idle, frame.pts, now,
                       audio_at)
        self.stats.pushed += 1
        if self._last_video is None:
            self._last_video = np.zeros_like(item.video)  # black until the first slot plays
        if full:
            self._drop("overflow", 1)
            if self.options.overflow is OverflowPolicy.DROP_NEWEST:
                return
            self._frames.popleft()
        self._frames.append(item)
        self.stats.max_level = max(self.stats.max_level, len(self._frames))
        if not self.clock.started and len(self._frames) >= self.options.start_frames:
            self.clock.start()
            self._started.set()

    def clear(self) -> int:
        """Drop every buffered frame (barge-in); returns how many."""
        n = len(self._frames)
        self._frames.clear()
        return n

    def close(self) -> None:
        self._closed = True
        self._frames.clear()
        self._started.set()  # wake the tracks so they can end

    async def wait_started(self) -> None:
        await self._started.wait()
        if self._closed:
            raise PacerClosed

    # ---- output (the tracks) ----------------------------------------------------------------------------
    def slot(self, k: int) -> Slot:
        """Slot k, resolving every earlier unresolved slot first (each exactly once)."""
        if self._closed:
            raise PacerClosed
        if k < self._next_slot:
            got = self._history.get(k)
            if got is not None:
                return got
            # older than the history: a track this far behind only needs something of the right shape
            return self._repeat(k)
        self.skip_to(k)
        return self._resolve(k, skipped=False)

    def catch_up(self, k: int) -> int:
        """SKIP_LATE for a reader about to read slot k: k itself, or the slot due now when k is more than
        `max_lag_frames` late (the slots in between are resolved as skipped, see `skip_to`)."""
        clock = self.clock
        now = clock.now()
        if now - clock.video_due(k) <= self.options.max_lag_frames / clock.fps:
            return k
        due = clock.video_slot_at(now)
        self.skip_to(due)
        return due

    def skip_to(self, k: int) -> None:
        """SKIP_LATE: resolve every slot before k not resolved yet as skipped (its frame, if one was
        buffered, is dropped as late), so that reading resumes at slot k without a burst."""
        if self._closed:
            raise PacerClosed
        while self._next_slot < k:
            self._resolve(self._next_slot, skipped=True)

    def audio(self, start_sample: int, num_samples: int) -> np.ndarray:
        """int16 mono samples [start, start + n) of the output timeline (spanning slots as needed)."""
        spf = self.clock.samples_per_frame
        out = np.empty(num_samples, np.int16)
        pos = 0
        while pos < num_samples:
            k, off = divmod(start_sample + pos, spf)
            take = min(spf - off, num_samples - pos)
            out[pos:pos + take] = self.slot(k).audio[off:off + take]
            pos += take
        return out

    def _resolve(self, k: int, skipped: bool) -> Slot:
        self._observe_level()
        if self._frames:
            q = self._frames.popleft()
            self._last_video = q.video
            slot = Slot(k, q.video, q.audio, q.pcm, repeated=False, idle=q.idle, pts=q.pts, arrived_at=q.arrived_at,
                        audio_at=q.audio_at)
            if skipped:
                self._drop("late", 1)
            else:
                self.stats.played += 1
        else:
            slot = self._repeat(k)
            self.stats.repeated += 1
            if self.listener is not None:
                self.listener.on_repeat()
        self.stats.slots += 1
        self._next_slot = k + 1
        self._history[k] = slot
        while len(self._history) > self.options.history_slots:
            self._history.popitem(last=False)
        return slot

    def _observe_level(self) -> None:
        """TRIM_EXCESS: track the lowest level over a window; drop what never drained."""
        limit = self.options.trim_above_frames
        if limit is None:
            return
        level = len(self._frames)
        self._window_min = level if self._window_min is None else min(self._window_min, level)
        self._window_slots += 1
        if self._window_slots >= self.options.trim_window_frames:
            excess = self._window_min - limit
            if excess > 0:
                for _ in range(excess):
                    self._frames.popleft()
                self._drop("trim", excess)
            self._window_min, self._window_slots = None, 0

    def _drop(self, reason: str, count: int) -> None:
        setattr(self.stats, f"dropped_{reason}", getattr(self.stats, f"dropped_{reason}") + count)
        if self.listener is not None:
            self.listener.on_drop(reason, count)

    def _repeat(self, k: int) -> Slot:
        """Underrun: the last picture again, with silence."""
        if self._last_video is None:  # readers only read after a push (tracks: after wait_started)
            raise RuntimeError("the pacer has not received a frame yet")
        return Slot(k, self._last_video, self._silence, self._silence_pcm, repeated=True, idle=True)

    def snapshot(self) -> dict:
        return {"level": self.level, "started": self.clock.started, **self.stats.as_dict()}
