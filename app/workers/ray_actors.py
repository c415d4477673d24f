"""Engine workers as Ray actors: the same `EngineWorker`, reached through Ray instead of a pipe.

`RayEngineWorker` becomes an async Ray actor (`ray.remote` at run time: Ray is an optional extra); its
event loop is the EngineWorker's, so sessions, their forwarding tasks and heartbeats run there as in a
worker process. The gateway's `RayLink` reaches it only through actor method calls: `start` (load, then
HELLO info), `open_session` / `push_audio` / `end_segment` / `interrupt` / `close_session`, and `poll`,
a long-poll that returns the protocol messages emitted since the last one (at most POLL_S of waiting).

Order: Ray does not promise that an async actor runs one caller's calls in the order they were
submitted, so the link's sender thread waits for each call before making the next (audio chunks queued
meanwhile go together in the next `push_audio`); the commands of a session therefore apply in order.
An actor that dies (its process killed, its node lost) fails the pending poll with a RayActorError:
the link reports it lost at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

from app.workers.protocol import (HELLO, Close, Command, EndSegment, Interrupt, Open, Outbox, Output, Push,
                                  decode_output)

log = logging.getLogger(__name__)

POLL_S = 0.5  # a poll returns after this long when nothing was emitted
BATCH = 64  # messages one poll returns at most
OUTBOX = 512  # messages waiting for a poll; beyond it the worker's sessions wait (and stop generating)
CALL_TIMEOUT_S = 30.0


class RayEngineWorker:
    """An `EngineWorker` in a Ray actor (see the module docstring)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.worker = None
        self.outbox: asyncio.Queue[bytes] | None = None

    async def start(self) -> dict[str, Any]:
        import ray

        from app.workers.engine_worker import EngineWorker

        loop = asyncio.get_running_loop()
        self.worker = await loop.run_in_executor(None, EngineWorker, self.spec)  # the loop stays free meanwhile
        self.outbox = asyncio.Queue(maxsize=OUTBOX)
        self.worker.bind(self.outbox.put)
        # a Ray worker's node is its address in the cluster
        return {**self.worker.hello(), "host": ray.util.get_node_ip_address()}

    async def open_session(self, key: int, avatar: str, emotion: str | None, same_clock: bool,
                           speakers: int = 1) -> None:
        self.worker.open_session(key, avatar, emotion, same_clock, speakers)

    async def push_audio(self, chunks: list[tuple[int, Any, int, float, int]]) -> None:
        """Audio of any sessions, in order: (key, mono float32 PCM, sample rate, gateway send time, speaker)."""
        for key, pcm, rate, sent_at, speaker in chunks:
            self.worker.push_audio(key, pcm, rate, sent_at, speaker)

    async def end_segment(self, key: int) -> None:
        self.worker.end_segment(key)

    async def interrupt(self, key: int, epoch: int) -> None:
        self.worker.interrupt(key, epoch)

    async def close_session(self, key: int) -> None:
        self.worker.close_session(key)

    async def poll(self, timeout_s: float = POLL_S) -> list[bytes]:
        """Messages emitted since the last poll; waits up to `timeout_s` for the first."""
        try:
            out = [await asyncio.wait_for(self.outbox.get(), timeout_s)]
        except asyncio.TimeoutError:
            return []
        while len(out) < BATCH and not self.outbox.empty():
            out.append(self.outbox.get_nowait())
        return out

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()


class RayLink:
    """One Ray actor, as the gateway's `WorkerHandle` drives it."""

    kind = "ray"

    def __init__(self, spec, name: str, gpus: int = 0, cpus: float = 1.0) -> None:
        self.spec, self.name, self.gpus, self.cpus = spec, name, gpus, cpus
        self.pid: int | None = None
        self.host = ""
        self.actor = None
        self._outbox = Outbox()
        self._stopping = False

    def start(self, on_messages: Callable[[list[Output]], None], on_lost: Callable[[str], None]) -> None:
        import ray

        actor_cls = ray.remote(RayEngineWorker).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
                                                        name=None)
        self.actor = actor_cls.remote(self.spec)
        threading.Thread(target=self._read, args=(on_messages, on_lost), name=f"{self.name}-poll", daemon=True).start()
        threading.Thread(target=self._write, name=f"{self.name}-send", daemon=True).start()

    def send(self, cmd: Command) -> bool:
        return self._outbox.put(cmd)

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray

        self._stopping = True
        self._outbox.close()
        if self.actor is not None:
            try:
                ray.get(self.actor.stop.remote(), timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - it is killed below either way
                log.warning("%s did not stop cleanly (%s)", self.name, exc)
        self.kill()

    # ---- threads ------------------------------------------------------------------------------------------
    def _read(self, on_messages: Callable[[list[Output]], None], on_lost: Callable[[str], None]) -> None:
        import ray

        try:
            info = ray.get(self.actor.start.remote())
            self.pid, self.host = info.get("pid"), str(info.get("host", ""))
            on_messages([Output(HELLO, info=info)])
            while not self._stopping:
                messages = ray.get(self.actor.poll.remote(POLL_S), timeout=POLL_S + CALL_TIMEOUT_S)
                if messages:
                    on_messages([decode_output(m) for m in messages])
        except Exception as exc:  # noqa: BLE001 - any failure of the actor ends this link
            on_lost("stopped" if self._stopping else f"{type(exc).__name__}: {_first_line(exc)}")
            return
        on_lost("stopped")

    def _write(self) -> None:
        import ray

        while True:
            batch = self._outbox.take()
            chunks: list[tuple[int, Any, int, float, int]] = []
            try:
                for cmd in batch:
                    if cmd is None:
                        return
                    if isinstance(cmd, Push):
                        chunks.append((cmd.key, cmd.pcm, cmd.sample_rate, cmd.sent_at, cmd.speaker))
                        continue
                    if chunks:
                        self._call(ray, self.actor.push_audio, chunks)
                        chunks = []
                    self._call(ray, *self._method(cmd))
                if chunks:
                    self._call(ray, self.actor.push_audio, chunks)
            except Exception:  # noqa: BLE001 - the actor is gone; the poll thread reports it
                return

    def _method(self, cmd: Command) -> tuple:
        if isinstance(cmd, Open):
            return self.actor.open_session, cmd.key, cmd.avatar, cmd.emotion, cmd.same_clock, cmd.speakers
        if isinstance(cmd, EndSegment):
            return self.actor.end_segment, cmd.key
        if isinstance(cmd, Interrupt):
            return self.actor.interrupt, cmd.key, cmd.epoch
        if isinstance(cmd, Close):
            return self.actor.close_session, cmd.key
        raise TypeError(f"no actor method for {cmd!r}")

    @staticmethod
    def _call(ray, method, *args) -> None:
        ray.get(method.remote(*args), timeout=CALL_TIMEOUT_S)  # one at a time: the actor applies them in order


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
