"""Bounded mono PCM addressed by absolute sample index, and the overflow policy of every bounded media buffer.

A producer appends; a consumer reads windows ``[start, stop)`` by absolute index and trims what it no
longer needs. Index 0 is the first sample ever appended and indices never renumber (trim, overflow and
truncation only move the held range), so they are a media clock. Reads never fail: parts of a window
outside the samples held (before index 0, beyond the newest sample, trimmed, dropped or truncated)
come back as zeros.

Users: the audio front end's streaming window (`audio.features.base.FeatureStream`, ``RAISE``: sized
so it never overflows) and each speaker's outgoing audio in a session (`avatar.timeline.SpeakerTrack`,
``DROP_OLDEST``), which marks the silence it inserts (``append(..., padding=True)``) so that frames
made from it know they are idle (``is_padding``).

Not thread-safe: the owner serialises access (a session's lock, a feature stream's one thread).
"""

from __future__ import annotations

import enum

import numpy as np

from audio.pcm import to_float32

_MIN_STORE = 4096  # samples of spare room a fresh store gets at least


class OverflowPolicy(enum.Enum):
    """What a bounded buffer does with an append that does not fit (samples here, frames in streaming.pacer)."""

    DROP_OLDEST = "drop_oldest"  # keep latency bounded: the oldest held items are discarded (and counted)
    DROP_NEWEST = "drop_newest"  # keep continuity: the arriving items are discarded (and counted)
    RAISE = "raise"  # the owner must make room in time: an append that does not fit raises


class BufferOverflowError(RuntimeError):
    """An append would exceed a buffer's capacity under ``OverflowPolicy.RAISE``."""


class PcmBuffer:
    """Mono float32 samples by absolute index, at most ``capacity_samples`` held.

    Storage is one array with spare room at its end: appending a 20 ms packet copies the packet, not
    the whole buffer (a live call appends 50 packets a second); the held samples move to the front of
    a new array only when the room runs out."""

    def __init__(self, capacity_samples: int, *, policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST) -> None:
        if int(capacity_samples) < 1:
            raise ValueError(f"capacity_samples must be >= 1, got {capacity_samples}")
        self.policy = OverflowPolicy(policy)
        if self.policy is OverflowPolicy.DROP_NEWEST:
            raise ValueError("a PcmBuffer takes DROP_OLDEST or RAISE: discarding arriving samples would leave "
                             "a hole in its absolute sample indices")
        self.capacity_samples = int(capacity_samples)
        self.start = 0  # absolute index of the oldest sample held
        self.dropped = 0  # samples lost to overflow (not counting trim / truncate)
        self._store = np.zeros(0, np.float32)
        self._lo = self._hi = 0  # the held samples are _store[_lo:_hi]
        self._padding: list[list[int]] = []  # [start, end) ranges of inserted silence, merged

    @property
    def end(self) -> int:
        """One past the absolute index of the newest sample appended."""
        return self.start + (self._hi - self._lo)

    # ---- writing -----------------------------------------------------------------------------------
    def append(self, samples: np.ndarray, *, padding: bool = False) -> None:
        """Append mono samples (float, or integer PCM scaled to [-1, 1)); ``padding``: inserted silence."""
        x = np.asarray(samples)
        if x.ndim > 1:
            raise ValueError(f"a PcmBuffer holds mono audio; got an array of shape {x.shape}")
        x = to_float32(x.reshape(-1), name="PcmBuffer.append")
        n, held = x.size, self._hi - self._lo
        if not n:
            return
        if held + n > self.capacity_samples and self.policy is OverflowPolicy.RAISE:
            raise BufferOverflowError(f"append of {n} samples exceeds capacity {self.capacity_samples} "
                                      f"({held} held); trim earlier or enlarge the buffer")
        if padding:
            if self._padding and self._padding[-1][1] == self.end:
                self._padding[-1][1] += n
            else:
                self._padding.append([self.end, self.end + n])
        if self._hi + n > self._store.size:  # no room at the end: move the held samples to a new store
            store = np.empty(held + n + max(held, _MIN_STORE), np.float32)
            store[:held] = self._store[self._lo:self._hi]
            self._store, self._lo, self._hi = store, 0, held
        self._store[self._hi:self._hi + n] = x
        self._hi += n
        over = held + n - self.capacity_samples
        if over > 0:  # DROP_OLDEST: a consumer this far behind has lost that audio anyway
            self.dropped += over
            self.trim(self.start + over)

    def trim(self, before: int) -> None:
        """Forget the samples before absolute index ``before`` (consumed)."""
        cut = min(max(0, int(before) - self.start), self._hi - self._lo)
        if cut:
            self._lo += cut
            self.start += cut
        self._padding = [[max(s, self.start), e] for s, e in self._padding if e > self.start]

    def truncate(self, end: int) -> int:
        """Forget the samples at and after absolute index ``end`` (barge-in); return how many."""
        keep = max(0, int(end) - self.start)
        discarded = max(0, (self._hi - self._lo) - keep)
        self._hi = min(self._hi, self._lo + keep)
        self._padding = [[s, min(e, end)] for s, e in self._padding if s < end]
        return discarded

    # ---- reading -----------------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` as a new float32 array, zeros wherever they are not held."""
        if stop < start:
            raise ValueError(f"read needs start <= stop, got [{start}, {stop})")
        out = np.zeros(stop - start, np.float32)
        lo, hi = max(start, self.start), min(stop, self.end)
        if hi > lo:
            out[lo - start:hi - start] = self._store[self._lo + lo - self.start:self._lo + hi - self.start]
        return out

    def is_padding(self, start: int, stop: int) -> bool:
        """True if every sample of ``[start, stop)`` is held and was appended as padding."""
        return any(s <= start and stop <= e for s, e in self._padding)
