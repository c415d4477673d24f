"""The engine worker: one model bundle, its `AvatarEngine` and every session on it, end to end.

It runs inside a worker process (app/workers/process.py) or a Ray actor (app/workers/ray_actors.py),
on that process's event loop, and is driven by the gateway's commands (`Open`, `Push`, ...). Each
session's items leave through `send` as protocol messages tagged with the session's key and interrupt
epoch; a heartbeat every `heartbeat_s` reports the sessions' counters, the frames per second made, the
block time and how busy the engine is (measured from the blocks it finished), so the gateway can place
calls and tell a wedged worker (no block for a while with sessions open) from a busy one.

Whatever a session does (bad audio, a failure in generation) ends that session with a SessionError;
the worker and its other sessions go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from app.workers.protocol import (HEARTBEAT, Close, Command, EndSegment, Interrupt, Open, Push, Stop, encode_closed,
                                  encode_info, encode_item)
from avatar.types import AvatarFrame, SessionError

log = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]
STATS_WINDOW_S = 2.0  # rates (fps, load) in a heartbeat span this much: a block's frames come at once


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start (it crosses a process boundary: plain values only)."""

    model: str = "auto"  # app/render_worker.py load_models: auto | demo | tiny
    max_sessions: int = 4
    threads: int | None = None  # compute threads (torch, ONNX Runtime); None: the libraries' defaults
    decoder: str = "auto"
    avatar: str | None = None  # the user's portrait or `avatar new` folder, beside the built-in avatar
    heartbeat_s: float = 0.5
    warmup: bool = True
    max_batch: int | None = None  # sessions per batched DiT call (avatar/engine.py); None: the engine's default
    max_lag_s: float = 1.5  # a live session's catch-up bound (SessionOptions.max_lag_s); 0: never hold
    nice: int = 0  # a local worker process's CPU priority below the gateway's (os.nice increment). A trade,
    # not a fix: 8 TINY calls on 2 cores (bench_live --worker-nice 5,0,5,0, one run) at nice 5 had gateway
    # loop stalls p99 29-45 ms vs 63-73, but 17-19 fresh fps per call vs 20-23 and 2.9-3.3 s latency vs
    # 1.7-2.0: where the cores are short, the calls lose more from a starved engine than from a late loop


# Failures after which the process's CUDA context is unusable (every later call fails too); an out-of-memory
# error is not one of them: that session fails, the others go on
DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS_EXECUTION_FAILED", "cuDNN error", "CUDNN_STATUS_EXECUTION_FAILED")
DEVICE_ERROR_EXIT = 70


def poisons_the_device(message: str) -> bool:
    """True for a session failure that leaves the worker's GPU unusable, so the worker must be replaced."""
    return any(marker in message for marker in DEVICE_ERRORS) and "out of memory" not in message


def boot_id() -> str:
    """This machine's boot: time.monotonic() of two processes compares only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"{socket.gethostname()}:unknown"


class _Live:
    """The worker's side of one session."""

    __slots__ = ("session", "epoch", "same_clock", "push_hop_ms", "task")

    def __init__(self, session, same_clock: bool) -> None:
        self.session, self.same_clock = session, same_clock
        self.epoch = 0  # the gateway's epoch after the last interrupt applied here
        self.push_hop_ms = 0.0  # gateway -> worker delay of the latest audio chunk (same clock only)
        self.task: asyncio.Task | None = None


class EngineWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        from app.render_worker import load_models
        from app.avatars import live_session_options
        from app.workers.scenes import scene_backend
        from avatar.engine import AvatarEngine, preset_options

        self.spec = spec
        models = load_models(spec.model)
        batch = {} if spec.max_batch is None else {"max_batch": spec.max_batch}
        self.engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder=spec.decoder,
                                                          max_sessions=spec.max_sessions, threads=spec.threads,
                                                          warmup=spec.warmup, **batch))
        self.engine.start()
        try:
            self.backend = scene_backend(self.engine, Path(spec.avatar) if spec.avatar else None,
                                         options=live_session_options(spec.max_lag_s))
        except BaseException:
            self.engine.stop()
            raise
        self._sessions: dict[int, _Live] = {}
        self._send: Send | None = None
        self._heartbeat: asyncio.Task | None = None
        # made since the last heartbeat: frames, features + denoise ms of the blocks finished (the engine's
        # worker thread) and their decode ms (the decode thread beside it); rates span STATS_WINDOW_S
        self._tick = [0, 0.0, 0.0]
        self._ticks: deque[tuple[float, int, float, float]] = deque()
        self._window_from = time.monotonic()
        self._block_ms: deque[float] = deque(maxlen=100)
        self._progress_at = time.monotonic()  # the last frame made while sessions were open

    def hello(self) -> dict[str, Any]:
        snap = self.engine.snapshot()
        return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(),
                "catalog": self.backend.catalog(), "faces": self.backend.faces(), "default_avatar": self.backend.default_avatar,
                "avatar_warnings": self.backend.avatar_warnings(),
                "max_sessions": self.spec.max_sessions, "checkpoint": self.backend.checkpoint,
                "model": snap["model"], "mode": snap["mode"], "device": snap["device"], "decoder": snap["decoder"],
                "warmup_ms": snap["warmup_ms"], "frame_hw": list(self.engine.models.frame_hw)}

    def bind(self, send: Send) -> None:
        """Start emitting: session items and heartbeats go to `send` (call on the worker's event loop)."""
        self._send = send
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="worker-heartbeat")

    # ---- commands (on the worker's event loop) --------------------------------------------------------------
    def apply(self, cmd: Command) -> None:
        if isinstance(cmd, Push):
            self.push_audio(cmd.key, cmd.pcm, cmd.sample_rate, cmd.sent_at, cmd.speaker)
        elif isinstance(cmd, Open):
            self.open_session(cmd.key, cmd.avatar, cmd.emotion, cmd.same_clock, cmd.speakers)
        elif isinstance(cmd, EndSegment):
            self.end_segment(cmd.key)
        elif isinstance(cmd, Interrupt):
            self.interrupt(cmd.key, cmd.epoch)
        elif isinstance(cmd, Close):
            self.close_session(cmd.key)
        elif not isinstance(cmd, Stop):
            raise TypeError(f"not a worker command: {cmd!r}")

    def open_session(self, key: int, avatar: str, emotion: str | None, same_clock: bool = False,
                     speakers: int = 1) -> None:
        try:
            session = self.backend.open(avatar, emotion, speakers=speakers)
        except Exception as exc:  # full, or an avatar this worker does not have: that call's error only
            log.warning("worker: cannot open session %d (%s: %s)", key, type(exc).__name__, exc)
            self._emit(encode_item(key, 0, SessionError(f"cannot open a session: {exc}"), time.monotonic()))
            self._emit(encode_closed(key))
            return
        if not self._sessions:
            self._progress_at = time.monotonic()  # an idle worker has made no progress to wait for
        live = _Live(session, same_clock)
        live.task = asyncio.get_running_loop().create_task(self._forward(key, live), name=f"worker-session-{key}")
        self._sessions[key] = live

    def push_audio(self, key: int, pcm, sample_rate: int, sent_at: float, speaker: int = 0) -> None:
        live = self._sessions.get(key)
        if live is None:
            return  # closed here already; the gateway drops what is in flight
        live.push_hop_ms = max(0.0, (time.monotonic() - sent_at) * 1e3)
        try:
            live.session.push_audio(pcm, sample_rate, speaker=speaker)
        except RuntimeError:
            pass  # the session closed itself (a failure): its SessionError is on the way
        except Exception as exc:  # the gateway validated this chunk, so this is a bug: end this session only
            log.exception("worker: session %d rejected audio", key)
            self._fail(key, f"{type(exc).__name__}: {exc}")

    def end_segment(self, key: int) -> None:
        if (live := self._sessions.get(key)) is not None:
            live.session.end_segment()

    def interrupt(self, key: int, epoch: int) -> None:
        if (live := self._sessions.get(key)) is not None:
            live.epoch = epoch
            live.session.interrupt()

    def close_session(self, key: int) -> None:
        live = self._sessions.pop(key, None)
        if live is not None:
            live.session.close()  # its forwarding task sees the end and says SESSION_CLOSED

    def stop(self) -> None:
        """Close every session and stop the engine (again: nothing more happens)."""
        for key in list(self._sessions):
            self.close_session(key)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.backend.stop()
        self.engine.stop()

    # ---- out --------------------------------------------------------------------------------------------
    def _emit(self, message: bytes) -> None:
        """Send from synchronous code; tasks start in creation order, so messages keep their order."""
        if self._send is not None:
            asyncio.get_running_loop().create_task(self._send(message))

    def _fail(self, key: int, message: str) -> None:
        live = self._sessions.get(key)
        if live is not None:
            live.session.fail(message)

    async def _forward(self, key: int, live: _Live) -> None:
        """One session's items -> messages, in order; the session's end -> SESSION_CLOSED."""
        last_block: tuple[float, float, float] | None = None
        try:
            async for item in live.session:
                if isinstance(item, SessionError) and poisons_the_device(item.message):
                    log.critical("worker: %s; exiting so that the gateway starts a fresh worker", item.message)
                    os._exit(DEVICE_ERROR_EXIT)
                if isinstance(item, AvatarFrame):
                    t = item.timing
                    block = (t.features_ms, t.denoise_ms, t.decode_ms)
                    if block != last_block:  # every frame of a block carries that block's stage times
                        last_block = block
                        self._tick[1] += t.features_ms + t.denoise_ms
                        self._tick[2] += t.decode_ms
                        self._block_ms.append(sum(block))
                    self._tick[0] += 1
                    self._progress_at = time.monotonic()
                    if live.same_clock and t.emit_ms > 0:  # the latency starts where the gateway got the audio
                        item = replace(item, timing=replace(t, emit_ms=t.emit_ms + live.push_hop_ms))
                assert self._send is not None
                await self._send(encode_item(key, live.epoch, item, time.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a frame that cannot be encoded: this session ends, loudly
            log.exception("worker: session %d failed on the way out", key)
            live.session.close()
            if self._send is not None:
                await self._send(encode_item(key, live.epoch, SessionError(f"{type(exc).__name__}: {exc}"),
                                             time.monotonic()))
        if self._sessions.get(key) is live:
            del self._sessions[key]
        if self._send is not None:
            await self._send(encode_closed(key))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.spec.heartbeat_s)
            assert self._send is not None
            await self._send(encode_info(HEARTBEAT, self.stats()))

    def stats(self) -> dict[str, Any]:
        """What a heartbeat carries: counters now, rates over the last STATS_WINDOW_S (blocks come in bursts)."""
        now = time.monotonic()
        self._ticks.append((now, *self._tick))
        self._tick = [0, 0.0, 0.0]
        while len(self._ticks) > 1 and now - self._ticks[0][0] > STATS_WINDOW_S:
            self._window_from = self._ticks.popleft()[0]
        window_s = max(1e-6, now - self._window_from)
        frames, generate_ms, decode_ms = (sum(t[i] for t in self._ticks) for i in (1, 2, 3))
        snap = self.engine.snapshot()
        sessions = {}
        for key, live in self._sessions.items():
            st = live.session.stats
            sessions[str(key)] = {"frames": st.frames, "idle_frames": st.idle_frames, "blocks": st.blocks,
                                  "next_pts": live.session.next_video,
                                  "dropped_input_samples": st.dropped_input_samples,
                                  "dropped_frames": st.dropped_frames, "held_frames": st.held_frames,
                                  "nonfinite_input_samples": st.nonfinite_input_samples,
                                  "silence_inserted_s": round(st.silence_inserted_s, 3)}
        return {
            "t": now, "sessions": sessions, "failures": snap["failures"], "latency_budget": snap["latency_budget"],
            "fps": round(frames / window_s, 2),
            # the busier pipeline stage's share of wall time (1.0: the engine cannot take more work)
            "load": round(max(generate_ms, decode_ms) / (window_s * 1e3), 3),
            "block_ms": round(statistics.median(self._block_ms), 2) if self._block_ms else None,
            "stalled_s": round(now - self._progress_at, 2) if self._sessions else 0.0,
            # False: a thread of an engine died (the worker is useless)
            "engine_running": all(e.running for e in self.backend.engines),
            "rss_bytes": _rss_bytes(),
        }


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
