"""`avatarcast serve`: the aiohttp application (page, signaling, health, metrics, admin) and its startup.

Public routes:
    GET  /                      the page (app/web/index.html; assets under /static/)
    GET  /config                what the page needs: avatars, their emotions and faces, codecs, modes, upload limit,
                                ICE servers
    GET  /media                 the audio files of the media folder a two-person call may take as its second voice
    POST /offer                 {sdp, type: "offer", avatar?, emotion?, mode?, codec?, speakers?, second_voice?,
                                stereo_split?} -> {sdp, type, session_id, ...}
    GET  /sessions/{id}         that call's own live stats (the id is an unguessable capability); once the
                                call has ended, 410 with why (what the page shows)
    POST /sessions/{id}/conditions  {avatar?, emotion?}: the page's pickers during a call (the admin API's rule)
    POST /sessions/{id}/bye     end that call
    GET  /healthz               liveness + capacity + each engine worker (503 when no worker is ready)
    GET  /metrics               Prometheus text (calls, stages, latency, each worker, event-loop stalls)
Admin routes (bearer token) are in app/admin.py. Every error is JSON: {"error": code, "message": text};
a full server answers 503 with Retry-After. Answers are typed in streaming/api_schema.py.

`avatarcast serve` runs this app as the gateway: its event loop moves bytes (signaling, media, admin)
while the engine runs in worker processes (app/workers: `--workers N`, default 1) or Ray actors
(`--workers ray`); `--workers 0` keeps the engine in this process.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable, Protocol, runtime_checkable

from aiohttp import web
from aiortc import RTCIceServer

from app.admin import create_admin_app
from app.http_common import change_conditions, json_error, optional_str, read_json
from app.settings import Settings
from app.workers.metrics import WorkerMetrics
from streaming.api_schema import CallEnd, Health
from streaming.broadcasts import BroadcastManager
from streaming.loop_lag import LoopLagSampler
from streaming.metrics import LiveMetrics
from streaming.pacer import PacerOptions
from streaming.source_policy import SourcePolicy
from streaming.webrtc.dialogue import list_media
from streaming.webrtc.peer import MODES, VIDEO_CODECS, LiveError, Offer, PeerOptions
from streaming.webrtc.service import LiveService, ServiceBackend, ServiceOptions

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
SERVICE = web.AppKey("service", LiveService)
SETTINGS = web.AppKey("settings", Settings)
LOOP_LAG = web.AppKey("loop_lag", LoopLagSampler)
RETRY_AFTER_S = 5  # a full server: calls end and workers restart within seconds
END_REASONS = {"admin": "an operator ended the call", "server_shutdown": "the server is shutting down",
               "idle_timeout": "no sound from the microphone reached the server for too long",
               "connect_timeout": "the connection could not be set up in time",
               "peer_failed": "the connection failed", "session_ended": "the avatar stopped"}

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
                 429: "too_many_requests", 501: "not_implemented", 503: "unavailable"}


@web.middleware
async def json_errors(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every 4xx/5xx leaves as JSON, including aiohttp's own (404 route, 405, 413 body too large)."""
    try:
        return await handler(request)
    except LiveError as exc:
        retry = exc.retry_after_s or (RETRY_AFTER_S if exc.status == 503 and exc.code == "at_capacity" else None)
        return json_error(exc.status, exc.code, exc.message,
                          None if retry is None else {"Retry-After": str(max(1, round(retry)))})
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")}
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return json_error(exc.status, _STATUS_CODES.get(exc.status, "http_error"), message, headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal_error", "the server failed to handle this request; see its log")


# ---- public handlers ----------------------------------------------------------------------------------
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def config(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    backend = service.backend
    return web.json_response({
        "avatars": backend.catalog(), "faces": backend.faces(), "avatar_warnings": backend.avatar_warnings(),
        "default_avatar": backend.default_avatar,
        "codecs": list(VIDEO_CODECS), "default_codec": settings.video_codec, "modes": list(MODES),
        "upload_limit_bytes": settings.upload_limit_bytes,
        "ice_servers": [s.as_dict() for s in settings.ice_servers],
    })


async def offer(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    body = await read_json(request, settings.max_body_bytes)
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise LiveError(400, "missing_sdp", "the body needs 'sdp': the browser's offer SDP (a string)")
    if body.get("type") != "offer":
        raise LiveError(400, "bad_type", f"'type' must be 'offer', not {body.get('type')!r}")
    request_offer = Offer(
        sdp=sdp,
        avatar=optional_str(body, "avatar") or service.backend.default_avatar,
        emotion=optional_str(body, "emotion"),
        mode=optional_str(body, "mode") or "voice",
        codec=(optional_str(body, "codec") or settings.video_codec).lower(),
        speakers=_speakers(body),
        second_voice=optional_str(body, "second_voice"),
        stereo_split=_flag(body, "stereo_split"),
    )
    return web.json_response(await service.offer(request_offer, client=request.remote or "unknown"))


def _speakers(body: dict) -> int:
    value = body.get("speakers", 1)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LiveError(400, "bad_field", f"'speakers' must be a positive integer (2: a two-person call), not {value!r}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise LiveError(400, "bad_field", f"{key!r} must be true or false")
    return value


async def media(request: web.Request) -> web.Response:
    """The files a two-person call may take as its second voice (none without a media folder)."""
    sources = request.app[SERVICE].options.peer.sources
    files = await asyncio.get_running_loop().run_in_executor(None, list_media, sources)
    return web.json_response({"files": files})


async def session_stats(request: web.Request) -> web.Response:
    service, sid = request.app[SERVICE], request.match_info["session_id"]
    if sid not in service.peers and sid in service.ended:  # the page learns why its call ended
        end: CallEnd = service.ended[sid]
        message = end["error"] or END_REASONS.get(end["reason"], f"the call ended ({end['reason']})")
        return web.json_response({"error": "session_ended", "message": message, "session_id": sid,
                                  "reason": end["reason"]}, status=410)
    return web.json_response(service.get(sid).snapshot())


async def session_conditions(request: web.Request) -> web.Response:
    """The page's own avatar/emotion pickers during a call: the same route and rule as the admin API's."""
    return await change_conditions(request, request.app[SERVICE], request.app[SETTINGS].max_body_bytes)


async def bye(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE].end(request.match_info["session_id"], "bye"))


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    workers = service.backend.workers()
    ready = sum(w["state"] == "ready" for w in workers)
    health: Health = {
        "status": "ok" if ready == len(workers) else "degraded" if ready else "down",
        "sessions": len(service.peers), "max_sessions": service.options.max_sessions,
        "workers": [{"id": w["id"], "state": w["state"], "sessions": w["sessions"], "fps": w["fps"],
                     "block_ms": w["block_ms"], "restarts": w["restarts"]} for w in workers],
    }
    return web.json_response(health, status=200 if ready else 503)


async def metrics_text(request: web.Request) -> web.Response:
    m = request.app[SERVICE].metrics
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


# ---- the application ----------------------------------------------------------------------------------
def service_options(settings: Settings, pacer: PacerOptions | None = None, workers: int = 1) -> ServiceOptions:
    """Calls: `settings.max_sessions` per engine worker."""
    ice = tuple(RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
                for s in settings.ice_servers)
    peer = PeerOptions(ice_servers=ice, idle_timeout_s=settings.idle_timeout_s,
                       connect_timeout_s=settings.connect_timeout_s, pacer=pacer or PacerOptions(),
                       max_call_s=settings.max_call_s, host_candidates=settings.candidate_hosts(),
                       sources=source_policy(settings))
    return ServiceOptions(max_sessions=settings.max_sessions * workers, peer=peer,
                          calls_per_client=settings.calls_per_client, offers_per_minute=settings.offers_per_minute,
                          conditions_per_minute=settings.conditions_per_minute, retry_after_s=RETRY_AFTER_S)


def source_policy(settings: Settings) -> SourcePolicy:
    """What the server may read audio from: its media folder, and URLs as the settings allow."""
    return SourcePolicy(media_dir=Path(settings.media_dir) if settings.media_dir else None, urls=settings.audio_urls)


@runtime_checkable
class ManagedBackend(Protocol):
    """A backend the app starts and stops itself (app/workers WorkerPool); an in-process engine is run by
    its owner."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def create_app(settings: Settings, backend: ServiceBackend, *, metrics: LiveMetrics | None = None,
               options: ServiceOptions | None = None) -> web.Application:
    """The whole HTTP surface over one `LiveService`. A `ManagedBackend` (the worker pool) starts with the
    app (its first worker ready before the port opens) and stops after the calls; any other backend's
    engine must be running."""
    service = LiveService(backend, options or service_options(settings), metrics)
    service.metrics.registry.register(WorkerMetrics(backend))
    loop_lag = LoopLagSampler(registry=service.metrics.registry)
    sources = source_policy(settings)  # what the admin API may broadcast
    broadcasts = BroadcastManager(service, Path(settings.hls_dir), sources=sources)
    app = web.Application(middlewares=[json_errors], client_max_size=settings.max_body_bytes)
    app[SERVICE], app[SETTINGS], app[LOOP_LAG] = service, settings, loop_lag
    app.router.add_get("/", index)
    app.router.add_static("/static/", WEB_DIR, show_index=False)
    app.router.add_get("/config", config)
    app.router.add_get("/media", media)
    app.router.add_post("/offer", offer)
    app.router.add_get("/sessions/{session_id}", session_stats)
    app.router.add_post("/sessions/{session_id}/conditions", session_conditions)
    app.router.add_post("/sessions/{session_id}/bye", bye)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_text)
    app.add_subapp("/admin", create_admin_app(service, settings.admin_token, broadcasts,
                                              max_body_bytes=settings.max_body_bytes))

    async def on_startup(_: web.Application) -> None:
        if isinstance(backend, ManagedBackend):
            await backend.start()
        loop_lag.start()
        await service.start()

    async def on_shutdown(_: web.Application) -> None:
        await broadcasts.shutdown()  # finish the livestreams while their sources still run
        service.events.close()  # ends the SSE streams
        await service.shutdown()

    async def on_cleanup(_: web.Application) -> None:
        await loop_lag.stop()
        if isinstance(backend, ManagedBackend):
            await backend.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


# ---- `avatarcast serve` -------------------------------------------------------------------------------
def load_models(name: str | None = None):
    """The models the live service runs: the embedded demo model when its weights are in the tree,
    random TINY weights otherwise (or when asked for by name)."""
    from app.render_worker import load_models as by_name

    return by_name(name or "auto")


def run_server(settings: Settings, echo: Callable[[str], None] = print) -> None:
    """Serve until interrupted: the gateway with its engine workers (or the engine in this process with
    `workers` "0"), then free everything."""
    if settings.workers == "0":
        return _run_in_process(settings, echo)
    from app.workers.pool import worker_pool

    pool = worker_pool(settings)
    app = create_app(settings, pool, options=service_options(settings, workers=pool.options.workers))

    async def announce(_: web.Application) -> None:  # after the pool's startup: its first worker said hello
        w = pool.info
        n, kind = pool.options.workers, "Ray actor" if pool.options.backend == "ray" else "process"
        echo(f"avatarcast: {n} engine worker{'s' if n > 1 else ''} ({kind}{'es' if n > 1 and kind == 'process' else ''}"
             f"{'s' if n > 1 and kind != 'process' else ''}), model {w.get('model')} ({w.get('decoder')} decoder), "
             f"avatars {sorted(pool.catalog())}, up to {settings.max_sessions} sessions each")
        _announce_warnings(pool.avatar_warnings(), echo)
        _announce_address(settings, echo)

    app.on_startup.append(announce)
    web.run_app(app, host=settings.host, port=settings.port, print=None)


def _run_in_process(settings: Settings, echo: Callable[[str], None]) -> None:
    from app.workers.scenes import scene_backend
    from avatar.engine import AvatarEngine, preset_options

    models = load_models(settings.model)
    engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder="auto",
                                                 max_sessions=settings.max_sessions,
                                                 threads=settings.compute_threads()))
    engine.start()
    backend = None
    try:
        backend = scene_backend(engine, Path(settings.avatar) if settings.avatar else None,
                                options=settings.session_options())
        app = create_app(settings, backend)
        echo(f"avatarcast: model {engine.models.name} in this process ({engine.decoder_provider} decoder, "
             f"{settings.compute_threads()} compute threads), "
             f"avatars {sorted(backend.catalog())}, up to {settings.max_sessions} sessions")
        _announce_warnings(backend.avatar_warnings(), echo)
        _announce_address(settings, echo)
        web.run_app(app, host=settings.host, port=settings.port, print=None)
    finally:
        if backend is not None:
            backend.stop()
        engine.stop()


def _announce_warnings(warnings: dict[str, str], echo: Callable[[str], None]) -> None:
    """Avatars the model will draw badly (a photo given to the demo model): said at start, and on the page."""
    for name, warning in sorted(warnings.items()):
        echo(f"avatarcast: warning: avatar {name!r}: {warning}")


def _announce_address(settings: Settings, echo: Callable[[str], None]) -> None:
    echo(f"avatarcast: open http://{settings.host}:{settings.port}/")
    if settings.admin_token_generated:
        echo(f"avatarcast: admin token (set AVATARCAST_ADMIN_TOKEN to choose one): {settings.admin_token}")
