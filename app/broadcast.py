"""`avatarcast broadcast`: an audio file or URL drives the avatar, live, to RTMP or HLS.

Checks the target and the audio first (clear errors before any model loads), then loads the models,
starts the engine, prepares the avatar, opens one realtime session and streams it: the audio at the
wall-clock pace, then idle frames until `--duration` or Ctrl-C (which finishes the stream cleanly; a
second Ctrl-C cuts it). `--loop` plays the audio again and again. A status line goes to stderr every
few seconds; the final state is printed as JSON. Exit status: 0 when the broadcast ended as asked,
1 when it failed (every reconnect attempt failed, the audio broke).
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from streaming.broadcast import Broadcaster, BroadcastOptions, parse_target
from streaming.broadcast_sources import AudioDriver, broadcast_audio, probe_audio

STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class BroadcastRequest:
    audio: str
    to: str
    avatar: Path | None = None  # portrait or `avatar new` folder; None: the built-in drawn avatar
    emotion: str | None = None
    duration_s: float | None = None
    loop: bool = False
    model: str = "tiny"
    video_bitrate_kbps: int = 2500
    max_attempts: int = 6


def status_line(snap: dict[str, Any]) -> str:
    return (f"avatarcast: {snap['state']} {snap['target']}: {snap['seconds_sent']:.0f} s sent, "
            f"{snap['bitrate_kbps']:.0f} kbit/s, {snap['reconnects']} reconnects"
            + (f", last error: {snap['last_error']}" if snap["last_error"] else ""))


def run_broadcast(req: BroadcastRequest, echo: Callable[[str], None] = print,
                  status: Callable[[str], None] = print) -> int:
    """Run one broadcast to its end; returns the exit status (0 done, 1 failed)."""
    options = BroadcastOptions(duration_s=req.duration_s, video_bitrate=req.video_bitrate_kbps * 1000,
                               max_attempts=req.max_attempts)
    target = parse_target(req.to)  # ValueError: a clear one-line message from the CLI
    if target.kind == "hls" and not Path(target.location).parent.exists():
        Path(target.location).parent.mkdir(parents=True)
    probe_audio(req.audio)  # AudioSourceError (a ValueError): missing, not audio, unreachable URL
    if req.avatar is not None and not req.avatar.exists():  # a portrait image or an `avatar new` folder
        raise FileNotFoundError(f"{req.avatar}: no such portrait file or avatar folder")

    from app.avatars import EngineBackend, prepare_avatars
    from app.render_worker import load_models
    from avatar.engine import AvatarEngine, preset_options

    models = load_models(req.model)
    engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder="auto", max_sessions=1))
    engine.start()
    try:
        avatars, default = prepare_avatars(engine, req.avatar)
        backend = EngineBackend(engine, avatars, default)
        if req.emotion is not None and req.emotion not in backend.catalog()[default]:
            raise ValueError(f"avatar {default!r} has no emotion {req.emotion!r}; "
                             f"available: {backend.catalog()[default]}")
        status(f"avatarcast: model {engine.models.name}, avatar {default!r}, broadcasting {req.audio} "
               f"to {target.display} (Ctrl-C to stop)")
        snap = asyncio.run(_broadcast(backend, default, req, target, options, status))
    finally:
        engine.stop()
    echo(json.dumps(snap, indent=2))
    return 1 if snap["state"] == "failed" else 0


async def _broadcast(backend, avatar: str, req: BroadcastRequest, target, options: BroadcastOptions,
                     status: Callable[[str], None]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    broadcaster = Broadcaster(target, options)
    session = backend.open(avatar, req.emotion)
    driver = AudioDriver(session, req.audio, loop_audio=req.loop)
    run = loop.create_task(broadcast_audio(broadcaster, session, driver))

    def interrupt() -> None:
        if broadcaster.stopping:  # the second Ctrl-C: cut the stream
            run.cancel()
        broadcaster.stop()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupt)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not a Unix loop
            pass
    try:
        while not run.done():
            await asyncio.wait({run}, timeout=STATUS_INTERVAL_S)
            if not run.done():
                status(status_line(broadcaster.snapshot()))
        try:
            return run.result()
        except asyncio.CancelledError:
            return broadcaster.snapshot()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
