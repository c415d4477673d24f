"""The admin API under /admin: every route needs `Authorization: Bearer <token>`.

    GET    /admin/sessions                    every live call (state, avatar, emotion, fps, latency, pacer, engine)
    GET    /admin/sessions/{id}               one call
    DELETE /admin/sessions/{id}               end it (also POST /admin/sessions/{id}/end)
    POST   /admin/sessions/{id}/conditions    {avatar?, emotion?}: stored now, applied at the next pause in the
                                              avatar's speech (an engine session's conditions are fixed, so the
                                              call moves to a new session; 202 while pending); the page's
                                              route and rule (`LiveService.set_conditions`)
    POST   /admin/sessions/{id}/pause         stop listening: mic audio dropped, queued speech cut, avatar idles
    POST   /admin/sessions/{id}/resume
    GET    /admin/metrics                     snapshot: calls, engine (per-session frames, per-stage timings,
                                              latency budget), subscribers
    GET    /admin/workers                     the engine workers: id, pid, host (a Ray actor: its node), state
                                              (starting | ready | dead), sessions, restarts
    GET    /admin/avatars                     avatars and their emotions
    GET    /admin/events                      server-sent events: hello (snapshot), session_opened/connected/
                                              closed, conditions_*, session_paused/resumed, segment_end, stats
    GET    /admin/broadcast                   livestreams: target (stream key masked), state, frames, bitrate,
                                              reconnects, last error (running and recently finished)
    POST   /admin/broadcast/start             {to: rtmp[s]://HOST/APP/KEY | NAME.m3u8 | DIR (HLS, under the
                                              server's HLS directory), session_id: a live call, or audio: a file
                                              path or http(s) URL (+ avatar?, emotion?, loop?), duration_s?,
                                              video_bitrate_kbps?} -> 201 with the broadcast
    POST   /admin/broadcast/stop              {id}: finish the stream cleanly -> its final state
Bodies are read by the page's reader (app/http_common.py, the server's size limit); answers are typed in
streaming/api_schema.py.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
from typing import Any, Awaitable, Callable

from aiohttp import web

from app.http_common import change_conditions, json_error, read_json
from streaming.api_schema import EngineInfo, Memory, WorkerList
from streaming.broadcasts import BroadcastManager
from streaming.events import SHUTDOWN
from streaming.webrtc.peer import LiveError
from streaming.webrtc.service import LiveService

ADMIN_SERVICE = web.AppKey("admin_service", LiveService)
ADMIN_BROADCASTS = web.AppKey("admin_broadcasts", BroadcastManager)
ADMIN_BODY_LIMIT = web.AppKey("admin_body_limit", int)
SSE_KEEPALIVE_S = 15.0
_AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="avatarcast-admin"'}


def _unauthorized(code: str, message: str) -> web.Response:
    return json_error(401, code, message, _AUTH_HEADERS)


def bearer_auth(token: str) -> Callable:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _unauthorized("missing_token", "the admin API needs 'Authorization: Bearer <token>' "
                                                  "(printed at start, or AVATARCAST_ADMIN_TOKEN)")
        # headers arrive decoded with surrogate escapes: bytes that are not UTF-8 compare as themselves
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), expected):
            return _unauthorized("invalid_token", "the admin token is wrong")
        return await handler(request)

    return check


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json(request, request.app[ADMIN_BODY_LIMIT], empty_ok=True)


def _sid(request: web.Request) -> str:
    return request.match_info["session_id"]


async def list_sessions(request: web.Request) -> web.Response:
    return web.json_response({"sessions": request.app[ADMIN_SERVICE].sessions()})


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(request.app[ADMIN_SERVICE].get(_sid(request)).snapshot())


async def end_session(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ADMIN_SERVICE].end(_sid(request), "admin"))


async def set_conditions(request: web.Request) -> web.Response:
    return await change_conditions(request, request.app[ADMIN_SERVICE], request.app[ADMIN_BODY_LIMIT])


async def pause(request: web.Request) -> web.Response:
    peer = request.app[ADMIN_SERVICE].get(_sid(request))
    peer.pause()
    return web.json_response({"session_id": peer.id, "paused": True})


async def resume(request: web.Request) -> web.Response:
    peer = request.app[ADMIN_SERVICE].get(_sid(request))
    peer.resume()
    return web.json_response({"session_id": peer.id, "paused": False})


async def metrics_snapshot(request: web.Request) -> web.Response:
    return web.json_response(request.app[ADMIN_SERVICE].snapshot())


def _memory() -> Memory:
    """This process's RSS; CUDA memory when the engine uses CUDA."""
    memory: Memory = {"rss_bytes": None}
    try:
        with open("/proc/self/statm") as f:
            memory["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass  # not Linux: RSS unknown
    torch = sys.modules.get("torch")  # never imported here: only asked when the engine already loaded it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        memory.update(cuda_allocated_bytes=torch.cuda.memory_allocated(),
                      cuda_reserved_bytes=torch.cuda.memory_reserved())
    return memory


async def engine_info(request: web.Request) -> web.Response:
    """GET /admin/engine: the engine at a glance (for `avatarcast console`): model, checkpoint, mode, device,
    decoder provider in use, real-time factor (compute per block / audio per block; None before any block)
    and memory. Per-session detail: /metrics."""
    backend = request.app[ADMIN_SERVICE].backend
    snap = backend.snapshot()
    budget = snap["latency_budget"]
    compute_ms = budget["features_ms"] + budget["denoise_ms"] + budget["decode_ms"]
    info: EngineInfo = {
        "model": snap["model"], "checkpoint": backend.checkpoint, "mode": snap["mode"], "device": snap["device"],
        "decoder": snap["decoder"], "warmup_ms": snap["warmup_ms"], "failures": snap["failures"],
        "latency_budget": budget, "sessions": len(snap["sessions"]),
        "rtf": round(compute_ms / budget["block_ms"], 3) if compute_ms and budget["block_ms"] else None,
        "memory": _memory(),
    }
    return web.json_response(info)


async def workers(request: web.Request) -> web.Response:
    answer: WorkerList = {"workers": [
        {"id": w["id"], "pid": w["pid"], "host": w["host"], "state": w["state"], "sessions": w["sessions"],
         "restarts": w["restarts"]} for w in request.app[ADMIN_SERVICE].backend.workers()]}
    return web.json_response(answer)


async def avatars(request: web.Request) -> web.Response:
    backend = request.app[ADMIN_SERVICE].backend
    return web.json_response({"avatars": backend.catalog(), "default_avatar": backend.default_avatar})


def _broadcasts(request: web.Request) -> BroadcastManager:
    manager = request.app.get(ADMIN_BROADCASTS)
    if manager is None:
        raise LiveError(501, "not_available", "broadcasting is not configured on this server")
    return manager


async def list_broadcasts(request: web.Request) -> web.Response:
    manager = _broadcasts(request)
    return web.json_response({"broadcasts": manager.list(), "max_broadcasts": manager.max_broadcasts})


async def start_broadcast(request: web.Request) -> web.Response:
    manager = _broadcasts(request)
    return web.json_response(await manager.start(await _body(request)), status=201)


async def stop_broadcast(request: web.Request) -> web.Response:
    manager = _broadcasts(request)
    body = await _body(request)
    if "id" not in body:
        raise LiveError(400, "missing_id", "give 'id': the broadcast to stop (GET /admin/broadcast lists them)")
    return web.json_response(await manager.stop(body["id"]))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a `hello` with the current snapshot, then every service event as it happens."""
    service = request.app[ADMIN_SERVICE]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)

    async def send(event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":"))
        await resp.write(f"id: {event.get('id', 0)}\nevent: {event['type']}\ndata: {data}\n\n".encode())

    with service.events.subscribe() as sub:
        try:
            await send({"id": 0, "type": "hello", "snapshot": service.snapshot()})
            while True:
                event = await sub.get(timeout=SSE_KEEPALIVE_S)
                if event is None:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await send(event)
                if event["type"] == SHUTDOWN:
                    break
        except ConnectionResetError:  # the console went away
            return resp
    return resp


def create_admin_app(service: LiveService, token: str, broadcasts: BroadcastManager | None = None, *,
                     max_body_bytes: int) -> web.Application:
    admin = web.Application(middlewares=[bearer_auth(token)])
    admin[ADMIN_SERVICE], admin[ADMIN_BODY_LIMIT] = service, max_body_bytes
    if broadcasts is not None:
        admin[ADMIN_BROADCASTS] = broadcasts
    r = admin.router
    r.add_get("/sessions", list_sessions)
    r.add_get("/sessions/{session_id}", get_session)
    r.add_delete("/sessions/{session_id}", end_session)
    r.add_post("/sessions/{session_id}/end", end_session)
    r.add_post("/sessions/{session_id}/conditions", set_conditions)
    r.add_post("/sessions/{session_id}/pause", pause)
    r.add_post("/sessions/{session_id}/resume", resume)
    r.add_get("/metrics", metrics_snapshot)
    r.add_get("/engine", engine_info)
    r.add_get("/workers", workers)
    r.add_get("/avatars", avatars)
    r.add_get("/events", events)
    r.add_get("/broadcast", list_broadcasts)
    r.add_post("/broadcast/start", start_broadcast)
    r.add_post("/broadcast/stop", stop_broadcast)
    return admin
