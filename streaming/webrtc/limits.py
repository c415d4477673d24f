"""Per-key sliding-window rate limits (offers per remote address, condition changes per call).

A deque of the last `limit` event times per key: an event is allowed when fewer than `limit` fall in
the last `window_s`; a refusal says how long until the oldest one leaves the window (Retry-After).
Keys whose events have all left the window are forgotten, so many one-off clients cost no memory.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from typing import Callable


class RateLimit:
    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"a rate limit needs limit >= 1 and window_s > 0, not {limit} per {window_s} s")
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()  # least recently used first

    def hit(self, key: str) -> float:
        """Record one event for `key` if allowed and return 0.0; else record nothing and return the
        seconds (rounded up, at least 1) until one is allowed again."""
        now = self._clock()
        self._forget_before(now - self.window_s)
        events = self._events.pop(key, None) or deque()
        while events and events[0] <= now - self.window_s:
            events.popleft()
        self._events[key] = events  # now the most recently used
        if len(events) >= self.limit:
            return float(max(1, math.ceil(events[0] + self.window_s - now)))
        events.append(now)
        return 0.0

    def _forget_before(self, cutoff: float) -> None:
        while self._events:
            key, events = next(iter(self._events.items()))
            if events and events[-1] > cutoff:
                return
            del self._events[key]

    def __len__(self) -> int:
        return len(self._events)
