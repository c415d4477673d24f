"""The live service: every call (`LivePeer`) of one server, their limits, their control and reporting.

HTTP lives in app/server.py and app/admin.py; this is what they call. Requests that cannot be served
raise `LiveError` (status, stable code, message) before taking any resource, or after releasing it.
What it answers is typed in streaming/api_schema.py.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Coroutine, Protocol

from streaming.api_schema import (CallEnd, ConditionsAnswer, EngineSnapshot, ServiceSnapshot, SessionEnded,
                                  SessionReport, WorkerStatus)
from streaming.events import EventBus
from streaming.metrics import LiveMetrics
from streaming.webrtc.dialogue import CALL_SPEAKERS, check_second_voice, check_speakers, offers_stereo
from streaming.webrtc.limits import RateLimit
from streaming.webrtc.peer import (MODES, CapacityError, LiveError, LivePeer, Offer, PeerOptions, SessionBackend,
                                   validate_offer)

log = logging.getLogger(__name__)


class ServiceBackend(SessionBackend, Protocol):
    """The engine as the service and its HTTP routes see it: sessions to open (`SessionBackend`, what a
    call needs) plus what the server reports about the engine. The app layer implements it
    (app/avatars.py `EngineBackend`), so nothing here imports torch."""

    @property
    def checkpoint(self) -> str | None:
        """Where the model's weights were read from; None for random weights."""
        ...

    def snapshot(self) -> EngineSnapshot: ...

    def workers(self) -> list[WorkerStatus]:
        """The engine workers behind the sessions (an in-process engine is one)."""
        ...

    def faces(self) -> dict[str, int]:
        """Avatar name -> how many faces it has (how many voices a session on it can take)."""
        ...

    def avatar_warnings(self) -> dict[str, str]:
        """Avatar name -> why the model will draw it badly (a photo given to the drawn-face demo model);
        avatars without a warning are left out."""
        ...


class Keep(enum.Enum):
    """A condition a change request leaves as the call has it."""

    CURRENT = "current"


KEEP = Keep.CURRENT


@dataclass(frozen=True)
class ServiceOptions:
    max_sessions: int = 4
    peer: PeerOptions = field(default_factory=PeerOptions)
    stats_interval_s: float = 1.0  # how often a "stats" event goes to console subscribers (0: never)
    remember_ended: int = 256  # ended calls whose end reason their page can still ask for
    # per remote address (0: no limit): calls held at once (connecting ones too) and offers a minute;
    # per call: avatar/emotion changes a minute (each one moves the call to a new engine session)
    calls_per_client: int = 0
    offers_per_minute: int = 0
    conditions_per_minute: int = 0
    retry_after_s: float = 5.0  # Retry-After of a full server: calls end and slots free within seconds


class LiveService:
    def __init__(self, backend: ServiceBackend, options: ServiceOptions = ServiceOptions(),
                 metrics: LiveMetrics | None = None, events: EventBus | None = None) -> None:
        self.backend, self.options = backend, options
        self.metrics = metrics or LiveMetrics()
        self.events = events or EventBus()
        self.peers: dict[str, LivePeer] = {}
        self.ended: OrderedDict[str, CallEnd] = OrderedDict()  # the newest ended calls, oldest first
        self.started_at = time.time()
        self._tasks: set[asyncio.Task] = set()
        self._shutting_down = False
        self._offer_rate = RateLimit(options.offers_per_minute) if options.offers_per_minute else None
        self._conditions_rate = RateLimit(options.conditions_per_minute) if options.conditions_per_minute else None

    # ---- task set ----------------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run a long-lived or fire-and-forget task, referenced until it is done."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def start(self) -> None:
        if self.options.stats_interval_s > 0:
            self.spawn(self._stats_ticker(), "stats-ticker")

    async def shutdown(self) -> None:
        """Close every call and stop the service's tasks."""
        self._shutting_down = True
        await asyncio.gather(*(p.close("server_shutdown") for p in list(self.peers.values())),
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- calls -------------------------------------------------------------------------------------------
    def _reject(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> LiveError:
        self.metrics.offers_rejected.labels(code).inc()
        return LiveError(status, code, message, retry_after_s)

    def check_offer(self, offer: Offer, client: str | None = None) -> None:
        """Everything that can be refused without touching the engine or the network. `client`: the
        remote address the per-client limits count against (None: not limited, e.g. in-process callers)."""
        if self._shutting_down:
            raise self._reject(503, "shutting_down", "the server is shutting down")
        if client is not None and self._offer_rate is not None:
            wait = self._offer_rate.hit(client)  # every offer counts, refused ones too
            if wait:
                raise self._reject(429, "too_many_offers", f"more than {self._offer_rate.limit} offers a minute "
                                                           f"from {client}; try again in {wait:.0f} s", wait)
        if offer.mode not in MODES:
            raise self._reject(400, "bad_mode", f"mode must be one of {list(MODES)}, not {offer.mode!r}")
        try:
            self.check_conditions(offer.avatar, offer.emotion, offer.speakers)
            validate_offer(offer.sdp, offer.codec)
            self.check_dialogue(offer)
        except LiveError as exc:
            raise self._reject(exc.status, exc.code, exc.message) from None
        limit = self.options.calls_per_client
        if client is not None and limit and sum(p.client == client for p in self.peers.values()) >= limit:
            raise self._reject(429, "too_many_calls", f"{client} already has {limit} calls (connecting ones "
                                                      "count until they connect or time out); end one first",
                               self.options.retry_after_s)
        if len(self.peers) >= self.options.max_sessions:
            raise self._reject(503, "at_capacity", f"all {self.options.max_sessions} sessions are in use; "
                                                   "try again later", self.options.retry_after_s)

    def check_dialogue(self, offer: Offer) -> None:
        """A call's voices: one (the caller), or two with exactly one second voice (a media file, or the
        caller's right channel, which needs a stereo offer). The file itself is checked in `offer`."""
        if offer.speakers == 1:
            if offer.second_voice is not None or offer.stereo_split:
                raise LiveError(400, "bad_dialogue", "'second_voice' and 'stereo_split' are for two-person "
                                                     "calls: add \"speakers\": 2")
            return
        if offer.speakers > CALL_SPEAKERS:
            raise LiveError(400, "bad_dialogue", f"a call has at most {CALL_SPEAKERS} voices (the caller and one "
                                                 f"second voice), not {offer.speakers}")
        if (offer.second_voice is None) == (not offer.stereo_split):
            raise LiveError(400, "bad_dialogue", "a two-person call needs exactly one second voice: "
                                                 "'second_voice' (an audio file of the media folder) or "
                                                 "'stereo_split': true (left channel = speaker 1, right = speaker 2)")
        if offer.stereo_split and not offers_stereo(offer.sdp):
            raise LiveError(400, "mono_caller", "'stereo_split' takes speaker 2 from the caller's right channel, "
                                                "but this offer's audio is mono (its Opus has no sprop-stereo=1); "
                                                "use a stereo microphone or choose a 'second_voice' file")

    async def offer(self, offer: Offer, client: str | None = None) -> dict[str, Any]:
        """Offer -> answer; one engine session and one peer connection per call."""
        self.check_offer(offer, client)
        if offer.second_voice is not None:  # opening and decoding a file blocks: off the loop
            try:
                await asyncio.get_running_loop().run_in_executor(None, check_second_voice, offer.second_voice,
                                                                 self.options.peer.sources)
            except LiveError as exc:
                raise self._reject(exc.status, exc.code, exc.message) from None
        peer = LivePeer(secrets.token_urlsafe(12), offer, self.backend, self.options.peer, self.metrics,
                        self.events, on_closed=self._closed, spawn=self.spawn)
        peer.client = client
        self.peers[peer.id] = peer  # holds the slot across the awaits below
        self.metrics.sessions.set(len(self.peers))
        try:
            answer = await peer.negotiate()
        except CapacityError as exc:
            await peer.close("at_capacity")
            raise self._reject(503, "at_capacity", str(exc), self.options.retry_after_s) from None
        except LiveError as exc:
            await peer.close("offer_failed")
            raise self._reject(exc.status, exc.code, exc.message) from None
        except BaseException:
            await asyncio.shield(peer.close("offer_failed"))
            raise
        self.metrics.sessions_opened.inc()
        self.events.publish("session_opened", session=peer.id, avatar=peer.avatar, emotion=peer.emotion,
                            mode=peer.mode, codec=peer.negotiated_codec)
        return {"sdp": answer.sdp, "type": answer.type, "session_id": peer.id, "codec": peer.negotiated_codec,
                "avatar": peer.avatar, "emotion": peer.emotion, "speakers": peer.speakers}

    def _closed(self, peer: LivePeer) -> None:
        if self.peers.pop(peer.id, None) is None:
            return
        self.metrics.sessions.set(len(self.peers))
        reason = peer.end_reason or "unknown"
        self.ended[peer.id] = {"session_id": peer.id, "reason": reason, "error": peer.error}
        while len(self.ended) > self.options.remember_ended:
            self.ended.popitem(last=False)
        if reason != "offer_failed" and reason != "at_capacity":
            self.metrics.sessions_ended.labels(reason).inc()
            self.events.publish("session_closed", session=peer.id, reason=reason, error=peer.error,
                                frames_sent=peer.video.sent, age_s=round(time.monotonic() - peer.created_at, 2))

    def get(self, peer_id: str) -> LivePeer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise LiveError(404, "unknown_session", f"no live session {peer_id!r}")
        return peer

    async def end(self, peer_id: str, reason: str = "bye") -> SessionEnded:
        peer = self.get(peer_id)
        await peer.close(reason)
        return {"session_id": peer_id, "ended": True, "reason": reason, "frames_sent": peer.video.sent}

    def check_conditions(self, avatar: str, emotion: str | None, speakers: int = 1) -> list[str]:
        """LiveError 400 unless `avatar` is served, `emotion` (None: no emotion) is one of its emotions and
        it has a face for each of `speakers` voices; returns the avatar's emotions."""
        catalog = self.backend.catalog()
        if avatar not in catalog:
            raise LiveError(400, "unknown_avatar", f"no avatar {avatar!r}; available: {sorted(catalog)}")
        if emotion is not None and emotion not in catalog[avatar]:
            raise LiveError(400, "unknown_emotion", f"avatar {avatar!r} has no emotion {emotion!r}; "
                                                    f"available: {catalog[avatar]}")
        if speakers != 1:  # one voice fits every avatar (and every backend: no face count needed)
            check_speakers(avatar, speakers, self.backend.faces())
        return catalog[avatar]

    def set_conditions(self, peer_id: str, avatar: str | None = None,
                       emotion: str | None | Keep = KEEP) -> ConditionsAnswer:
        """The one rule for changing a call's avatar and/or emotion (the page's pickers and the admin API):
        - `avatar` None keeps the call's avatar;
        - `emotion` KEEP (not given) keeps the call's emotion where the target avatar has it, and is none
          where it does not: a caller switching avatars expects the mood to follow, not a 400 about an
          emotion they never named, nor a reset they did not ask for;
        - `emotion` None means no emotion reference; a name must be one of the avatar's emotions.
        A change is stored and applied at the next pause in the outgoing speech (the call moves to a
        new engine session). Asking for what the call already shows changes nothing (and drops a
        pending change): moving to a fresh session would restart the session's audio cursor and
        timeline for the same picture."""
        peer = self.get(peer_id)
        if avatar is None and emotion is KEEP:
            raise LiveError(400, "bad_request", "give 'avatar' and/or 'emotion' (null for none)")
        if self._conditions_rate is not None:
            wait = self._conditions_rate.hit(peer_id)
            if wait:
                raise LiveError(429, "too_many_changes", f"more than {self._conditions_rate.limit} avatar/emotion "
                                                         f"changes a minute on this call; try again in {wait:.0f} s",
                                wait)
        avatar = avatar or peer.avatar
        if isinstance(emotion, Keep):
            emotion = peer.emotion if peer.emotion in self.check_conditions(avatar, None, peer.speakers) else None
        else:
            self.check_conditions(avatar, emotion, peer.speakers)
        if (avatar, emotion) == (peer.avatar, peer.emotion):
            peer.pending = None
        else:
            peer.request_conditions(avatar, emotion)
        applied = peer.pending is None
        return {"session_id": peer_id, "avatar": avatar, "emotion": emotion,
                "status": "applied" if applied else "pending",
                "applies": "now" if applied else "at the next pause in the avatar's speech"}

    # ---- reporting ----------------------------------------------------------------------------------------
    def sessions(self) -> list[SessionReport]:
        return [p.snapshot() for p in self.peers.values()]

    def snapshot(self) -> ServiceSnapshot:
        return {
            "sessions": self.sessions(),
            "max_sessions": self.options.max_sessions,
            "uptime_s": round(time.time() - self.started_at, 1),
            "engine": self.backend.snapshot(),
            "subscribers": self.events.subscribers,
        }

    async def _stats_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.options.stats_interval_s)
            if self.events.subscribers:
                self.events.publish("stats", sessions=[
                    {"id": p.id, "state": p.state, "fps": p.fps(), "paused": p.paused, "emotion": p.emotion,
                     "avatar": p.avatar, "latency_ms": p.snapshot()["latency_ms"]["p50"],
                     "pacer_level": p.pacer.level, "repeated": p.pacer.stats.repeated}
                    for p in self.peers.values()])
