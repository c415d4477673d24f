"""Broadcast faults against the RTMP connection logic (127.0.0.1 only): a server that accepts and never
answers, writes that never return, links that drop before they are stable. Thread counts stay flat and
every failure is bounded in time."""

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
    assert len(made) == 4 and snap["disconnects"] == 4 and all(s.aborted for s in made)


def _io_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("broadcast-io")]


async def test_a_stalled_rtmp_server_costs_no_thread_and_fails_in_bounded_time():
    """A server that accepts TCP and never answers (127.0.0.1 only): FFmpeg's open of that output has no
    timeout and holds the GIL (the whole process froze), so every attempt must fail on the handshake
    check, within write_timeout_s, without starting an I/O thread."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # held open, never read from nor written to
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    threads_before = threading.active_count()
    try:
        opts = BroadcastOptions(start_frames=1, write_timeout_s=0.2, retry_initial_s=0.01, retry_max_s=0.02,
                                max_attempts=20)
        b = Broadcaster(f"rtmp://127.0.0.1:{listener.getsockname()[1]}/live/stalled", opts)
        t0 = time.monotonic()
        snap = await asyncio.wait_for(b.run(frames(None)), 30)
        assert snap["state"] == "failed" and snap["failed_attempts"] == 20, snap
        assert "no RTMP handshake answer within 0.2 s" in snap["last_error"], snap["last_error"]
        assert time.monotonic() - t0 < 20 * (0.2 + 0.02) + 3  # each attempt bounded by the timeout
        assert len(accepted) == 20  # every attempt really reached the server
        assert threading.active_count() <= threads_before + 1 and not _io_threads()  # flat: nothing leaked
    finally:
        stop.set()
        acceptor.join(2)
        for c in accepted:
            c.close()
        listener.close()


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
