"""Prometheus metrics for the live service, on a registry of its own (one per server, so tests can run
several servers in one process without colliding in prometheus_client's global registry).

What is measured, and where:
- sessions: a gauge of live peers, counters of sessions opened / ended (by reason) / offers rejected;
- frames: video frames sent, frames repeated on underrun, frames dropped by the pacer (by reason:
  overflow, late, trim);
- per-stage timings (`avatarcast_stage_seconds{stage}`): wait (for the block's audio) / features / denoise /
  decode per generation block, emit (last input sample pushed -> frame ready) and pacer (frame ready ->
  frame sent) per frame;
- latency (`avatarcast_latency_seconds`): a mic sample's arrival at the server -> the frame carrying
  it leaving on the video track (speech frames only).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from avatar.types import Timing

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


class LiveMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("avatarcast_sessions", "Live WebRTC sessions", registry=r)
        self.sessions_opened = Counter("avatarcast_sessions_opened", "Sessions opened", registry=r)
        self.sessions_ended = Counter("avatarcast_sessions_ended", "Sessions ended, by reason", ["reason"],
                                      registry=r)
        self.offers_rejected = Counter("avatarcast_offers_rejected", "Offers refused, by error code", ["code"],
                                       registry=r)
        self.frames_sent = Counter("avatarcast_video_frames_sent", "Video frames sent", registry=r)
        self.frames_repeated = Counter("avatarcast_video_frames_repeated",
                                       "Slots with no new frame in time (last picture repeated, silence)",
                                       registry=r)
        self.frames_dropped = Counter("avatarcast_frames_dropped", "Generated frames never sent, by reason",
                                      ["reason"], registry=r)
        self.mic_frames = Counter("avatarcast_mic_frames", "20 ms mic packets received", registry=r)
        self.stage = Histogram("avatarcast_stage_seconds", "Time per pipeline stage", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.latency = Histogram("avatarcast_latency_seconds",
                                 "Mic sample arrival at the server -> the frame carrying it sent",
                                 buckets=LATENCY_BUCKETS, registry=r)
        for reason in ("overflow", "late", "trim"):
            self.frames_dropped.labels(reason)  # export zeros from the start

    # ---- hooks --------------------------------------------------------------------------------------
    def on_drop(self, reason: str, count: int) -> None:  # PacerListener
        self.frames_dropped.labels(reason).inc(count)

    def on_repeat(self) -> None:  # PacerListener
        self.frames_repeated.inc()

    def observe_block(self, timing: Timing) -> None:
        """Stage timings of one generation block (every frame of a block carries the same ones)."""
        for stage in ("wait", "features", "denoise", "decode"):
            self.stage.labels(stage).observe(getattr(timing, f"{stage}_ms") / 1000.0)

    def observe_frame(self, timing: Timing) -> None:
        if timing.emit_ms > 0:
            self.stage.labels("emit").observe(timing.emit_ms / 1000.0)

    def observe_sent(self, pacer_s: float | None, latency_s: float | None) -> None:
        """One video frame sent; `pacer_s` is None for a repeated picture, `latency_s` for idle frames."""
        self.frames_sent.inc()
        if pacer_s is not None:
            self.stage.labels("pacer").observe(max(0.0, pacer_s))
        if latency_s is not None:
            self.latency.observe(max(0.0, latency_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
