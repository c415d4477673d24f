"""A bounded, thread-safe ring buffer of mono samples addressed by absolute sample index.

A producer (the event loop draining a WebRTC track, a TTS stream) appends; an engine thread reads
windows ``[start_sample - left_context, start_sample + length + right_context)`` by absolute index and
trims what it no longer needs. Index 0 is the first sample ever appended; indices keep counting
across ``clear()`` so they stay a media clock.

Reads never fail: parts of a window outside the samples currently held (before index 0, beyond the
newest sample, or already trimmed / dropped) come back as zeros. ``holds()`` tells whether a range is
complete.

Overflow policy is explicit: ``DROP_OLDEST`` (default) discards the oldest samples to make room and
counts them in ``dropped_samples``; ``RAISE`` refuses the append with ``BufferOverflowError``.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import numpy as np

from audio.pcm import to_float32


class OverflowPolicy(enum.Enum):
    DROP_OLDEST = "drop_oldest"  # keep the newest audio; count what was lost
    RAISE = "raise"  # the caller must trim in time; an append that does not fit raises


class BufferOverflowError(RuntimeError):
    """An append would exceed capacity under ``OverflowPolicy.RAISE``."""


@dataclass(frozen=True)
class RingStats:
    capacity_samples: int
    start_sample: int  # oldest absolute index held
    end_sample: int  # one past the newest absolute index appended
    dropped_samples: int  # lost to overflow (not counting trim / clear)
    overflow_events: int  # appends that dropped something


class SampleRing:
    """Mono float32 ring buffer with absolute sample addressing. All methods are thread-safe."""

    def __init__(self, capacity_samples: int, *, policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST):
        if int(capacity_samples) < 1:
            raise ValueError(f"capacity_samples must be >= 1, got {capacity_samples}")
        self.capacity_samples = int(capacity_samples)
        self.policy = OverflowPolicy(policy)
        self._data = np.zeros(self.capacity_samples, dtype=np.float32)
        self._start = 0  # absolute index of the oldest sample held
        self._end = 0  # absolute index one past the newest sample
        self._dropped = 0
        self._overflows = 0
        self._cond = threading.Condition(threading.Lock())

    # ---- state -------------------------------------------------------------------------------------

    @property
    def start_sample(self) -> int:
        with self._cond:
            return self._start

    @property
    def end_sample(self) -> int:
        with self._cond:
            return self._end

    @property
    def dropped_samples(self) -> int:
        with self._cond:
            return self._dropped

    def __len__(self) -> int:
        with self._cond:
            return self._end - self._start

    def stats(self) -> RingStats:
        with self._cond:
            return RingStats(self.capacity_samples, self._start, self._end, self._dropped, self._overflows)

    def holds(self, start_sample: int, stop_sample: int) -> bool:
        """True if every sample in ``[start_sample, stop_sample)`` is currently held."""
        with self._cond:
            return self._start <= start_sample and stop_sample <= self._end

    # ---- writing -----------------------------------------------------------------------------------

    def append(self, samples: np.ndarray) -> int:
        """Append mono samples (float or int16); return how many old samples were dropped to fit."""
        x = np.asarray(samples)
        if x.ndim > 1:
            raise ValueError(f"SampleRing holds mono audio; got an array of shape {x.shape}")
        x = to_float32(x.reshape(-1), name="SampleRing.append")
        n = x.size
        if n == 0:
            return 0
        with self._cond:
            overflow = (self._end - self._start) + n - self.capacity_samples
            if overflow > 0 and self.policy is OverflowPolicy.RAISE:
                raise BufferOverflowError(
                    f"append of {n} samples exceeds capacity {self.capacity_samples} "
                    f"({self._end - self._start} held); trim earlier or enlarge the buffer"
                )
            if n > self.capacity_samples:  # only the newest capacity samples of the chunk survive
                x = x[n - self.capacity_samples:]
            self._write(self._end + n - x.size, x)
            self._end += n
            dropped = max(0, overflow)
            if dropped:
                self._start = self._end - self.capacity_samples
                self._dropped += dropped
                self._overflows += 1
            self._cond.notify_all()
            return dropped

    def _write(self, start: int, x: np.ndarray) -> None:
        head = start % self.capacity_samples
        first = min(x.size, self.capacity_samples - head)
        self._data[head:head + first] = x[:first]
        self._data[: x.size - first] = x[first:]

    def trim(self, before_sample: int) -> int:
        """Forget samples with absolute index < ``before_sample``; return how many were discarded."""
        with self._cond:
            new_start = min(max(self._start, int(before_sample)), self._end)
            discarded = new_start - self._start
            self._start = new_start
            return discarded

    def clear(self) -> int:
        """Forget everything held (barge-in); indices keep counting. Return the number discarded."""
        with self._cond:
            discarded = self._end - self._start
            self._start = self._end
            return discarded

    # ---- reading -----------------------------------------------------------------------------------

    def window(self, start_sample: int, length: int, left_context: int = 0, right_context: int = 0) -> np.ndarray:
        """Samples ``[start_sample - left_context, start_sample + length + right_context)``, zero-filled
        wherever that range is not held. Returns a new float32 array of ``left + length + right``."""
        if min(length, left_context, right_context) < 0:
            raise ValueError(
                f"window sizes must be >= 0, got length={length}, left_context={left_context}, "
                f"right_context={right_context}"
            )
        lo = int(start_sample) - int(left_context)
        hi = int(start_sample) + int(length) + int(right_context)
        out = np.zeros(hi - lo, dtype=np.float32)
        with self._cond:
            a, b = max(lo, self._start), min(hi, self._end)
            if a < b:
                head = a % self.capacity_samples
                first = min(b - a, self.capacity_samples - head)
                out[a - lo:a - lo + first] = self._data[head:head + first]
                out[a - lo + first:b - lo] = self._data[: b - a - first]
        return out

    def wait_until(self, end_sample: int, timeout_s: float | None = None) -> bool:
        """Block until samples up to ``end_sample`` (exclusive) have been appended, or the timeout.

        Returns True if they have. For an engine thread waiting on a producer thread.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._end >= end_sample, timeout=timeout_s)
