"""The gateway's engine workers: placement, admission and supervision behind the `ServiceBackend`.

`WorkerPool` is what the live service talks to (catalog / open / snapshot / checkpoint / workers, the
contract `EngineBackend` implements in-process), so WebRTC calls, broadcasts and the admin API work
unchanged whether the engine runs here, in worker processes or in Ray actors. Each worker has a
`WorkerHandle` that owns its state, its link and its sessions; all of it lives on the gateway's event
loop (the links' threads only hand batches over with `call_soon_threadsafe`).

Placement: a new call goes to the ready worker with the most headroom, free slots x (1 - load), where
load is the busy share of the worker's engine measured over its last heartbeat; when every worker
is full, `open` raises CapacityError (the HTTP layer answers 503 with Retry-After). With `max_load` set
(`avatarcast serve`: 0.9), a worker also counts as full once one more call would load its engine past that
share of real time, measured: a call it could not serve in real time is refused rather than admitted to
slow every call on it.

Supervision (a task ticking every `tick_s`): a worker is dead when its process or actor ends (the
link sees EOF at once; a worker exits by itself on a CUDA error, which poisons its device context),
when its heartbeat says its engine's threads died, when no heartbeat came for `heartbeat_timeout_s`,
when it made no frame for `stall_timeout_s` with sessions open (wedged), or when it did not start
within `start_timeout_s`.
A dead worker is killed, its sessions end with SessionError(WORKER_STOPPED) (the call's page shows
it; `LivePeer` first tries to reopen the call on a healthy worker), and it restarts after a backoff
that doubles up to `max_backoff_s` and resets once it has stayed up `stable_after_s`. Other workers'
calls never notice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from app.settings import Settings
from app.workers.engine_worker import WorkerSpec, boot_id
from app.workers.protocol import (FATAL, FRAME, HEARTBEAT, HELLO, SEGMENT_END, SESSION_CLOSED, SESSION_ERROR, Close,
                                  Command, Open, Output)
from app.workers.session import WORKER_STOPPED, WorkerSession
from streaming.api_schema import EngineSnapshot, LatencyBudget, WorkerStatus
from streaming.webrtc.dialogue import check_speakers
from streaming.webrtc.peer import CapacityError

log = logging.getLogger(__name__)

NO_BUDGET: LatencyBudget = {"block_ms": 0.0, "lookahead_ms": 0.0, "features_ms": 0.0, "denoise_ms": 0.0,
                            "decode_ms": 0.0, "total_ms": 0.0}


class WorkerLink(Protocol):
    """How the gateway reaches one worker (app/workers/process.py ProcessLink, ray_actors.py RayLink)."""

    kind: str
    pid: int | None
    host: str

    def start(self, on_messages: Callable[[list[Output]], None], on_lost: Callable[[str], None]) -> None: ...

    def send(self, cmd: Command) -> bool: ...

    def kill(self) -> None: ...

    def stop(self, timeout_s: float = 10.0) -> None: ...


@dataclass(frozen=True)
class PoolOptions:
    workers: int = 1
    backend: str = "process"  # "process" (local worker processes) or "ray" (Ray actors)
    ray_address: str | None = None  # None: a Ray cluster started here
    heartbeat_timeout_s: float = 5.0  # no heartbeat (sent every WorkerSpec.heartbeat_s) for this long: wedged
    stall_timeout_s: float = 15.0  # sessions open and no frame made for this long: wedged
    start_timeout_s: float = 600.0  # models loaded, engine warmed up and avatars prepared within this
    backoff_s: float = 1.0  # first restart delay; doubles per restart up to max_backoff_s
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0  # up this long: the next restart starts from backoff_s again
    queue_frames: int = 50  # frames waiting for a session's reader at most (2 s at 25 fps)
    max_load: float = 0.0  # admission by measured cost: a worker that has sessions takes one more only if
    # its engine's load (busy share of wall time) per session at the last heartbeat, times the sessions it
    # would then hold, stays at or under this; sessions cost about the same each (on 2 CPU cores batching
    # gained nothing), so a call the worker could not serve in real time is refused with 503 instead of
    # slowing every call on it. 0: slots only (max_sessions)
    tick_s: float = 0.1

    def __post_init__(self) -> None:
        if self.backend not in ("process", "ray"):
            raise ValueError(f"worker backend must be 'process' or 'ray', not {self.backend!r}")
        if self.workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {self.workers}")
        if min(self.heartbeat_timeout_s, self.stall_timeout_s, self.start_timeout_s, self.backoff_s, self.tick_s) <= 0:
            raise ValueError("the pool's timeouts, backoff and tick must be positive")
        if self.max_load < 0:
            raise ValueError(f"max_load is a busy share (0: off), not {self.max_load}")


class WorkerHandle:
    """One worker slot of the pool: its current link, state and sessions (event loop only)."""

    def __init__(self, pool: WorkerPool, worker_id: str) -> None:
        self.pool, self.id = pool, worker_id
        self.state = "starting"  # starting -> ready -> dead -> starting ...
        self.link: WorkerLink | None = None
        self.restarts = 0
        self.info: dict[str, Any] = {}  # the last HELLO
        self.stats: dict[str, Any] = {}  # the last HEARTBEAT
        self.sessions: dict[int, WorkerSession] = {}
        self.same_clock = False
        self.last_error: str | None = None
        self.started_at = self.heartbeat_at = self.ready_at = 0.0
        self.next_start_at = 0.0
        self.backoff_s = pool.options.backoff_s
        self._keys = itertools.count(1)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        loop = self.pool.loop
        link = self.pool.make_link(self.id)
        self.link, self.state, self.info, self.stats = link, "starting", {}, {}
        self.started_at = time.monotonic()
        link_start = loop.run_in_executor(None, link.start,  # spawning must not stall the event loop
                                          lambda batch: self._to_loop(self._on_messages, link, batch),
                                          lambda why: self._to_loop(self.lost, link, why))
        link_start.add_done_callback(lambda f: f.cancelled() or f.exception() is None or
                                     self.lost(link, f"could not start ({type(f.exception()).__name__}: "
                                                     f"{f.exception()})"))

    def _to_loop(self, fn, *args) -> None:
        """From a link's thread to the event loop (nothing to do once the loop is closed: we are exiting)."""
        try:
            self.pool.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def lost(self, link: WorkerLink, why: str) -> None:
        """The worker behind `link` is gone or unusable: kill it, end its sessions, plan a restart."""
        if link is not self.link or self.state == "dead":
            return  # an earlier incarnation, or already handled
        now = time.monotonic()
        stopping = self.pool.stopping
        self.state, self.last_error = "dead", why
        link.kill()
        if not stopping:
            log.warning("worker %s (pid %s) stopped: %s; %d sessions end", self.id, link.pid, why, len(self.sessions))
        for session in list(self.sessions.values()):
            session.fail(WORKER_STOPPED)
        self.sessions.clear()
        if self.ready_at and now - self.ready_at >= self.pool.options.stable_after_s:
            self.backoff_s = self.pool.options.backoff_s
        self.next_start_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.pool.options.max_backoff_s)

    def retire(self) -> WorkerLink | None:
        """The pool is stopping: end the sessions, forget the worker (its link is stopped by the caller)."""
        for session in list(self.sessions.values()):
            session.close()
        self.state, self.last_error = "dead", "stopped"
        return self.link

    def check(self, now: float) -> None:
        """The supervisor's look at this worker."""
        o = self.pool.options
        if self.state == "starting" and now - self.started_at > o.start_timeout_s:
            self.lost(self.link, f"did not start within {o.start_timeout_s:.0f} s")
        elif self.state == "ready":
            silent = now - self.heartbeat_at
            stalled = float(self.stats.get("stalled_s") or 0.0)
            if silent > o.heartbeat_timeout_s:
                self.lost(self.link, f"no heartbeat for {silent:.1f} s (wedged)")
            elif self.stats.get("engine_running") is False:
                self.lost(self.link, "its engine stopped (a generation or decode thread died)")
            elif stalled > o.stall_timeout_s and self.sessions:
                self.lost(self.link, f"no frame made for {stalled:.1f} s with {len(self.sessions)} sessions open "
                                     "(wedged)")
        elif self.state == "dead" and not self.pool.stopping and now >= self.next_start_at:
            self.restarts += 1
            log.info("worker %s: restart %d", self.id, self.restarts)
            self.start()

    # ---- messages (event loop) ----------------------------------------------------------------------------
    def _on_messages(self, link: WorkerLink, batch: list[Output]) -> None:
        if link is not self.link or self.state == "dead":
            return
        for out in batch:
            if out.kind in (FRAME, SEGMENT_END, SESSION_ERROR):
                session = self.sessions.get(out.key)
                if session is not None:
                    session.deliver(out, self.same_clock)
            elif out.kind == SESSION_CLOSED:
                session = self.sessions.get(out.key)
                if session is not None:
                    session.ended_by_worker()
            elif out.kind == HEARTBEAT:
                self._heartbeat(out.info or {})
            elif out.kind == HELLO:
                self._ready(out.info or {})
            elif out.kind == FATAL:
                self.lost(link, f"failed: {(out.info or {}).get('error', 'no reason given')}")
                return

    def _ready(self, info: dict[str, Any]) -> None:
        self.info, self.state = info, "ready"
        self.same_clock = info.get("boot_id") == boot_id()
        self.heartbeat_at = self.ready_at = time.monotonic()
        log.info("worker %s ready: pid %s on %s, model %s (%s decoder), %s sessions", self.id, info.get("pid"),
                 info.get("host"), info.get("model"), info.get("decoder"), info.get("max_sessions"))
        self.pool.worker_ready(self)

    def _heartbeat(self, stats: dict[str, Any]) -> None:
        self.stats, self.heartbeat_at = stats, time.monotonic()
        counters = stats.get("sessions") or {}
        for key, session in self.sessions.items():
            if str(key) in counters:
                session.worker_counters(counters[str(key)])

    # ---- sessions ---------------------------------------------------------------------------------------
    @property
    def max_sessions(self) -> int:
        return int(self.info.get("max_sessions") or 0)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_sessions - len(self.sessions)) if self.state == "ready" else 0

    def headroom(self) -> float:
        load = min(0.95, max(0.0, float(self.stats.get("load") or 0.0)))
        return self.free_slots * (1.0 - load)

    def load_with_one_more(self) -> float:
        """The engine's predicted load with one more session: its load per session at the last heartbeat
        times the sessions it would then hold (sessions opened since count too). 0 before any is measured."""
        measured = len(self.stats.get("sessions") or {})
        if not measured:
            return 0.0
        return float(self.stats.get("load") or 0.0) / measured * (len(self.sessions) + 1)

    def open(self, avatar: str, emotion: str | None, speakers: int = 1) -> WorkerSession:
        assert self.link is not None
        session = WorkerSession(self, next(self._keys), self.pool.options.queue_frames, speakers)
        if not self.link.send(Open(session.key, avatar, emotion, self.same_clock, speakers)):
            raise CapacityError(f"avatar worker {self.id} is not taking commands; try again shortly")
        self.sessions[session.key] = session
        return session

    def send(self, cmd: Command) -> bool:
        return self.state == "ready" and self.link is not None and self.link.send(cmd)

    def release(self, session: WorkerSession, tell_worker: bool) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            if tell_worker:
                self.send(Close(session.key))

    def status(self) -> WorkerStatus:
        pid = self.info.get("pid") if self.info else (self.link.pid if self.link else None)
        return {"id": self.id, "pid": pid, "host": str(self.info.get("host") or (self.link.host if self.link else "")),
                "state": self.state, "sessions": len(self.sessions), "restarts": self.restarts,
                "max_sessions": self.max_sessions, "fps": self.stats.get("fps"), "block_ms": self.stats.get("block_ms"),
                "load": self.stats.get("load"), "last_error": self.last_error}


class WorkerPool:
    """`ServiceBackend` over engine workers. `await start()` on the serving loop before the first call."""

    def __init__(self, spec: WorkerSpec, options: PoolOptions = PoolOptions(),
                 make_link: Callable[[str], WorkerLink] | None = None) -> None:
        self.spec, self.options = spec, options
        self.make_link = make_link or self._default_link
        self.handles = [WorkerHandle(self, f"w{i + 1}") for i in range(options.workers)]
        self.default_avatar = ""
        self._catalog: dict[str, list[str]] = {}
        self._faces: dict[str, int] = {}
        self._warnings: dict[str, str] = {}
        self._info: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self._first_ready: asyncio.Future | None = None
        self._supervisor: asyncio.Task | None = None
        self._ray_gpus = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait for the first one to be ready (its HELLO names the avatars)."""
        self.loop = asyncio.get_running_loop()
        self._first_ready = self.loop.create_future()
        if self.options.backend == "ray":
            self._ray_gpus = await self.loop.run_in_executor(None, _connect_ray, self.options.ray_address)
        for handle in self.handles:
            handle.start()
        self._supervisor = self.loop.create_task(self._supervise(), name="worker-supervisor")
        await self._first_ready

    async def stop(self) -> None:
        """End every session and stop every worker (in parallel, each killed if it does not stop)."""
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        # a ready worker gets time to stop in order; one still loading is killed (it has nothing to keep)
        timeouts = [10.0 if h.state == "ready" else 0.0 for h in self.handles]
        stops = [(h.retire(), timeout) for h, timeout in zip(self.handles, timeouts)]
        await asyncio.gather(*(asyncio.to_thread(link.stop, timeout) for link, timeout in stops if link is not None),
                             return_exceptions=True)

    def worker_ready(self, handle: WorkerHandle) -> None:
        catalog = {str(k): list(v) for k, v in (handle.info.get("catalog") or {}).items()}
        if not self._catalog:
            self._catalog, self._info = catalog, handle.info
            self._faces = {str(k): int(v) for k, v in (handle.info.get("faces") or {}).items()}
            self._warnings = {str(k): str(v) for k, v in (handle.info.get("avatar_warnings") or {}).items()}
            self.default_avatar = str(handle.info.get("default_avatar") or "")
        elif catalog != self._catalog:
            log.error("worker %s serves avatars %s, the others %s; calls may fail on it", handle.id,
                      sorted(catalog), sorted(self._catalog))
        if self._first_ready is not None and not self._first_ready.done():
            self._first_ready.set_result(None)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick_s)
            now = time.monotonic()
            for handle in self.handles:
                handle.check(now)
            first = self._first_ready
            if first is not None and not first.done() and all(h.state == "dead" for h in self.handles):
                errors = "; ".join(f"{h.id}: {h.last_error}" for h in self.handles)
                first.set_exception(RuntimeError(f"no avatar worker could start ({errors})"))

    def _default_link(self, worker_id: str) -> WorkerLink:
        if self.options.backend == "ray":
            from app.workers.ray_actors import RayLink

            return RayLink(self.spec, worker_id, gpus=self._ray_gpus)
        from app.workers.process import ProcessLink

        return ProcessLink(self.spec, f"avatarcast-worker-{worker_id}")

    # ---- ServiceBackend -------------------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The first ready worker's HELLO: model, decoder, device, avatars."""
        return self._info

    @property
    def checkpoint(self) -> str | None:
        return self._info.get("checkpoint")

    @property
    def capacity(self) -> int:
        """Sessions the pool holds when every worker is ready."""
        return self.options.workers * self.spec.max_sessions

    def catalog(self) -> dict[str, list[str]]:
        return self._catalog

    def faces(self) -> dict[str, int]:
        return self._faces

    def avatar_warnings(self) -> dict[str, str]:
        return self._warnings

    def open(self, avatar: str, emotion: str | None, speakers: int = 1) -> WorkerSession:
        """A session on the ready worker with the most headroom; CapacityError when none has room.
        `speakers` voices need as many faces (ValueError before any worker is asked). A call moving off a
        dead worker is admitted like a new one: loading a healthy worker past real time would make its
        own calls notice the death."""
        check_speakers(avatar, speakers, self._faces)
        ready = [h for h in self.handles if h.state == "ready"]
        if not ready:
            raise CapacityError("no avatar worker is ready (starting or restarting); try again shortly")
        candidates = [h for h in ready if h.free_slots > 0]
        if not candidates:
            used = sum(len(h.sessions) for h in ready)
            raise CapacityError(f"every avatar worker is full ({used} sessions on {len(ready)} workers); "
                                "try again later")
        limit = self.options.max_load
        if limit:
            fit = [h for h in candidates if not h.sessions or h.load_with_one_more() <= limit]
            if not fit:
                least = min(h.load_with_one_more() for h in candidates)
                raise CapacityError(f"every avatar worker is at its real-time limit (one more call would load "
                                    f"the least busy to {least:.2f}, the limit is {limit:.2f}); try again later")
            candidates = fit
        best = max(candidates, key=lambda h: (h.headroom(), h.free_slots, -self.handles.index(h)))
        return best.open(avatar, emotion, speakers)

    def workers(self) -> list[WorkerStatus]:
        return [h.status() for h in self.handles]

    def snapshot(self) -> EngineSnapshot:
        """The engine as the admin API reports it: per-session counters of every worker, the latency
        budget of the busiest ready worker, and each worker's status."""
        sessions = {}
        for handle in self.handles:
            for s in handle.sessions.values():
                st = s.stats
                sessions[s.id] = {"frames": st.frames, "idle_frames": st.idle_frames, "blocks": st.blocks,
                                  "next_pts": s.next_video, "dropped_input_samples": st.dropped_input_samples,
                                  "dropped_frames": st.dropped_frames, "held_frames": st.held_frames}
        ready = [h for h in self.handles if h.state == "ready" and h.stats]
        busiest = max(ready, key=lambda h: len(h.sessions), default=None)
        info = self._info
        return {"model": str(info.get("model", "")), "mode": str(info.get("mode", "")),
                "device": str(info.get("device", "")), "decoder": str(info.get("decoder", "")),
                "warmup_ms": float(info.get("warmup_ms") or 0.0), "sessions": sessions,
                "failures": sum(int(h.stats.get("failures") or 0) for h in self.handles),
                "latency_budget": busiest.stats.get("latency_budget", NO_BUDGET) if busiest else NO_BUDGET,
                "workers": self.workers()}


def worker_pool(settings: Settings) -> WorkerPool:
    """The pool `avatarcast serve` runs: `settings.workers` local processes, or Ray actors (one per GPU of
    the cluster unless `ray_workers` says how many)."""
    if settings.workers == "ray":
        _connect_ray(settings.ray_address)
        count = settings.ray_workers or _cluster_gpus() or 1
        spec = _spec(settings, threads=settings.engine_threads or 1)  # an actor holds one CPU of its node
        return WorkerPool(spec, PoolOptions(workers=count, backend="ray", ray_address=settings.ray_address,
                                            max_load=settings.max_load))
    if settings.local_workers < 1:
        raise ValueError("a worker pool needs workers >= 1 (0 runs the engine in the server's process)")
    spec = _spec(settings, threads=settings.threads_per_worker())
    log.info("starting %d engine worker processes (%d compute threads each)", settings.local_workers, spec.threads)
    return WorkerPool(spec, PoolOptions(workers=settings.local_workers, max_load=settings.max_load))


def _spec(settings: Settings, threads: int) -> WorkerSpec:
    return WorkerSpec(model=settings.model, max_sessions=settings.max_sessions, threads=threads,
                      avatar=settings.avatar, max_lag_s=settings.max_lag_s)


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _connect_ray(address: str | None) -> int:
    """Join the Ray cluster at `address` (None: start one here); returns the GPUs each worker takes."""
    try:
        import ray
    except ImportError:
        raise ValueError("--workers ray needs Ray: pip install 'avatarcast[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
