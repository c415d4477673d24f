"""`avatarcast broadcast`: an audio file or URL drives the avatar, live, to RTMP or HLS.

Checks the target and the audio first (clear errors before any model loads), then loads the models,
starts the engine, prepares the avatar, opens one realtime session and streams it: the audio at the
wall-clock pace, then idle frames until `--duration` or Ctrl-C (which finishes the stream cleanly; a
second Ctrl-C cuts it). `--loop` plays the audio again and again. A status line goes to stderr every
few seconds; the final state is printed as JSON. Exit status: 0 when the broadcast ended as asked,
1 when it failed (every reconnect attempt failed, the audio broke).

A dialogue: `--audio A --audio B` drives a two-face avatar, A the left face and B the right (a source
that ends first leaves its face silent); one multi-channel source with `--speakers 2` drives face i
from channel i.
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
from streaming.broadcasts import audio_sources
from streaming.webrtc.dialogue import check_speakers
from streaming.webrtc.errors import LiveError

STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class BroadcastRequest:
    audio: str | tuple[str, ...]  # one source, or one per speaker (face i, left to right)
    to: str
    avatar: Path | None = None  # portrait or `avatar new` folder; None: the built-in drawn avatar
    emotion: str | None = None
    duration_s: float | None = None
    loop: bool = False
    model: str = "tiny"
    video_bitrate_kbps: int = 2500
    max_attempts: int = 6
    speakers: int | None = None  # None: one per source; more than one source's: its channels split

    def voices(self) -> tuple[list[str], int]:
        """(sources, speakers); ValueError for a combination that cannot work."""
        try:
            return audio_sources(list(self.audio) if isinstance(self.audio, tuple) else self.audio, self.speakers)
        except LiveError as exc:
            raise ValueError(exc.message.replace("'audio'", "--audio").replace("'speakers'", "--speakers")) from None


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
    sources, speakers = req.voices()
    for source in sources:  # AudioSourceError (a ValueError): missing, not audio, unreachable URL
        fmt = probe_audio(source)
        if len(sources) < speakers and fmt.channels != speakers:
            raise ValueError(f"{source}: it has {fmt.channels} channel{'s' if fmt.channels != 1 else ''}; "
                             f"--speakers {speakers} from one source needs one channel per speaker "
                             "(or give --audio once per speaker)")
    if req.avatar is not None and not req.avatar.exists():  # a portrait image or an `avatar new` folder
        raise FileNotFoundError(f"{req.avatar}: no such portrait file or avatar folder")

    from app.render_worker import load_models
    from app.workers.scenes import scene_backend
    from avatar.engine import AvatarEngine, preset_options

    models = load_models(req.model)
    engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder="auto", max_sessions=1))
    engine.start()
    backend = None
    try:
        backend = scene_backend(engine, req.avatar)
        default = backend.default_avatar
        faces = backend.faces()
        if req.avatar is None and speakers > faces.get(default, 1):  # a dialogue on the built-in pair
            default = next((name for name, n in sorted(faces.items()) if n >= speakers), default)
        try:
            check_speakers(default, speakers, faces)
        except LiveError as exc:
            raise ValueError(exc.message) from None
        if req.emotion is not None and req.emotion not in backend.catalog()[default]:
            raise ValueError(f"avatar {default!r} has no emotion {req.emotion!r}; "
                             f"available: {backend.catalog()[default]}")
        status(f"avatarcast: model {engine.models.name}, avatar {default!r}, broadcasting {' + '.join(sources)} "
               f"to {target.display} (Ctrl-C to stop)")
        warning = backend.avatar_warnings().get(default)  # e.g. a photo given to the drawn-face demo model
        if warning:
            status(f"avatarcast: warning: avatar {default!r}: {warning}")
        snap = asyncio.run(_broadcast(backend, default, req, target, options, status))
    finally:
        if backend is not None:
            backend.stop()
        engine.stop()
    echo(json.dumps(snap, indent=2))
    return 1 if snap["state"] == "failed" else 0


async def _broadcast(backend, avatar: str, req: BroadcastRequest, target, options: BroadcastOptions,
                     status: Callable[[str], None]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    broadcaster = Broadcaster(target, options)
    sources, speakers = req.voices()
    session = backend.open(avatar, req.emotion) if speakers == 1 else backend.open(avatar, req.emotion, speakers)
    voices = [(i,) for i in range(speakers)] if len(sources) > 1 else [tuple(range(speakers))]
    drivers = [AudioDriver(session, source, loop_audio=req.loop, speakers=who) for source, who in zip(sources, voices)]
    run = loop.create_task(broadcast_audio(broadcaster, session, drivers))

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
