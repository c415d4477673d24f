"""How long the event loop was kept from running: a task that asks to wake every `interval_s` and
records how late it woke (a callback that held the loop, a blocking call, a GC pause). Every packet,
frame and request of the server waits behind such a stall, so its p99 is the loop's health figure.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class LoopLagSampler:
    def __init__(self, interval_s: float = 0.01, keep: int = 6000, registry: CollectorRegistry | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.lags_s: deque[float] = deque(maxlen=keep)  # the newest `keep` samples (a minute at 10 ms)
        self._histogram = None if registry is None else Histogram(
            "avatarcast_event_loop_lag_seconds", "How late the gateway's event loop woke a timer (stalls)",
            buckets=LAG_BUCKETS, registry=registry)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def reset(self) -> None:
        self.lags_s.clear()

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - due)
            self.lags_s.append(lag)
            if self._histogram is not None:
                self._histogram.observe(lag)

    def summary(self) -> dict[str, float | int | None]:
        """Milliseconds late: p50, p99, max over the kept samples (None before the first)."""
        lags = np.asarray(self.lags_s, dtype=np.float64) * 1e3
        if not lags.size:
            return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        return {"samples": int(lags.size), "p50_ms": round(float(np.percentile(lags, 50)), 2),
                "p99_ms": round(float(np.percentile(lags, 99)), 2), "max_ms": round(float(lags.max()), 2)}
