"""Livestream an avatar session: RTMP (FLV) or HLS through the file sink's PyAV muxing, in real time.

    broadcaster = Broadcaster("rtmp://live.example.org/app/STREAM_KEY", BroadcastOptions(duration_s=60))
    await broadcaster.run(session)      # AvatarFrame / SegmentEnd / SessionError items, e.g. an AvatarSession
    broadcaster.snapshot()              # state, frames sent, bitrate, reconnects, last error

Output timeline. The broadcaster owns a `MediaClock` and reads its output slots from a `Pacer` on it,
under the pacer's rules (the ones a call's WebRTC tracks follow): output slot `k` is sent no earlier
than `t0 + k / fps` (t0: when `start_frames` frames are buffered), so a source that runs ahead (a file
pushed faster than real time) is never sent faster than real time. Every slot carries a picture and
exactly its 1/fps of audio, so the audio track never has a gap:
- BACKPRESSURE: a full pacer (`queue_frames`) stops reading the source; nothing is dropped on the way in
  (an engine session then pauses generation);
- REPEAT_LAST: a slot with no frame `underrun_grace_s` after it is due repeats the last picture with
  silence;
- SKIP_LATE: output more than `max_lag_frames` behind the clock (a stalled write) jumps to the slot due
  now and drops the frames of the skipped slots; the sink fills their audio with silence;
- OFFLINE: while the server is unreachable, slots keep passing and their frames are dropped (counted).

Reconnect. A write that fails (connection reset, refused, `write_timeout_s` without progress) closes
that connection; the next slot reconnects at once, then failed attempts back off exponentially
(`retry_initial_s` doubling up to `retry_max_s`). `max_attempts` consecutive failures fail the
broadcast with the last error; a connection that drops before `stable_s` counts as a failure too (a
server that accepts and then stalls must not reset the count forever). A new connection starts a new
stream (pts 0, new SPS/PPS).

Encoding and network writes run on one I/O thread per connection; the event loop only moves frames.
Timeouts. FFmpeg opens an RTMP output without a timeout and holding the GIL (PyAV's avio_open), so a
server that accepts and never answers would freeze the process that opens it. RTMP outputs are
therefore muxed in a child process (`streaming.sink_process.ProcessSink`): each write answers within
`write_timeout_s` or the child is killed, and the I/O thread is free again. Every RTMP attempt first
does the RTMP handshake on the event loop (`probe_rtmp`), so a dead or non-RTMP server costs no
process. HLS writes run in this process without the GIL and time out after `write_timeout_s`; an
abandoned thread stays until its write returns, so at most `max_stuck_writers` such threads may exist:
while that many are blocked, attempts fail without starting another.
Sources (streaming/broadcast_sources.py): an engine session itself, a live call's pacer, and an
engine session driven by an audio file or URL. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import concurrent.futures
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import av

from audio.buffer import OverflowPolicy
from avatar.types import DEFAULT_FPS, AvatarFrame, SessionError, SessionItem
from streaming.clock import MediaClock
from streaming.filesink import AvSink
from streaming.pacer import Pacer, PacerOptions, Slot
from streaming.sink_process import ProcessSink, prewarm_in_background

log = logging.getLogger(__name__)

RTMP_SCHEMES = ("rtmp", "rtmps")
HLS_PLAYLIST = "index.m3u8"  # the playlist written into a directory target
HLS_SEGMENT_TYPES = ("mpegts", "fmp4")  # .ts or .m4s segments
POLL_S = 0.005  # how often an underrun or the pre-roll re-checks the buffer
BITRATE_WINDOW_S = 2.0
STATES = ("idle", "starting", "connecting", "live", "reconnecting", "stopped", "failed")


class BroadcastError(RuntimeError):
    """The broadcast cannot go on (every reconnect attempt failed, or the source failed)."""


# ---- targets ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    kind: str  # "rtmp" (FLV over RTMP/RTMPS) or "hls" (a playlist + segments in a directory)
    location: str  # the URL, or the playlist path

    @property
    def display(self) -> str:
        """Safe to show and log: an RTMP stream key (the last path segment) is masked."""
        if self.kind != "rtmp":
            return self.location
        parts = urlsplit(self.location)
        app, _, key = parts.path.rpartition("/")
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return f"{parts.scheme}://{netloc}{app}/{'***' if key else ''}"


def parse_target(text: str, *, hls_root: Path | None = None) -> Target:
    """`rtmp[s]://HOST[:PORT]/APP/KEY`, a `.m3u8` playlist path, or a directory (`DIR/index.m3u8`).

    With `hls_root` (the server), an HLS path must be relative to it and stay inside it.
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("the broadcast target is empty: give rtmp://HOST/APP/KEY or an HLS .m3u8 path or directory")
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in RTMP_SCHEMES:
            raise ValueError(f"unsupported broadcast target {scheme}://...; use rtmp://, rtmps:// or an HLS "
                             ".m3u8 path or directory")
        try:
            parts.port  # noqa: B018  (validates it)
        except ValueError:
            raise ValueError(f"{scheme}:// URL has an invalid port: {parts.netloc!r}") from None
        if not parts.hostname:
            raise ValueError(f"{scheme}:// URL has no host; expected {scheme}://HOST[:PORT]/APP/KEY")
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) < 2:
            raise ValueError(f"{Target('rtmp', text).display}: an RTMP URL needs an application and a stream "
                             f"key, {scheme}://HOST[:PORT]/APP/KEY")
        return Target("rtmp", text)
    path = Path(text).expanduser()
    if hls_root is not None:
        root = hls_root.resolve()
        path = (root / path).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"HLS output {text!r} must stay inside the broadcast directory {root}")
    if path.suffix == ".m3u8":
        return Target("hls", str(path))
    if path.is_dir() or text.endswith("/") or hls_root is not None:
        return Target("hls", str(path / HLS_PLAYLIST))
    raise ValueError(f"{text!r} is neither an rtmp:// URL nor an HLS playlist (.m3u8) or existing directory")


# ---- options ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BroadcastOptions:
    video_bitrate: int = 2_500_000  # bits/s (libx264 ABR, maxrate = bitrate, 2 s VBV buffer)
    audio_bitrate: int = 128_000  # AAC
    preset: str = "veryfast"  # libx264 speed/quality
    gop_s: float = 2.0  # keyframe interval: players can join (and HLS can cut) every gop_s
    fps: int = DEFAULT_FPS
    start_frames: int = 3  # frames buffered before the output clock starts (absorbs source jitter)
    queue_frames: int = 75  # bound of the pacer between the source and the output (3 s)
    max_lag_frames: int = 25  # output later than this skips forward instead of catching up
    underrun_grace_s: float = 0.02  # how long past due a slot waits for a frame before repeating
    retry_initial_s: float = 0.5  # backoff after the first failed attempt; doubles per failure
    retry_max_s: float = 8.0
    max_attempts: int = 6  # consecutive failed connection attempts before the broadcast fails
    write_timeout_s: float = 10.0  # a write (or connect) without progress for this long = connection lost
    stable_s: float = 10.0  # a connection live this long resets the failure count; a shorter one is a failure
    max_stuck_writers: int = 2  # abandoned I/O threads still blocked in a write; no new attempt past this
    duration_s: float | None = None  # stop after this much output; None: until stop() or the source ends
    hls_time_s: float = 2.0  # target segment length (cut at keyframes)
    hls_list_size: int = 6  # segments in the live playlist; 0 keeps every segment (and the files)
    hls_segment_type: str = "mpegts"  # or "fmp4"

    def __post_init__(self) -> None:
        if self.video_bitrate < 10_000 or self.audio_bitrate < 8_000:
            raise ValueError("video_bitrate must be at least 10 kbit/s and audio_bitrate at least 8 kbit/s")
        if self.start_frames < 1 or self.queue_frames < self.start_frames:
            raise ValueError("need start_frames >= 1 and queue_frames >= start_frames")
        if self.max_attempts < 1 or self.retry_initial_s < 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("need max_attempts >= 1 and 0 <= retry_initial_s <= retry_max_s")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, not {self.duration_s}")
        if self.hls_segment_type not in HLS_SEGMENT_TYPES:
            raise ValueError(f"hls_segment_type must be one of {HLS_SEGMENT_TYPES}")
        if self.stable_s < 0 or self.max_stuck_writers < 1:
            raise ValueError("stable_s must be >= 0 and max_stuck_writers >= 1")
        if self.gop_s <= 0 or self.hls_time_s <= 0 or self.hls_list_size < 0 or self.write_timeout_s <= 0:
            raise ValueError("gop_s, hls_time_s and write_timeout_s must be positive, hls_list_size >= 0")
        self.pacer  # noqa: B018  (validates the output timeline's rules: max_lag_frames >= 1)

    @property
    def gop_frames(self) -> int:
        return max(1, round(self.gop_s * self.fps))

    def backoff_s(self, failures: int) -> float:
        """Wait before the next attempt after `failures` consecutive failed ones (0: at once)."""
        return 0.0 if failures <= 0 else min(self.retry_initial_s * 2 ** (failures - 1), self.retry_max_s)

    @property
    def pacer(self) -> PacerOptions:
        """The output timeline's rules: the feeder waits for room (so RAISE never fires), and nothing is
        trimmed (a broadcast keeps its latency; nobody is talking to it)."""
        return PacerOptions(max_frames=self.queue_frames, overflow=OverflowPolicy.RAISE,
                            start_frames=self.start_frames, max_lag_frames=self.max_lag_frames,
                            trim_above_frames=None, history_slots=self.max_lag_frames + 2)


def open_sink(target: Target, options: BroadcastOptions, *, resume: bool = False) -> AvSink | ProcessSink:
    """The file sink's muxer on a live target: low-latency H.264 (no B-frames, fixed GOP) + stereo AAC;
    for RTMP in a child process (`streaming.sink_process`), bounded by `write_timeout_s` per write."""
    g = str(options.gop_frames)
    video = {"preset": options.preset, "tune": "zerolatency", "g": g, "keyint_min": g, "bf": "0",
             "sc_threshold": "0",  # keyframes only on the GOP grid: regular HLS segments, joinable streams
             "maxrate": str(options.video_bitrate), "bufsize": str(2 * options.video_bitrate)}
    if target.kind == "rtmp":
        container, fmt = {"flvflags": "no_duration_filesize"}, "flv"  # the output cannot seek back
    else:
        Path(target.location).parent.mkdir(parents=True, exist_ok=True)
        flags = ["independent_segments"]
        if options.hls_list_size:
            flags.append("delete_segments")
        if resume:  # after a write failure: continue the playlist and its numbering
            flags += ["append_list", "discont_start"]
        container, fmt = {"hls_time": f"{options.hls_time_s:g}", "hls_list_size": str(options.hls_list_size),
                          "hls_flags": "+".join(flags), "hls_segment_type": options.hls_segment_type}, "hls"
    kwargs = dict(target=target.location, format=fmt, container_options=container, video_options=video,
                  audio_bit_rate=options.audio_bitrate, video_bit_rate=options.video_bitrate, audio_layout="stereo")
    if target.kind == "rtmp":  # FFmpeg's RTMP open can hang its process for good: not this one
        return ProcessSink(kwargs, timeout_s=options.write_timeout_s)
    return AvSink(**kwargs)


RTMP_HANDSHAKE = 1 + 1536  # C0/S0 (version) + C1/S1 (time, zero, 1528 random bytes)


async def probe_rtmp(target: Target, timeout_s: float) -> None:
    """Connect and do the first half of the RTMP handshake (C0+C1 -> S0+S1), each step within
    `timeout_s`; raises OSError / TimeoutError when the server does not answer like an RTMP server."""
    parts = urlsplit(target.location)
    tls = parts.scheme.lower() == "rtmps"
    host, port = parts.hostname or "", parts.port or (443 if tls else 1935)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if tls else None), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no connection within {timeout_s:g} s") from None
    except OSError as exc:  # asyncio's text ("Connect call failed (...)") names no cause
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, os.strerror(exc.errno)) from None
    try:
        writer.write(b"\x03" + bytes(RTMP_HANDSHAKE - 1))
        await asyncio.wait_for(writer.drain(), timeout_s)
        try:
            s0 = await asyncio.wait_for(reader.readexactly(RTMP_HANDSHAKE), timeout_s)
        except asyncio.IncompleteReadError:
            raise ConnectionError("the server closed the connection during the RTMP handshake") from None
        except TimeoutError:
            raise TimeoutError(f"no RTMP handshake answer within {timeout_s:g} s") from None
        if s0[0] != 3:
            raise ConnectionError(f"the server answered RTMP version {s0[0]}, not 3")
    finally:
        writer.close()


# ---- the broadcaster --------------------------------------------------------------------------------------
@dataclass
class BroadcastStats:
    frames_sent: int = 0  # slots written to a live connection (repeats included)
    repeated: int = 0  # REPEAT_LAST slots
    dropped_offline: int = 0  # frames whose slot passed while disconnected
    skipped_slots: int = 0  # their frames are the pacer's dropped_late
    bytes_sent: int = 0
    connections: int = 0  # successful connections (the first one included)
    reconnects: int = 0  # successful connections after the first
    disconnects: int = 0  # live connections lost
    failed_attempts: int = 0  # connection attempts that failed (all, not only consecutive)


class _Failed(Exception):
    pass


class Broadcaster:
    """One livestream of one source to one target. `run()` once; `stop()` ends it cleanly."""

    def __init__(self, target: Target | str, options: BroadcastOptions = BroadcastOptions(), *,
                 clock: MediaClock | None = None,
                 sink_factory: Callable[..., AvSink] = open_sink,
                 probe: Callable[[Target, float], Awaitable[None]] | None = None,
                 on_state: Callable[[Broadcaster, str], None] | None = None) -> None:
        self.target = parse_target(target) if isinstance(target, str) else target
        self.options = options
        self.clock = clock or MediaClock(options.fps)
        if self.clock.fps != options.fps:
            raise ValueError(f"the clock runs at {self.clock.fps} fps, the options say {options.fps}")
        self._sink_factory, self._on_state = sink_factory, on_state
        # the RTMP handshake check before FFmpeg's unbounded open (a sink factory of a test: none by default)
        self._probe = probe if probe is not None else probe_rtmp if sink_factory is open_sink else None
        self.state = "idle"
        self.end_reason: str | None = None  # stopped | duration | source_ended | failed
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock
        self.stats = BroadcastStats()
        self.started_at: float | None = None  # wall clock (time.time) of run()
        self.live_since: float | None = None  # wall clock of the current connection
        self.pacer = Pacer(self.clock, options.pacer)
        self._room = asyncio.Event()  # set whenever a slot is taken from the pacer (BACKPRESSURE)
        self._stop = False
        self._fail_message: str | None = None
        self._source_done = False
        self._source_error: str | None = None
        self._sink: AvSink | None = None
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        self._failures = 0  # consecutive failed attempts
        self._live_at: float | None = None  # media-clock time the current connection went live
        self._stuck: list[concurrent.futures.Future] = []  # teardown of abandoned connections, pending
        self._retry_at = 0.0
        self._bytes_before = 0  # sent on earlier connections
        self._rate: deque[tuple[float, int]] = deque(maxlen=int(BITRATE_WINDOW_S * options.fps * 2))

    # ---- control ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish at the next slot: flush the encoders and end the stream (HLS: the playlist's ENDLIST)."""
        self._stop = True

    def fail(self, message: str) -> None:
        """End at the next slot as failed with `message` (e.g. the audio feeding the session broke)."""
        self._fail_message = message
        self._stop = True

    @property
    def stopping(self) -> bool:
        return self._stop

    async def run(self, source: AsyncIterator[SessionItem]) -> dict[str, Any]:
        """Stream `source` until stop(), `duration_s`, the source's end, or failure; returns the snapshot."""
        if self.state != "idle":
            raise RuntimeError("a Broadcaster runs once; make a new one")
        self.started_at = time.time()
        self._set_state("starting")
        feeder = asyncio.get_running_loop().create_task(self._feed(source), name="broadcast-feed")
        clean = False
        try:
            await self._send_loop()
            clean = True
        except _Failed as exc:
            self.last_error, self.end_reason = str(exc), "failed"
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            self.pacer.close()
            if clean:
                await self._close_sink()
            else:  # failed, or cancelled: cut the connection without finishing the stream
                self._drop_connection()
                self.end_reason = self.end_reason or "cancelled"
            self._set_state("failed" if self.end_reason == "failed" else "stopped")
        return self.snapshot()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            log.info("broadcast %s: %s%s", self.target.display, state,
                     f" ({self.last_error})" if state in ("reconnecting", "failed") and self.last_error else "")
            if self._on_state is not None:
                self._on_state(self, state)

    # ---- input ------------------------------------------------------------------------------------------
    async def _feed(self, source: AsyncIterator[SessionItem]) -> None:
        try:
            async for item in source:
                if isinstance(item, AvatarFrame):
                    while self.pacer.level >= self.options.queue_frames:  # BACKPRESSURE
                        self._room.clear()
                        await self._room.wait()
                    try:
                        self.pacer.push(item)
                    except ValueError as exc:  # a frame the output timeline cannot carry
                        self._source_error = f"the source's frames cannot be broadcast: {exc}"
                        return
                elif isinstance(item, SessionError):
                    self._source_error = f"the session failed: {item.message}"
                    return
                # SegmentEnd: the output is continuous across speech segments; nothing to do
        except Exception as exc:  # a source that raises ends the broadcast with its error
            self._source_error = f"the source failed: {type(exc).__name__}: {exc}"
        finally:
            self._source_done = True

    async def _wait_for_frame(self, deadline: float) -> None:
        """Until a frame is buffered, the source is done or stopped, or `deadline`."""
        while not self.pacer.level and not self._source_done and not self._stop:
            now = self.clock.now()
            if now >= deadline:
                return
            await self.clock.sleep_until(min(deadline, now + POLL_S))

    # ---- output timeline ------------------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        opts, clock, pacer = self.options, self.clock, self.pacer
        # 1. pre-roll: the pacer starts the clock once start_frames are in (here: the source ended early);
        #    meanwhile the RTMP muxers' fork server starts (a cold start takes a second, once per process)
        if self.target.kind == "rtmp":
            prewarm_in_background()
        while pacer.level < opts.start_frames and not self._source_done and not self._stop:
            await clock.sleep_until(clock.now() + POLL_S)
        if not pacer.level:
            self._end_from_source("the source ended before its first frame")
            return
        clock.start()
        limit = None if opts.duration_s is None else round(opts.duration_s * opts.fps)
        k = 0
        while not self._stop and (limit is None or k < limit):
            # 2. slot k: never before it is due; REPEAT_LAST if no frame came in time
            due = clock.video_due(k)
            await clock.sleep_until(due)
            await self._wait_for_frame(due + opts.underrun_grace_s)
            if not pacer.level and self._source_done:
                self._end_from_source(None)
                return
            slot = pacer.slot(k)
            self._room.set()
            self.stats.repeated += slot.repeated
            await self._output(self._slot_frame(slot))
            k += 1
            # 3. SKIP_LATE: a stalled write must not be followed by a burst
            late = pacer.catch_up(k)
            if late > k:
                self._room.set()
                self.stats.skipped_slots += late - k
                k = late
        if self._fail_message is not None:
            raise _Failed(self._fail_message)
        self.end_reason = "stopped" if self._stop else "duration"

    def _end_from_source(self, default: str | None) -> None:
        error = self._fail_message or self._source_error
        if error is not None:
            raise _Failed(error)
        self.end_reason = "stopped" if self._stop else "source_ended"
        if default is not None and not self._stop:
            self.last_error = default

    def _slot_frame(self, slot: Slot) -> AvatarFrame:
        """Output slot k as a frame stamped k: its picture and exactly its samples (a repeat: silence)."""
        return AvatarFrame(video=slot.video, audio=slot.pcm, sample_rate=self.clock.sample_rate, pts=slot.index,
                           fps=self.options.fps, idle=slot.idle)

    # ---- connection -----------------------------------------------------------------------------------------
    async def _output(self, frame: AvatarFrame) -> None:
        now = self.clock.now()
        if self._sink is None:
            if now < self._retry_at:
                self.stats.dropped_offline += 1  # OFFLINE: the slot passes without a connection
                return
            self._set_state("connecting" if self.stats.connections == 0 else "reconnecting")
            self._stuck = [f for f in self._stuck if not f.done()]
            try:
                if len(self._stuck) >= self.options.max_stuck_writers:
                    raise TimeoutError(f"{len(self._stuck)} earlier connections are still blocked in a write")
                if self._probe is not None and self.target.kind == "rtmp":
                    await self._probe(self.target, self.options.write_timeout_s)
                # off the loop: an RTMP sink starts its muxer process (and waits for the fork server once)
                self._sink = await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(self._sink_factory, self.target, self.options,
                                            resume=self.stats.connections > 0))
            except OSError as exc:  # refused, no RTMP answer, or e.g. the HLS directory cannot be created
                self._connection_failed(exc, was_live=False)
                self.stats.dropped_offline += 1
                return
            self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="broadcast-io")
        sink = self._sink
        try:
            await self._on_io(sink.write, frame)  # the first write connects
        except (av.error.FFmpegError, OSError) as exc:
            self._connection_failed(exc, was_live=sink.frames_written > 0)
            self.stats.dropped_offline += 1
            return
        except ValueError as exc:  # a frame the sink refuses (size or rate changed): not a network problem
            raise _Failed(f"the source's frames cannot be encoded: {exc}") from None
        if sink.frames_written == 1:
            self._connected()
        elif self._failures and self._live_at is not None and now - self._live_at >= self.options.stable_s:
            self._failures = 0  # live long enough: the link works again
        self.stats.frames_sent += 1
        self.stats.bytes_sent = self._bytes_before + sink.bytes_written
        self._rate.append((self.clock.now(), self.stats.bytes_sent))

    async def _on_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run on this connection's I/O thread; `write_timeout_s` without an answer counts as a lost link."""
        assert self._io is not None
        future = asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
        try:
            return await asyncio.wait_for(future, self.options.write_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no progress for {self.options.write_timeout_s:g} s") from None

    def _connected(self) -> None:
        self.stats.connections += 1
        if self.stats.connections > 1:
            self.stats.reconnects += 1
        self._live_at = self.clock.now()
        if not self.options.stable_s:
            self._failures = 0
        self.live_since = time.time()
        self._set_state("live")

    def _connection_failed(self, exc: BaseException, *, was_live: bool) -> None:
        self.last_error, self.last_error_at = self._describe(exc), time.time()
        lived = 0.0 if self._live_at is None else self.clock.now() - self._live_at
        self._drop_connection()
        if was_live:
            self.stats.disconnects += 1
            if lived >= self.options.stable_s:  # a working link went away: try again at the next slot
                self._failures, self._retry_at = 0, self.clock.now()
                self._set_state("reconnecting")
                return
        self._failures += 1
        self.stats.failed_attempts += 1
        if self._failures >= self.options.max_attempts:
            raise _Failed(f"gave up on {self.target.display} after {self._failures} failed attempts "
                          f"in a row: {self.last_error}")
        self._retry_at = self.clock.now() + self.options.backoff_s(self._failures)
        self._set_state("reconnecting")

    def _drop_connection(self) -> None:
        """Abandon the connection: its thread tears it down (after a stuck write, whenever that returns)."""
        sink, io = self._sink, self._io
        self._sink, self._io, self._live_at = None, None, None
        if sink is not None:
            self._bytes_before += sink.bytes_written
            if io is not None:
                self._stuck.append(io.submit(sink.abort))  # done at once unless a write is still blocked
        if io is not None:
            io.shutdown(wait=False)
        self.live_since = None

    async def _close_sink(self) -> None:
        """Finish the stream: flush both encoders, write the trailer (HLS: the last segment, ENDLIST)."""
        if self._sink is None:
            return
        try:
            await self._on_io(self._sink.close)
            self.stats.bytes_sent = self._bytes_before + self._sink.bytes_written
            self._bytes_before, self._sink = self.stats.bytes_sent, None
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self.last_error = f"finishing the stream: {self._describe(exc)}"
        finally:
            self._drop_connection()

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return text.replace(self.target.location, self.target.display)

    # ---- reporting ----------------------------------------------------------------------------------------
    def bitrate_bps(self) -> float:
        """Bits/s over the last BITRATE_WINDOW_S of writes (0 when not sending)."""
        if self._sink is None or len(self._rate) < 2:
            return 0.0
        t_end, b_end = self._rate[-1]
        if self.clock.now() - t_end > BITRATE_WINDOW_S:
            return 0.0
        t0, b0 = next((t, b) for t, b in self._rate if t >= t_end - BITRATE_WINDOW_S)
        return (b_end - b0) * 8 / (t_end - t0) if t_end > t0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "target": self.target.display, "kind": self.target.kind, "state": self.state,
            "end_reason": self.end_reason, "last_error": self.last_error, "last_error_at": self.last_error_at,
            "frames_sent": s.frames_sent, "seconds_sent": round(s.frames_sent / self.options.fps, 2),
            "repeated": s.repeated, "skipped_slots": s.skipped_slots,
            "dropped": {"offline": s.dropped_offline, "late": self.pacer.stats.dropped_late},
            "bytes_sent": s.bytes_sent, "bitrate_kbps": round(self.bitrate_bps() / 1000, 1),
            "avg_bitrate_kbps": round(s.bytes_sent * 8 * self.options.fps / s.frames_sent / 1000, 1)
            if s.frames_sent else 0.0,
            "video_bitrate_kbps": self.options.video_bitrate // 1000,
            "reconnects": s.reconnects, "disconnects": s.disconnects, "failed_attempts": s.failed_attempts,
            "connections": s.connections, "buffered": self.pacer.level,
            "started_at": self.started_at, "live_since": self.live_since,
        }
