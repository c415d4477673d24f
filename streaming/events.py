"""Service events for operator consoles (served as SSE by the admin API).

Each subscriber has its own bounded queue; a console that stops reading loses its oldest events
(DROP_OLDEST, counted in `dropped`) and never slows the service down or grows its memory.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any

SHUTDOWN = "server_shutdown"  # the last event a subscriber receives

class Subscription:
    def __init__(self, bus: EventBus, max_queued: int) -> None:
        self._bus = bus
        self._queue: deque[dict[str, Any]] = deque(maxlen=max_queued)
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, event: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # DROP_OLDEST: deque(maxlen) discards from the left
        self._queue.append(event)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None after `timeout` seconds without one."""
        if not self._queue:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._queue.popleft()

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self, max_queued: int = 256) -> None:
        self.max_queued = max_queued
        self._subs: set[Subscription] = set()
        self._ids = itertools.count(1)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self.max_queued)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """Tell every subscriber the stream ends (a final "server_shutdown" event) and forget them."""
        self.publish(SHUTDOWN)
        self._subs.clear()

    def publish(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"id": next(self._ids), "type": kind, "time": round(time.time(), 3), **data}
        for sub in list(self._subs):
            sub.put(event)
        return event
