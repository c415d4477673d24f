"""The console's only way to the server: the admin API over HTTP with a bearer token.

`AdminClient.snapshot()` gathers what one refresh of the console shows, as plain JSON data:

    {"metrics":   GET /admin/metrics   (sessions, uptime, engine summary),
     "engine":    GET /admin/engine    (model, device, decoder provider, real-time factor, memory;
                                        the summary in metrics when the server has no such route),
     "broadcast": GET /admin/broadcast ({"broadcasts": [...], "max_broadcasts": n}, or
                                        {"available": False, "message": ...} where it answers 501)}

Every failure becomes an `AdminError` whose `kind` tells the console what to say and whether retrying
can help: "connection" (refused, reset, timed out), "auth" (401), "forbidden" (403), "not_available"
(501), "server" (other 5xx), "request" (other 4xx). `FakeAdminClient` plays scripted snapshots and
events for tests and records the actions it is asked for.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any, AsyncIterator, Protocol, Sequence

import aiohttp

REQUEST_TIMEOUT_S = 5.0
EVENTS_READ_TIMEOUT_S = 45.0  # the server sends a keep-alive every 15 s; three missed means it is gone


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


class Admin(Protocol):
    """What the console needs from the server (AdminClient, or FakeAdminClient in tests)."""

    url: str

    async def snapshot(self) -> dict[str, Any]: ...
    async def avatars(self) -> dict[str, Any]: ...
    def events(self) -> AsyncIterator[dict[str, Any]]: ...
    async def end_session(self, session_id: str) -> dict[str, Any]: ...
    async def set_conditions(self, session_id: str, avatar: str | None, emotion: str | None) -> dict[str, Any]: ...
    async def pause(self, session_id: str) -> dict[str, Any]: ...
    async def resume(self, session_id: str) -> dict[str, Any]: ...
    async def start_broadcast(self, to: str, session_id: str) -> dict[str, Any]: ...
    async def stop_broadcast(self, broadcast_id: str) -> dict[str, Any]: ...
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

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.url}/admin{path}"
        try:
            async with self._http().request(method, url, json=body, timeout=self._timeout) as resp:
                try:
                    payload = await resp.json(content_type=None)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    payload = None
                if resp.status >= 400:
                    raise error_from_response(resp.status, payload, resp.reason or "")
                if not isinstance(payload, dict):
                    raise AdminError("server", f"{method} {path}: the server did not answer with a JSON object",
                                     resp.status)
                return payload
        except aiohttp.ClientConnectorError as exc:
            raise AdminError("connection", f"cannot connect to {self.url}: {_why(exc)}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            what = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
            raise AdminError("connection", f"{method} {path} to {self.url}: {what}") from None

    async def snapshot(self) -> dict[str, Any]:
        metrics = await self._request("GET", "/metrics")  # connection and token problems surface here
        engine, broadcast = await asyncio.gather(self._request("GET", "/engine"), self._request("GET", "/broadcast"),
                                                 return_exceptions=True)
        if isinstance(engine, BaseException):
            if not isinstance(engine, AdminError):
                raise engine
            engine = {**metrics.get("engine", {}), "note": f"engine details unavailable: {engine}"}
        if isinstance(broadcast, BaseException):
            if not isinstance(broadcast, AdminError):
                raise broadcast
            broadcast = {"available": False, "message": broadcast.message, "status": broadcast.status}
        return {"metrics": metrics, "engine": engine, "broadcast": broadcast}

    async def avatars(self) -> dict[str, Any]:
        return await self._request("GET", "/avatars")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events from GET /admin/events until the stream ends; AdminError when it cannot be (re)opened."""
        timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT_S, sock_read=EVENTS_READ_TIMEOUT_S)
        try:
            async with self._http().get(f"{self.url}/admin/events", timeout=timeout,
                                        headers={"Accept": "text/event-stream"}) as resp:
                if resp.status >= 400:
                    try:
                        payload = await resp.json(content_type=None)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        payload = None
                    raise error_from_response(resp.status, payload, resp.reason or "")
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
        except aiohttp.ClientConnectorError as exc:
            raise AdminError("connection", f"cannot connect to {self.url}: {_why(exc)}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            what = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
            raise AdminError("connection", f"event stream from {self.url}: {what}") from None

    async def end_session(self, session_id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/sessions/{session_id}")

    async def set_conditions(self, session_id: str, avatar: str | None, emotion: str | None) -> dict[str, Any]:
        return await self._request("POST", f"/sessions/{session_id}/conditions", {"avatar": avatar, "emotion": emotion})

    async def pause(self, session_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/sessions/{session_id}/pause")

    async def resume(self, session_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/sessions/{session_id}/resume")

    async def start_broadcast(self, to: str, session_id: str) -> dict[str, Any]:
        """Livestream a live call to `to` (rtmp[s]://HOST/APP/KEY, or an HLS NAME.m3u8 / directory)."""
        return await self._request("POST", "/broadcast/start", {"to": to, "session_id": session_id})

    async def stop_broadcast(self, broadcast_id: str) -> dict[str, Any]:
        return await self._request("POST", "/broadcast/stop", {"id": broadcast_id})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class FakeAdminClient:
    """Scripted snapshots and events for tests. Snapshots are served in order (an AdminError in the script
    is raised instead); then the last one repeats, or with `repeat_last=False` the next request never
    answers, which freezes the console on exactly the scripted history (for screenshots). Events are
    yielded, then the stream stays open and quiet. Actions are recorded in `calls`; `fail[name]` makes
    that action raise."""

    url = "fake://avatarcast"

    def __init__(self, snapshots: Sequence[dict[str, Any] | AdminError], *,
                 avatars: dict[str, Any] | None = None, events: Sequence[dict[str, Any]] = (),
                 repeat_last: bool = True) -> None:
        if not snapshots:
            raise ValueError("FakeAdminClient needs at least one snapshot (or AdminError)")
        self.snapshots = list(snapshots)
        self.avatars_payload = avatars or {"avatars": {"sketch": ["happy", "neutral", "sad", "surprised"]},
                                           "default_avatar": "sketch"}
        self.scripted_events = list(events)
        self.repeat_last = repeat_last
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, AdminError] = {}
        self.polls = 0
        self.closed = False

    async def snapshot(self) -> dict[str, Any]:
        self.polls += 1
        if self.polls > len(self.snapshots) and not self.repeat_last:
            await asyncio.Event().wait()
        item = self.snapshots[min(self.polls, len(self.snapshots)) - 1]
        if isinstance(item, AdminError):
            raise item
        return copy.deepcopy(item)

    async def avatars(self) -> dict[str, Any]:
        return self._act("avatars", result=copy.deepcopy(self.avatars_payload))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        for event in self.scripted_events:
            yield copy.deepcopy(event)
        await asyncio.Event().wait()  # an open stream with nothing more to say

    def _act(self, name: str, *args: Any, result: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]
        return result

    async def end_session(self, session_id: str) -> dict[str, Any]:
        return self._act("end_session", session_id,
                         result={"session_id": session_id, "ended": True, "reason": "admin"})

    async def set_conditions(self, session_id: str, avatar: str | None, emotion: str | None) -> dict[str, Any]:
        return self._act("set_conditions", session_id, avatar, emotion,
                         result={"session_id": session_id, "avatar": avatar, "emotion": emotion,
                                 "status": "applied", "applies": "now"})

    async def pause(self, session_id: str) -> dict[str, Any]:
        return self._act("pause", session_id, result={"session_id": session_id, "paused": True})

    async def resume(self, session_id: str) -> dict[str, Any]:
        return self._act("resume", session_id, result={"session_id": session_id, "paused": False})

    async def start_broadcast(self, to: str, session_id: str) -> dict[str, Any]:
        return self._act("start_broadcast", to, session_id,
                         result={"id": "b9", "target": to, "state": "starting",
                                 "source": {"type": "session", "session_id": session_id}})

    async def stop_broadcast(self, broadcast_id: str) -> dict[str, Any]:
        return self._act("stop_broadcast", broadcast_id, result={"id": broadcast_id, "state": "stopped"})

    async def close(self) -> None:
        self.closed = True
