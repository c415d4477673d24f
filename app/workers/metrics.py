"""Each engine worker in Prometheus text, read from the backend at scrape time (nothing cached here)."""

from __future__ import annotations

from typing import Iterator, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streaming.api_schema import WorkerStatus

STATES = ("starting", "ready", "dead")


class _Workers(Protocol):
    def workers(self) -> list[WorkerStatus]: ...


class WorkerMetrics:
    """A prometheus_client collector: `registry.register(WorkerMetrics(backend))`."""

    def __init__(self, backend: _Workers) -> None:
        self.backend = backend

    def describe(self) -> list[Metric]:
        return []  # names are only known per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        labels = ["worker"]
        state = GaugeMetricFamily("avatarcast_worker_state", "1 for the engine worker's current state",
                                  labels=["worker", "state"])
        sessions = GaugeMetricFamily("avatarcast_worker_sessions", "Sessions on the engine worker", labels=labels)
        fps = GaugeMetricFamily("avatarcast_worker_fps", "Frames the engine worker made per second (all sessions)",
                                labels=labels)
        block = GaugeMetricFamily("avatarcast_worker_block_seconds",
                                  "Median time the engine worker takes to make one block", labels=labels)
        load = GaugeMetricFamily("avatarcast_worker_load", "Busy share of the engine worker (1: full)", labels=labels)
        restarts = CounterMetricFamily("avatarcast_worker_restarts", "Times the engine worker was restarted",
                                       labels=labels)
        for w in self.backend.workers():
            for s in STATES:
                state.add_metric([w["id"], s], 1.0 if w["state"] == s else 0.0)
            sessions.add_metric([w["id"]], w["sessions"])
            restarts.add_metric([w["id"]], w["restarts"])
            if w["fps"] is not None:
                fps.add_metric([w["id"]], w["fps"])
            if w["block_ms"] is not None:
                block.add_metric([w["id"]], w["block_ms"] / 1000.0)
            if w["load"] is not None:
                load.add_metric([w["id"]], w["load"])
        yield from (state, sessions, fps, block, load, restarts)
