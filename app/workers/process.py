"""Local engine workers: one spawned process each, reached over a `multiprocessing` pipe.

Worker side (`worker_main`, the spawned process): build the `EngineWorker` (models, engine, avatars),
say HELLO, then run its event loop; a reader thread hands each command to the loop, and one writer
thread sends what the worker emits, in order. The gateway's end of the pipe closing (the gateway
exited or was killed) stops the worker, so no worker outlives its gateway.

Gateway side (`ProcessLink`): a reader thread decodes the worker's messages and hands them over in
batches; a sender thread writes commands from a bounded queue, so the gateway's event loop never
blocks on a pipe: when a wedged worker stops reading, the queue fills and `send` says so (the
caller counts the dropped audio) until supervision declares the worker dead. The process ending
(kill -9, out of memory, a crash) closes the pipe: the reader sees EOF at once and reports it lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from typing import Callable

from app.workers.protocol import (FATAL, HELLO, Command, Outbox, Output, Stop, decode_command, decode_output,
                                  encode_command, encode_info)

log = logging.getLogger(__name__)

OnMessages = Callable[[list[Output]], None]  # called on the link's reader thread
OnLost = Callable[[str], None]  # called once, on the link's reader thread
BATCH = 64  # messages handed over at once at most


# ---- worker side -----------------------------------------------------------------------------------------------
def worker_main(conn, spec) -> None:
    """The spawned worker process."""
    import asyncio

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the gateway's: it stops workers in order
    if spec.nice:
        os.nice(spec.nice)  # below the gateway on this machine (WorkerSpec.nice)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(message)s")
    from app.workers.engine_worker import EngineWorker

    try:
        worker = EngineWorker(spec)
    except Exception as exc:  # said to the gateway, which logs it and retries later
        log.exception("worker failed to start")
        conn.send_bytes(encode_info(FATAL, {"error": f"{type(exc).__name__}: {exc}"}))
        return
    try:
        asyncio.run(_serve(conn, worker))
    finally:
        worker.stop()  # already done when the loop ended in order; not when it failed


async def _serve(conn, worker) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    writer = ThreadPoolExecutor(1, thread_name_prefix="worker-send")  # one thread: messages keep their order
    stopped = asyncio.Event()

    async def send(message: bytes) -> None:
        try:
            await loop.run_in_executor(writer, conn.send_bytes, message)
        except (OSError, EOFError, RuntimeError):  # the gateway is gone, or we are stopping (writer shut down)
            stopped.set()

    def read() -> None:
        while True:
            try:
                cmd = decode_command(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if isinstance(cmd, Stop):
                break
            loop.call_soon_threadsafe(worker.apply, cmd)
        loop.call_soon_threadsafe(stopped.set)

    await send(encode_info(HELLO, worker.hello()))
    worker.bind(send)
    threading.Thread(target=read, name="worker-commands", daemon=True).start()
    await stopped.wait()
    worker.stop()
    writer.shutdown(wait=True, cancel_futures=True)


# ---- gateway side ----------------------------------------------------------------------------------------------
class ProcessLink:
    """One local worker process, as the gateway's `WorkerHandle` drives it."""

    kind = "process"

    def __init__(self, spec, name: str) -> None:
        self.spec, self.name = spec, name
        self.pid: int | None = None
        self.host = socket.gethostname()
        self._process = None
        self._conn = None
        self._outbox = Outbox()

    def start(self, on_messages: OnMessages, on_lost: OnLost) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        parent, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=worker_main, args=(child, self.spec), name=self.name, daemon=True)
        self._process.start()
        child.close()  # ours is gone: the worker's death closes the pipe for good
        self._conn, self.pid = parent, self._process.pid
        threading.Thread(target=self._read, args=(on_messages, on_lost), name=f"{self.name}-read", daemon=True).start()
        threading.Thread(target=self._write, name=f"{self.name}-send", daemon=True).start()

    def send(self, cmd: Command) -> bool:
        """Queue a command for the worker; False when the worker has stopped reading (outbox full)."""
        return self._outbox.put(cmd)

    def kill(self) -> None:
        """SIGKILL (also ends a stopped or wedged process); the reader thread then sees EOF."""
        if self._process is not None and self._process.is_alive():
            try:
                os.kill(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to stop, wait for it, kill it if it does not."""
        if self._process is None:
            return
        self.send(Stop())
        self._process.join(timeout_s)
        if self._process.is_alive():
            if timeout_s > 0:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            self.kill()
            self._process.join(5)
        self._outbox.close()

    # ---- threads ------------------------------------------------------------------------------------------
    def _read(self, on_messages: OnMessages, on_lost: OnLost) -> None:
        conn = self._conn
        try:
            while True:
                batch = [decode_output(conn.recv_bytes())]
                while len(batch) < BATCH and conn.poll():
                    batch.append(decode_output(conn.recv_bytes()))
                on_messages(batch)
        except (EOFError, OSError):
            pass
        except Exception as exc:  # a message that does not decode: this worker cannot be trusted
            log.exception("%s: bad message", self.name)
            self.kill()
            on_lost(f"sent a message that does not decode ({type(exc).__name__}: {exc})")
            return
        on_lost(self._exit_reason())

    def _exit_reason(self) -> str:
        self._process.join(1.0)
        code = self._process.exitcode
        if code is None:
            return "closed its connection"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def _write(self) -> None:
        while True:
            for cmd in self._outbox.take():
                if cmd is None:
                    return
                try:
                    self._conn.send_bytes(encode_command(cmd))
                except (OSError, ValueError):  # the worker is gone; the reader reports it
                    return
