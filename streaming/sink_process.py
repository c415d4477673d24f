"""A media sink whose muxer runs in a child process, for outputs that can hang the process that opens them.

FFmpeg opens an RTMP output (PyAV's `start_encoding` -> `avio_open`) with no timeout, no interrupt
callback and the GIL held: a server that completes the TCP and RTMP handshakes and then never answers
the `connect` command freezes every thread of the process that tried, for good. Here the `AvSink` lives
in a process of its own (forked from a fork server, see `prewarm`); the parent sends it one frame at
a time over a pipe and waits at most `timeout_s` for each answer. A child that does not answer in time
is killed and the write raises `TimeoutError`, so nothing in the parent stays blocked (no abandoned
thread, no frozen event loop), and a dead child is an `OSError` that names its exit code.

    sink = ProcessSink(dict(target="rtmp://host/app/key", format="flv", ...), timeout_s=10)  # AvSink kwargs
    sink.write(frame)        # blocking, bounded by timeout_s: call it from an I/O thread
    sink.close()             # flush and finish the stream; abort() kills without finishing

Messages: parent -> child `("write", AvatarFrame)`, `("close",)`, `("abort",)`; child -> parent
`("ok", frames_written, bytes_written)` or `("error", kind, message)` with kind "value" (the frame was
refused: ValueError in the parent) or "io" (the output failed: OSError). This module never imports torch.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

from avatar.types import AvatarFrame

START_TIMEOUT_S = 30.0  # a cold start imports PyAV and numpy before the child's first answer
KILL_WAIT_S = 2.0

# Children fork from a fork server (a clean, single-threaded process that imported the muxer once), so a
# connection starts its muxer in milliseconds instead of a fresh interpreter's second or more of imports;
# forking this process itself is unsafe (threads).
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["__main__", "streaming.sink_process", "streaming.filesink"])  # __main__: imported once


def _ready() -> None:
    pass


def prewarm(timeout_s: float = START_TIMEOUT_S) -> None:
    """Start the fork server and wait until it has imported the muxer (blocking: call it off the loop)."""
    probe = _CTX.Process(target=_ready, name="avatarcast-muxer-warmup", daemon=True)
    probe.start()
    probe.join(timeout_s)


_warming = threading.Lock()
_warm = False


def prewarm_in_background() -> None:
    """`prewarm` on a thread of its own, once per process; returns at once."""
    global _warm
    with _warming:
        if _warm:
            return
        _warm = True
    threading.Thread(target=prewarm, name="avatarcast-muxer-warmup", daemon=True).start()


def _serve(conn, sink_kwargs: dict[str, Any]) -> None:
    """The child: an AvSink driven by the parent's messages until close, abort or a broken pipe."""
    import av

    from streaming.filesink import AvSink

    sink = AvSink(**sink_kwargs)
    conn.send(("ok", 0, 0))  # ready
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent went away: discard the output
            sink.abort()
            return
        op = msg[0]
        try:
            if op == "write":
                sink.write(msg[1])
            elif op == "close":
                sink.close()
            else:
                sink.abort()
        except ValueError as exc:
            conn.send(("error", "value", str(exc)))
            continue
        except (av.error.FFmpegError, OSError) as exc:
            conn.send(("error", "io", str(exc) or type(exc).__name__))
            sink.abort()
            return
        conn.send(("ok", sink.frames_written, sink.bytes_written))
        if op != "write":
            return


class ProcessSink:
    """`AvSink(**sink_kwargs)` in a child process; every call answers within `timeout_s` or raises."""

    def __init__(self, sink_kwargs: dict[str, Any], timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.target = str(sink_kwargs.get("target", "?"))
        self.timeout_s = timeout_s
        self.frames_written = 0
        self.bytes_written = 0
        self._lock = threading.Lock()  # abort() may come from another thread than write()
        self._done = False
        self._conn, child = _CTX.Pipe()
        self._proc = _CTX.Process(target=_serve, args=(child, dict(sink_kwargs)), name="avatarcast-muxer",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._started = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # ---- calls --------------------------------------------------------------------------------------
    def write(self, frame: AvatarFrame) -> None:
        self._call(("write", frame))

    def close(self) -> None:
        """Flush both encoders and finish the stream; the child exits."""
        if self._done:
            return
        try:
            self._call(("close",))
        finally:
            self._finish()

    def abort(self) -> None:
        """Stop without finishing: ask the child to discard, kill it if it does not go at once."""
        if self._done:
            return
        self._done = True
        try:
            if self._proc.is_alive() and self._lock.acquire(timeout=0.1):  # not while a write is waiting
                try:
                    self._conn.send(("abort",))
                finally:
                    self._lock.release()
        except (OSError, ValueError):
            pass
        self._finish(wait_s=0.5)

    # ---- plumbing ----------------------------------------------------------------------------------
    def _call(self, msg: tuple) -> None:
        if self._done:
            raise RuntimeError(f"{self.target}: sink already closed")
        with self._lock:
            if not self._started:  # the child's first answer says it is up
                self._answer(START_TIMEOUT_S, "starting the muxer process")
                self._started = True
            try:
                self._conn.send(msg)
            except (OSError, ValueError):
                raise self._died() from None
            kind, *rest = self._answer(self.timeout_s, msg[0])
        if kind == "ok":
            self.frames_written, self.bytes_written = rest
            return
        err, text = rest
        if err == "value":
            raise ValueError(text)
        self._finish()
        raise OSError(text)

    def _answer(self, timeout_s: float, doing: str) -> tuple:
        deadline = time.monotonic() + timeout_s
        try:
            while not self._conn.poll(max(0.0, min(0.5, deadline - time.monotonic()))):
                if not self._proc.is_alive():
                    raise self._died()
                if time.monotonic() >= deadline:
                    self._finish(wait_s=0.0)
                    raise TimeoutError(f"no answer from the output for {timeout_s:g} s ({doing})")
            return self._conn.recv()
        except (TimeoutError, ConnectionError):
            raise
        except (EOFError, OSError):  # the pipe broke: the child is gone (or abort() closed it)
            raise self._died() from None

    def _died(self) -> OSError:
        self._proc.join(KILL_WAIT_S)
        code = self._proc.exitcode
        self._finish(wait_s=0.0)
        return ConnectionError(f"the muxer process for {self.target} exited ({code})")

    def _finish(self, wait_s: float = KILL_WAIT_S) -> None:
        """The child gone (killed if it has not exited within `wait_s`) and the pipe closed."""
        self._done = True
        self._proc.join(wait_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(KILL_WAIT_S)
        self._conn.close()
