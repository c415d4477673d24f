"""The server's livestreams: start a broadcast of a live call or of an audio file/URL, stop it, list them.

The admin API (app/admin.py) calls this; requests that cannot be served raise `LiveError` with a
stable code before any resource is taken. A broadcast of a live call streams what its WebRTC tracks
send (`pacer_frames`) and ends when the call ends; a broadcast of audio opens its own realtime engine
session (it counts against the engine's capacity) and runs until stopped, `duration_s`, or failure.
HLS output goes only under `hls_root`; audio only from what `sources` allows (its media folder, and
http(s) URLs when enabled: streaming/source_policy.py). State changes are published as `broadcast_started`,
`broadcast_state` and `broadcast_ended` events.

A dialogue broadcast drives a two-face (or more) avatar with one voice per face: `audio` is a list of
sources (source i drives face i, faces left to right), or one multi-channel source with `speakers`
(channel i drives face i). Every source passes the same policy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streaming.broadcast import Broadcaster, BroadcastOptions, Target, parse_target
from streaming.broadcast_sources import AudioDriver, AudioSourceError, broadcast_audio, pacer_frames, probe_audio
from streaming.source_policy import SourcePolicy
from streaming.webrtc.errors import CapacityError, LiveError
from streaming.webrtc.service import LiveService

log = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # how long stop() waits for the stream to be finished (trailer, last HLS segment)


@dataclass
class BroadcastEntry:
    id: str
    broadcaster: Broadcaster
    source: dict[str, Any]  # what is streamed: {"type": "session", ...} or {"type": "audio", ...}
    created: float
    task: asyncio.Task | None = None
    drivers: list[AudioDriver] = field(default_factory=list)
    session: Any = None  # the engine session an audio broadcast opened (closed when it ends)

    @property
    def active(self) -> bool:
        return self.task is None or not self.task.done()

    def snapshot(self) -> dict[str, Any]:
        snap = {"id": self.id, "source": self.source, "created": self.created, **self.broadcaster.snapshot()}
        voices = [{"pushed_s": round(d.pushed_s, 2), "silence_s": round(d.silence_s, 2), "plays": d.plays}
                  for d in self.drivers]
        if voices:
            snap["audio"] = voices[0]
        if len(voices) > 1:
            snap["voices"] = voices  # one per speaker of a dialogue
        return snap


class BroadcastManager:
    def __init__(self, service: LiveService, hls_root: Path, *, max_broadcasts: int = 2,
                 options: BroadcastOptions = BroadcastOptions(), keep_finished: int = 10,
                 sources: SourcePolicy = SourcePolicy()) -> None:
        self.service, self.hls_root, self.sources = service, Path(hls_root), sources
        self.max_broadcasts, self.options = max_broadcasts, options
        self.entries: dict[str, BroadcastEntry] = {}
        self._finished: deque[str] = deque()
        self._keep_finished = keep_finished
        self._ids = itertools.count(1)

    # ---- requests -----------------------------------------------------------------------------------------
    def _options(self, body: dict[str, Any]) -> BroadcastOptions:
        changes: dict[str, Any] = {}
        duration = body.get("duration_s")
        if duration is not None:
            if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
                raise LiveError(400, "bad_field", "'duration_s' must be a positive number of seconds")
            changes["duration_s"] = float(duration)
        kbps = body.get("video_bitrate_kbps")
        if kbps is not None:
            if isinstance(kbps, bool) or not isinstance(kbps, int) or not 100 <= kbps <= 50_000:
                raise LiveError(400, "bad_field", "'video_bitrate_kbps' must be an integer in 100..50000")
            changes["video_bitrate"] = kbps * 1000
        return replace(self.options, **changes)

    def _target(self, body: dict[str, Any]) -> Target:
        to = body.get("to")
        if not isinstance(to, str) or not to.strip():
            raise LiveError(400, "missing_target", "give 'to': rtmp[s]://HOST/APP/KEY, or an HLS playlist "
                                                   f"(NAME.m3u8) or directory under {self.hls_root}")
        try:
            target = parse_target(to, hls_root=self.hls_root)
        except ValueError as exc:
            raise LiveError(400, "bad_target", str(exc)) from None
        self._check_free(target)
        return target

    def _check_free(self, target: Target) -> None:
        active = [e for e in self.entries.values() if e.active]
        if any(e.broadcaster.target.location == target.location for e in active):
            raise LiveError(409, "target_busy", f"a broadcast to {target.display} is already running")
        if len(active) >= self.max_broadcasts:
            raise LiveError(503, "at_capacity", f"{self.max_broadcasts} broadcasts are running; stop one first")

    async def start(self, body: dict[str, Any]) -> dict[str, Any]:
        """{to, session_id} or {to, audio, avatar?, emotion?, loop?}, plus duration_s?, video_bitrate_kbps?"""
        session_id, audio = body.get("session_id"), body.get("audio")
        if (session_id is None) == (audio is None):
            raise LiveError(400, "bad_source", "give exactly one of 'session_id' (a live call to broadcast) "
                                               "or 'audio' (a file path or http(s) URL to drive the avatar, or a "
                                               "list of them: one per face)")
        for key in ("session_id", "avatar", "emotion"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise LiveError(400, "bad_field", f"{key!r} must be a string")
        if not isinstance(body.get("loop", False), bool):
            raise LiveError(400, "bad_field", "'loop' must be true or false")
        target, options = self._target(body), self._options(body)
        bid = f"b{next(self._ids)}"
        broadcaster = Broadcaster(target, options, on_state=lambda b, state: self._on_state(bid, b, state))
        if session_id is not None:
            peer = self.service.get(session_id)  # 404 unknown_session
            entry = BroadcastEntry(bid, broadcaster, {"type": "session", "session_id": peer.id}, time.time())
            coro = broadcaster.run(pacer_frames(peer.pacer))
        else:
            entry, coro = await self._audio_entry(bid, broadcaster, body)
            try:
                self._check_free(target)  # again: another request may have started one meanwhile
            except LiveError:
                coro.close()
                entry.session.close()
                raise
        self.entries[bid] = entry
        entry.task = self.service.spawn(self._run(entry, coro), f"broadcast-{bid}")
        if entry.session is not None:  # closed even when the task is cancelled before it first runs
            entry.task.add_done_callback(lambda _task, session=entry.session: session.close())
        self.service.events.publish("broadcast_started", broadcast=bid, target=target.display, source=entry.source)
        return entry.snapshot()

    async def _audio_entry(self, bid: str, broadcaster: Broadcaster, body: dict[str, Any]):
        backend = self.service.backend
        avatar, emotion = body.get("avatar") or backend.default_avatar, body.get("emotion")
        sources, speakers = audio_sources(body.get("audio"), body.get("speakers"))
        self.service.check_conditions(avatar, emotion, speakers)
        loop = asyncio.get_running_loop()
        for src in sources:  # opening a URL blocks: off the loop
            try:
                fmt = await loop.run_in_executor(None, probe_audio, src, self.sources)
            except AudioSourceError as exc:
                raise LiveError(400, "bad_audio", str(exc)) from None
            if len(sources) < speakers and fmt.channels != speakers:
                raise LiveError(400, "bad_audio", f"{src}: it has {fmt.channels} channel{'s' if fmt.channels != 1 else ''}; "
                                                  f"one source for {speakers} speakers needs one channel each "
                                                  "(or give 'audio' as a list: one source per speaker)")
        try:
            session = backend.open(avatar, emotion) if speakers == 1 else backend.open(avatar, emotion, speakers)
        except CapacityError as exc:
            raise LiveError(503, "at_capacity", f"no engine session free for the broadcast: {exc}") from None
        try:  # the session is closed on every way out but a started broadcast (which closes it at its end)
            loop_audio = bool(body.get("loop", False))
            voices = [(i,) for i in range(speakers)] if len(sources) > 1 else [tuple(range(speakers))]
            drivers = [AudioDriver(session, src, policy=self.sources, loop_audio=loop_audio, speakers=who)
                       for src, who in zip(sources, voices)]
            source = {"type": "audio", "audio": body["audio"], "avatar": avatar, "emotion": emotion,
                      "loop": loop_audio, "engine_session": getattr(session, "id", None)}
            if speakers > 1:
                source["speakers"] = speakers
            entry = BroadcastEntry(bid, broadcaster, source, time.time(), drivers=drivers, session=session)
            return entry, broadcast_audio(broadcaster, session, drivers)
        except AudioSourceError as exc:  # the file went away since the probe
            session.close()
            raise LiveError(400, "bad_audio", str(exc)) from None
        except BaseException:
            session.close()
            raise

    async def _run(self, entry: BroadcastEntry, coro) -> None:
        try:
            await coro
        finally:
            self._finished.append(entry.id)
            while len(self._finished) > self._keep_finished:
                self.entries.pop(self._finished.popleft(), None)
            b = entry.broadcaster
            self.service.events.publish("broadcast_ended", broadcast=entry.id, state=b.state, reason=b.end_reason,
                                        error=b.last_error, frames_sent=b.stats.frames_sent)

    def _on_state(self, bid: str, b: Broadcaster, state: str) -> None:
        self.service.events.publish("broadcast_state", broadcast=bid, state=state, target=b.target.display,
                                    reconnects=b.stats.reconnects, error=b.last_error)

    def get(self, bid: Any) -> BroadcastEntry:
        entry = self.entries.get(bid) if isinstance(bid, str) else None
        if entry is None:
            raise LiveError(404, "unknown_broadcast", f"no broadcast {bid!r}")
        return entry

    async def stop(self, bid: Any) -> dict[str, Any]:
        """End one broadcast cleanly (the stream is finished, not cut) and return its final state."""
        entry = self.get(bid)
        entry.broadcaster.stop()
        if entry.task is not None and not entry.task.done():
            done, _ = await asyncio.wait({entry.task}, timeout=STOP_WAIT_S)
            if not done:
                entry.task.cancel()
        return entry.snapshot()

    def list(self) -> list[dict[str, Any]]:
        return [e.snapshot() for e in self.entries.values()]

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.stop(bid) for bid, e in list(self.entries.items()) if e.active),
                             return_exceptions=True)


MAX_SPEAKERS = 4


def audio_sources(audio: Any, speakers: Any = None) -> tuple[list[str], int]:
    """A broadcast's `audio` (a source, or a list: one per speaker) and `speakers` -> (sources, speakers).
    One source with `speakers` > 1 is split by channel."""
    sources = audio if isinstance(audio, list) else [audio]
    if not sources or len(sources) > MAX_SPEAKERS or not all(isinstance(a, str) and a.strip() for a in sources):
        raise LiveError(400, "bad_field", f"'audio' must be a file path or URL, or a list of 1..{MAX_SPEAKERS} of "
                                          "them (one per face, left to right)")
    if speakers is None:
        return sources, len(sources)
    if isinstance(speakers, bool) or not isinstance(speakers, int) or not 1 <= speakers <= MAX_SPEAKERS:
        raise LiveError(400, "bad_field", f"'speakers' must be an integer in 1..{MAX_SPEAKERS}")
    if len(sources) > 1 and speakers != len(sources):
        raise LiveError(400, "bad_field", f"'speakers' is {speakers} but 'audio' lists {len(sources)} sources; "
                                          "give one source per speaker, or one multi-channel source")
    return sources, speakers
