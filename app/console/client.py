"""The console's only way to the server: the admin API over HTTP with a bearer token.

`AdminClient.snapshot()` gathers what one refresh of the console shows, as plain JSON data
(`ConsoleSnapshot`; the server's answers are typed in streaming/api_schema.py):

    {"metrics":   GET /admin/metrics   (sessions, uptime, engine summary),
     "engine":    GET /admin/engine    (model, checkpoint, device, decoder provider, real-time factor,
                                        memory; the summary in metrics when the server has no such route),
     "broadcast": GET /admin/broadcast ({"broadcasts": [...], "max_broadcasts": n}, or
                                        {"available": False, "message": ...} where it answers 501),
     "workers":   GET /admin/workers   ({"workers": [...]}: the engine workers, or {"available": False, ...}
                                        from a server without the route)}

Every failure becomes an `AdminError` whose `kind` tells the console what to say and whether retrying
can help: "connection" (refused, reset, timed out), "auth" (401), "forbidden" (403), "not_available"
(501), "server" (other 5xx), "request" (other 4xx). `FakeAdminClient` plays scripted snapshots and
events for tests and records the actions it is asked for; its answers have the server's schema
(tests/app/test_console.py checks both against it).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from typing import Any, AsyncIterator, Iterator, Protocol, Sequence

import aiohttp
from typing_extensions import TypedDict

from streaming.api_schema import (AvatarCatalog, BroadcastList, BroadcastReport, ConditionsAnswer, EngineInfo,
                                  EngineSnapshot, PauseAnswer, ServiceSnapshot, SessionEnded, WorkerList)

REQUEST_TIMEOUT_S = 5.0
EVENTS_READ_TIMEOUT_S = 45.0  # the server sends a keep-alive every 15 s; three missed means it is gone


class EngineSummary(EngineSnapshot):
    """The engine as /admin/metrics summarises it, when GET /admin/engine cannot be had."""

    note: str


class BroadcastUnavailable(TypedDict, closed=True):
    available: bool  # always False
    message: str
    status: int | None


class WorkersUnavailable(TypedDict, closed=True):
    available: bool  # always False
    message: str
    status: int | None


class ConsoleSnapshot(TypedDict, closed=True):
    metrics: ServiceSnapshot
    engine: EngineInfo | EngineSummary
    broadcast: BroadcastList | BroadcastUnavailable
    workers: WorkerList | WorkersUnavailable


class AdminError(Exception):
    """A failed admin request, in words an operator can act on."""

    def __init__(self, kind: str, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.status, self.code = kind, message, status, code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status else self.message


def error_from_response(status: int, body: Any, reason: str = "") -> AdminError:
    """Map an HTTP error status and its JSON body ({"error": code, "message": text}) to an AdminError."""
    code = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    message = str(message or reason or f"HTTP {status}")
    if status == 401:
        if code == "missing_token":
            return AdminError("auth", "no admin token was sent: give --token or set AVATARCAST_ADMIN_TOKEN",
                              status, code)
        return AdminError("auth", f"bad token: {message}", status, code)
    if status == 403:
        return AdminError("forbidden", f"forbidden: {message}", status, code)
    if status == 501:
        return AdminError("not_available", message, status, code)
    if status >= 500:
        return AdminError("server", f"server error: {message}", status, code)
    return AdminError("request", message, status, code)


def parse_sse(lines: Sequence[str]) -> dict[str, Any] | None:
    """One server-sent event (its lines, without the blank line that ends it) -> its JSON data."""
    data = [line[5:].lstrip() for line in lines if line.startswith("data:")]
    if not data:
        return None  # a comment (": keep-alive") or an event without data
    try:
        event = json.loads("\n".join(data))
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _why(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused (is `avatarcast serve` running there?)"
    return exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__


@contextlib.contextmanager
def _reaching(url: str, what: str) -> Iterator[None]:
    """Network failures inside the block become AdminError("connection") naming `what` was asked of `url`."""
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise AdminError("connection", f"cannot connect to {url}: {_why(exc)}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
        why = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
        raise AdminError("connection", f"{what} {url}: {why}") from None


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class Admin(Protocol):
    """What the console needs from the server (AdminClient, or FakeAdminClient in tests)."""

    url: str

    async def snapshot(self) -> ConsoleSnapshot: ...
    async def avatars(self) -> AvatarCatalog: ...
    def events(self) -> AsyncIterator[dict[str, Any]]: ...
    async def end_session(self, session_id: str) -> SessionEnded: ...
    async def set_conditions(self, session_id: str, avatar: str | None, emotion: str | None) -> ConditionsAnswer: ...
    async def pause(self, session_id: str) -> PauseAnswer: ...
    async def resume(self, session_id: str) -> PauseAnswer: ...
    async def start_broadcast(self, to: str, session_id: str) -> BroadcastReport: ...
    async def stop_broadcast(self, broadcast_id: str) -> BroadcastReport: ...
    async def close(self) -> None: ...


class AdminClient:
    """The admin API of one server (`url` is the server's root, e.g. http://127.0.0.1:8080)."""

    def __init__(self, url: str, token: str, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:  # made lazily, inside the console's event loop
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}/admin{path}"
        with _reaching(self.url, f"{method} {path} to"):
            async with self._http().request(method, url, json=body, timeout=self._timeout) as resp:
                payload = await _json_or_none(resp)
                if resp.status >= 400:
                    raise error_from_response(resp.status, payload, resp.reason or "")
                if not isinstance(payload, dict):
                    raise AdminError("server", f"{method} {path}: the server did not answer with a JSON object",
                                     resp.status)
                return payload

    async def snapshot(self) -> ConsoleSnapshot:
        metrics = await self._request("GET", "/metrics")  # connection and token problems surface here
        engine, broadcast, workers = await asyncio.gather(
            self._request("GET", "/engine"), self._request("GET", "/broadcast"), self._request("GET", "/workers"),
            return_exceptions=True)
        if isinstance(engine, BaseException):
            if not isinstance(engine, AdminError):
                raise engine
            engine = {**metrics.get("engine", {}), "note": f"engine details unavailable: {engine}"}
        if isinstance(broadcast, BaseException):
            if not isinstance(broadcast, AdminError):
                raise broadcast
            broadcast = {"available": False, "message": broadcast.message, "status": broadcast.status}
        if isinstance(workers, BaseException):
            if not isinstance(workers, AdminError):
                raise workers
            workers = {"available": False, "message": workers.message, "status": workers.status}
        return {"metrics": metrics, "engine": engine, "broadcast": broadcast, "workers": workers}

    async def avatars(self) -> AvatarCatalog:
        return await self._request("GET", "/avatars")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events from GET /admin/events until the stream ends; AdminError when it cannot be (re)opened."""
        timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT_S, sock_read=EVENTS_READ_TIMEOUT_S)
        with _reaching(self.url, "event stream from"):
            async with self._http().get(f"{self.url}/admin/events", timeout=timeout,
                                        headers={"Accept": "text/event-stream"}) as resp:
                if resp.status >= 400:
                    raise error_from_response(resp.status, await _json_or_none(resp), resp.reason or "")
                lines: list[str] = []
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line:
                        lines.append(line)
                        continue
                    event = parse_sse(lines)
                    lines = []
                    if event is not None:
                        yield event

    async def end_session(self, session_id: str) -> SessionEnded:
        return await self._request("DELETE", f"/sessions/{session_id}")

    async def set_conditions(self, session_id: str, avatar: str | None, emotion: str | None) -> ConditionsAnswer:
        return await self._request("POST", f"/sessions/{session_id}/conditions", {"avatar": avatar, "emotion": emotion})

    async def pause(self, session_id: str) -> PauseAnswer:
        return await self._request("POST", f"/sessions/{session_id}/pause")

    async def resume(self, session_id: str) -> PauseAnswer:
        return await self._request("POST", f"/sessions/{session_id}/resume")

    async def start_broadcast(self, to: str, session_id: str) -> BroadcastReport:
        """Livestream a live call to `to` (rtmp[s]://HOST/APP/KEY, or an HLS NAME.m3u8 / directory)."""
        return await self._request("POST", "/broadcast/start", {"to": to, "session_id": session_id})

    async def stop_broadcast(self, broadcast_id: str) -> BroadcastReport:
        return await self._request("POST", "/broadcast/stop", {"id": broadcast_id})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class FakeAdminClient:
    """Scripted snapshots and events for tests. Snapshots are served in order (an AdminError in the script
    is raised instead); then the last one repeats, or with `repeat_last=False` the next request never
    answers, which freezes the console on exactly the scripted history (for screenshots). Events are
    yielded, then the stream stays open and quiet. Actions are recorded in `calls`; `fail[name]` makes
    that action raise. Every answer has the shape the server's has (streaming/api_schema.py)."""

    url = "fake://avatarcast"

    def __init__(self, snapshots: Sequence[ConsoleSnapshot | AdminError], *,
                 avatars: AvatarCatalog | None = None, events: Sequence[dict[str, Any]] = (),
                 repeat_last: bool = True) -> None:
        if not snapshots:
            raise ValueError("FakeAdminClient needs at least one snapshot (or AdminError)")
        self.snapshots = list(snapshots)
        self.avatars_payload: AvatarCatalog = avatars or {
            "avatars": {"sketch": ["happy", "neutral", "sad", "surprised"]}, "default_avatar": "sketch"}
        self.scripted_events = list(events)
        self.repeat_last = repeat_last
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, AdminError] = {}
        self.started: dict[str, BroadcastReport] = {}
        self.polls = 0
        self.closed = False

    async def snapshot(self) -> ConsoleSnapshot:
        self.polls += 1
        if self.polls > len(self.snapshots) and not self.repeat_last:
            await asyncio.Event().wait()
        item = self.snapshots[min(self.polls, len(self.snapshots)) - 1]
        if isinstance(item, AdminError):
            raise item
        return copy.deepcopy(item)

    async def avatars(self) -> AvatarCatalog:
        return self._act("avatars", result=copy.deepcopy(self.avatars_payload))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        for event in self.scripted_events:
            yield copy.deepcopy(event)
        await asyncio.Event().wait()  # an open stream with nothing more to say

    def _act(self, name: str, *args: Any, result: Any) -> Any:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]
        return result

    def _broadcast(self, broadcast_id: str) -> BroadcastReport:
        """A broadcast this fake started, or one in its scripted snapshots; 404 like the server otherwise."""
        known = [*self.started.values(), *(b for snap in self.snapshots if not isinstance(snap, AdminError)
                                          for b in snap["broadcast"].get("broadcasts", []))]
        found = next((b for b in known if b["id"] == broadcast_id), None)
        if found is None:
            raise error_from_response(404, {"error": "unknown_broadcast", "message": f"no broadcast {broadcast_id!r}"})
        return copy.deepcopy(found)

    async def end_session(self, session_id: str) -> SessionEnded:
        return self._act("end_session", session_id,
                         result={"session_id": session_id, "ended": True, "reason": "admin", "frames_sent": 0})

    async def set_conditions(self, session_id: str, avatar: str | None, emotion: str | None) -> ConditionsAnswer:
        return self._act("set_conditions", session_id, avatar, emotion,
                         result={"session_id": session_id, "avatar": avatar or self.avatars_payload["default_avatar"],
                                 "emotion": emotion, "status": "applied", "applies": "now"})

    async def pause(self, session_id: str) -> PauseAnswer:
        return self._act("pause", session_id, result={"session_id": session_id, "paused": True})

    async def resume(self, session_id: str) -> PauseAnswer:
        return self._act("resume", session_id, result={"session_id": session_id, "paused": False})

    async def start_broadcast(self, to: str, session_id: str) -> BroadcastReport:
        bid = f"b{9 + len(self.started)}"
        report: BroadcastReport = {
            "id": bid, "source": {"type": "session", "session_id": session_id}, "created": time.time(),
            "target": to, "kind": "rtmp" if to.startswith("rtmp") else "hls", "state": "starting",
            "end_reason": None, "last_error": None, "frames_sent": 0, "seconds_sent": 0.0, "bitrate_kbps": 0.0,
            "video_bitrate_kbps": 2500, "reconnects": 0, "disconnects": 0, "buffered": 0}
        self.started[bid] = self._act("start_broadcast", to, session_id, result=report)
        return copy.deepcopy(report)

    async def stop_broadcast(self, broadcast_id: str) -> BroadcastReport:
        self._act("stop_broadcast", broadcast_id, result=None)
        return {**self._broadcast(broadcast_id), "state": "stopped", "end_reason": "stopped", "buffered": 0}

    async def close(self) -> None:
        self.closed = True
