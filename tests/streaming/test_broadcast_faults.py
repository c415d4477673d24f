"""Broadcast faults against the RTMP connection logic (127.0.0.1 only): a server that accepts and never
answers, one that completes the handshake and then stalls, writes that never return, links that drop
before they are stable. Thread and process counts stay flat and every failure is bounded in time."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from test_broadcast import FakeSink, frames

from avatar.types import AvatarFrame
from streaming.broadcast import Broadcaster, BroadcastOptions

from helpers import until

pytestmark = pytest.mark.timeout(120)


async def test_connections_that_drop_before_they_are_stable_count_as_failures():
    made: list[FakeSink] = []

    def factory(target, options, resume):  # every connection carries 3 frames, then the link breaks
        made.append(FakeSink(fail_at=3))
        return made[-1]

    opts = BroadcastOptions(start_frames=1, retry_initial_s=0.01, retry_max_s=0.02, max_attempts=4, stable_s=1.0)
    b = Broadcaster("rtmp://127.0.0.1:1/live/k", opts, sink_factory=factory)
    snap = await asyncio.wait_for(b.run(frames(None)), 20)  # before: reset by every short success, forever
    assert snap["state"] == "failed" and "4 failed attempts" in snap["last_error"], snap
    assert len(made) == 4 and snap["disconnects"] == 4
    await until(lambda: all(s.aborted for s in made), 5, "every dropped connection torn down (on its I/O thread)")


def _io_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("broadcast-io")]


class StallingRtmpServer:
    """A server on 127.0.0.1 that accepts and then never answers: right away (`handshake=False`: nothing
    is ever read or written), or after completing the RTMP handshake (C0+C1 -> S0+S1+S2), never answering
    FFmpeg's `connect` (the open that once froze the whole process for good)."""

    def __init__(self, handshake: bool) -> None:
        self.handshake = handshake
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn = self.listener.accept()[0]
            except TimeoutError:
                continue
            self.accepted.append(conn)  # held open until close()
            if self.handshake:
                threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            c0c1 = b""
            while len(c0c1) < 1537:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                c0c1 += chunk
            conn.sendall(b"\x03" + bytes(1536) + c0c1[1:1537])  # S0, S1, S2 (the echo of C1)
            self.handshakes += 1  # then hold the connection: nothing more is ever sent
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for c in self.accepted:
            c.close()
        self.listener.close()


async def test_a_stalled_rtmp_server_costs_no_thread_and_fails_in_bounded_time():
    """A server that accepts TCP and never answers (127.0.0.1 only): FFmpeg's open of that output has no
    timeout and holds the GIL (the whole process froze), so every attempt must fail on the handshake
    check, within write_timeout_s, without starting an I/O thread."""
    server = StallingRtmpServer(handshake=False)
    threads_before = threading.active_count()
    try:
        opts = BroadcastOptions(start_frames=1, write_timeout_s=0.2, retry_initial_s=0.01, retry_max_s=0.02,
                                max_attempts=20)
        b = Broadcaster(f"rtmp://127.0.0.1:{server.port}/live/stalled", opts)
        t0 = time.monotonic()
        snap = await asyncio.wait_for(b.run(frames(None)), 30)
        assert snap["state"] == "failed" and snap["failed_attempts"] == 20, snap
        assert "no RTMP handshake answer within 0.2 s" in snap["last_error"], snap["last_error"]
        assert time.monotonic() - t0 < 20 * (0.2 + 0.02) + 3  # each attempt bounded by the timeout
        assert len(server.accepted) == 20  # every attempt really reached the server
        assert threading.active_count() <= threads_before + 1 and not _io_threads()  # flat: nothing leaked
    finally:
        server.close()


async def test_at_most_max_stuck_writers_threads_stay_blocked():
    """Writes that never return (a server that stopped reading): each abandoned connection keeps its
    thread until the write returns, so after `max_stuck_writers` of them no new attempt starts one."""
    release = threading.Event()

    class Hanging(FakeSink):
        def write(self, f: AvatarFrame) -> None:
            if len(self.writes) == 2:
                release.wait(30)
            super().write(f)

    opts = BroadcastOptions(start_frames=1, write_timeout_s=0.1, retry_initial_s=0.01, retry_max_s=0.02,
                            max_attempts=8, max_stuck_writers=2)
    made: list[Hanging] = []
    b = Broadcaster("rtmp://127.0.0.1:1/live/k", opts,
                    sink_factory=lambda target, options, resume: made.append(Hanging()) or made[-1])
    try:
        snap = await asyncio.wait_for(b.run(frames(None)), 20)
        assert snap["state"] == "failed" and len(made) == 2, (snap, len(made))
        assert "still blocked in a write" in snap["last_error"] and len(_io_threads()) <= 2
    finally:
        release.set()
    await until(lambda: not _io_threads(), 5, "the released writers to finish")


async def test_an_rtmp_server_that_stalls_after_the_handshake_never_freezes_the_process():
    """FFmpeg's RTMP open waits forever for the `connect` answer with the GIL held; the muxer runs in a
    child process that is killed after write_timeout_s, so the event loop keeps running, each attempt
    fails in bounded time, and no thread or process is left behind."""
    import multiprocessing

    server = StallingRtmpServer(handshake=True)
    lags: list[float] = []

    async def ticker() -> None:  # the event loop's own heartbeat: a frozen process stops it
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append(time.monotonic() - t - 0.05)

    tick = asyncio.get_running_loop().create_task(ticker())
    threads_before = threading.active_count()
    try:
        opts = BroadcastOptions(start_frames=1, write_timeout_s=3.0, retry_initial_s=0.01, retry_max_s=0.02,
                                max_attempts=3)
        b = Broadcaster(f"rtmp://127.0.0.1:{server.port}/live/stalled", opts)
        t0 = time.monotonic()
        snap = await asyncio.wait_for(b.run(frames(None)), 60)
        assert snap["state"] == "failed" and snap["failed_attempts"] == 3, snap
        # the broadcaster's own write timeout, or the sink's (whichever fires first: both are 3 s)
        assert any(t in snap["last_error"] for t in ("no progress for 3 s", "no answer from the output for 3 s"))
        assert server.handshakes == 2 * 3  # each attempt: the handshake check, then FFmpeg got past it too
        assert time.monotonic() - t0 < 3 * (3.0 + 2.0) + 5
        assert max(lags) < 1.0, max(lags)  # the loop never froze (it did for good before)
        await until(lambda: not multiprocessing.active_children() and not _io_threads(), 10,
                    "the muxer processes and I/O threads to go")
        assert threading.active_count() <= threads_before + 1
    finally:
        tick.cancel()
        server.close()
