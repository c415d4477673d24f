"""A session that lives on an engine worker, as the gateway holds it: the one session contract.

`WorkerSession` is what `WorkerPool.open()` returns. Callers use it exactly like an in-process
`AvatarSession` (push_audio / end_segment / interrupt / close / `async for` AvatarFrame, SegmentEnd,
SessionError): commands go to the worker through its link, items come back on the event loop.
Everything here runs on the gateway's event loop; the link's threads only hand batches over.

- Audio is checked and down-mixed to mono float32 here (a bad chunk raises at the caller, as
  `AvatarSession.push_audio` does), then sent at its own rate; the worker resamples.
- Interrupt across the process hop: the session's epoch goes up, queued items are dropped at once,
  and items still in flight from before the interrupt (older epoch) are dropped on arrival.
- Items wait in a bounded queue (`ItemQueue`, DROP_OLDEST for frames: a reader that far behind wants
  the newest picture); SegmentEnd and SessionError are never dropped.
- A worker that dies ends its sessions with `SessionError(WORKER_STOPPED)`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from app.workers.protocol import EndSegment, Interrupt, Output, Push
from audio.resample import PcmFormat, downmix
from avatar.types import AvatarFrame, SessionError, SessionItem, SessionStats

if TYPE_CHECKING:
    from app.workers.pool import WorkerHandle

WORKER_STOPPED = "the avatar worker stopped — call again"
STAGES = ("features", "denoise", "decode", "block")  # the engine's compute per block; "block" is their sum
WORKER_COUNTERS = ("dropped_input_samples", "dropped_frames", "nonfinite_input_samples", "silence_inserted_s")


class ItemQueue:
    """Session items waiting for their reader. At `max_frames` queued frames the oldest frame goes
    (DROP_OLDEST, counted in `dropped`); markers (SegmentEnd, SessionError) are always kept."""

    def __init__(self, max_frames: int) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        self.max_frames = max_frames
        self.dropped = 0
        self._items: deque[SessionItem] = deque()
        self._frames = 0
        self._closed = False
        self._ready = asyncio.Event()

    def put(self, item: SessionItem) -> None:
        if self._closed:
            return
        if isinstance(item, AvatarFrame):
            if self._frames >= self.max_frames:
                self._drop_oldest_frame()
            self._frames += 1
        self._items.append(item)
        self._ready.set()

    def _drop_oldest_frame(self) -> None:
        for i, queued in enumerate(self._items):
            if isinstance(queued, AvatarFrame):
                del self._items[i]
                self._frames -= 1
                self.dropped += 1
                return

    def clear(self) -> int:
        """Drop every queued frame and segment marker (an interrupt); errors stay. Returns frames dropped."""
        frames = self._frames
        self._items = deque(i for i in self._items if isinstance(i, SessionError))
        self._frames = 0
        return frames

    def close(self) -> None:
        """No more items; the reader gets what is queued, then the end."""
        self._closed = True
        self._ready.set()

    async def get(self) -> SessionItem | None:
        """The next item; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, AvatarFrame):
            self._frames -= 1
        return item


class WorkerSession:
    def __init__(self, handle: WorkerHandle, key: int, max_frames: int, speakers: int = 1) -> None:
        self.id = f"{handle.id}-s{key}"
        self.key = key
        self.speakers = speakers
        self.worker_id = handle.id
        self.epoch = 0
        self.next_video = 0  # the pts after the newest frame received
        # frames, blocks and stage times counted as they arrive here; drops here plus the worker's own
        # counters (its heartbeats), which are also where silence and non-finite input are counted
        self.stats = SessionStats()
        self._dropped_input_samples = 0  # the worker's command queue was full
        self._dropped_frames = 0  # interrupted, from an older epoch, or the queue overflowed
        self._worker_counters: dict[str, float] = {}
        self._handle = handle
        self._items = ItemQueue(max_frames)
        self._closed = False
        self._last_block: tuple[float, float, float] | None = None

    # ---- the session contract (event loop) ------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray, sample_rate: int, speaker: int = 0, channels: int = 1,
                   layout: str = "interleaved") -> None:
        """Append audio (any size, int16 or float, any rate 8-96 kHz). Never blocks."""
        if self._closed:
            raise RuntimeError(f"session {self.id} is closed")
        if not 0 <= speaker < self.speakers:
            raise ValueError(f"speaker {speaker} outside 0..{self.speakers - 1}")
        fmt = PcmFormat(sample_rate, channels, layout)  # validates the rate, channels and layout
        mono, _ = downmix(pcm, fmt)  # (samples,) float32; raises on a shape that does not fit the format
        if mono.size and not self._handle.send(Push(self.key, mono, fmt.sample_rate, time.monotonic(), speaker)):
            self._dropped_input_samples += mono.size
            self._merge_counters()

    def end_segment(self) -> None:
        if not self._closed:
            self._handle.send(EndSegment(self.key))

    def interrupt(self) -> None:
        """Barge-in: drop queued audio (on the worker) and every unsent frame (here and in flight)."""
        if self._closed:
            return
        self.epoch += 1
        self._dropped_frames += self._items.clear()
        self._merge_counters()
        self._handle.send(Interrupt(self.key, self.epoch))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._items.close()
            self._handle.release(self, tell_worker=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> WorkerSession:
        return self

    async def __anext__(self) -> SessionItem:
        item = await self._items.get()
        if item is None:
            raise StopAsyncIteration
        return item

    # ---- from the worker (event loop, via the handle) -------------------------------------------------
    def deliver(self, out: Output, same_clock: bool) -> None:
        item = out.item
        if self._closed or item is None:
            return
        if isinstance(item, SessionError):
            self._items.put(item)
            return
        if out.epoch != self.epoch:  # made before an interrupt that has since reached the worker
            self._dropped_frames += isinstance(item, AvatarFrame)
            self._merge_counters()
            return
        if isinstance(item, AvatarFrame):
            t = item.timing
            if same_clock and t.emit_ms > 0:  # add the trip from the worker to here
                item = replace(item, timing=replace(t, emit_ms=t.emit_ms + (time.monotonic() - out.sent_at) * 1e3))
            self._count(item)
        dropped = self._items.dropped
        self._items.put(item)
        if self._items.dropped != dropped:
            self._dropped_frames += self._items.dropped - dropped
            self._merge_counters()

    def worker_counters(self, counters: dict[str, float]) -> None:
        """This session's counters from the worker's heartbeat."""
        self._worker_counters = counters
        self._merge_counters()

    def _merge_counters(self) -> None:
        st, w = self.stats, self._worker_counters
        st.dropped_input_samples = self._dropped_input_samples + int(w.get("dropped_input_samples", 0))
        st.dropped_frames = self._dropped_frames + int(w.get("dropped_frames", 0))
        st.nonfinite_input_samples = int(w.get("nonfinite_input_samples", 0))
        st.silence_inserted_s = float(w.get("silence_inserted_s", 0.0))

    def _count(self, frame: AvatarFrame) -> None:
        st, t = self.stats, frame.timing
        st.frames += 1
        st.idle_frames += frame.idle
        self.next_video = frame.pts + 1
        if frame.held:  # not a generated block: the stage figures stay those of generated ones
            st.held_frames += 1
            return
        block = (t.features_ms, t.denoise_ms, t.decode_ms)
        if block != self._last_block:  # every frame of a block carries that block's stage times
            self._last_block = block
            st.blocks += 1
            for name, ms in zip(STAGES, (*block, sum(block))):
                st.stage_ms[name].append(ms)
            st.stage_ms["wait"].append(t.wait_ms)  # measured on the worker's clock, a duration: no hop to add

    def ended_by_worker(self) -> None:
        """The worker closed this session (after its SessionError, or a refused open)."""
        if not self._closed:
            self._closed = True
            self._items.close()
            self._handle.release(self, tell_worker=False)

    def fail(self, message: str) -> None:
        """End with an error (its worker died): the reader gets SessionError(message), then the end."""
        if not self._closed:
            self._items.put(SessionError(message))
        self.ended_by_worker()

