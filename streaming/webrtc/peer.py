"""One browser call: an aiortc peer connection, one engine session, a pacer, three tasks.

Lifecycle. `negotiate()` opens the engine session first (so a full server says so before any network
work), adds the outgoing tracks, sets the video codec preference, then applies the offer and answers
(no trickle ICE: the answer carries every candidate). Tasks, held in a set with done-callbacks:
- feeder: session frames -> pacer (and per-stage metrics). Frames made before the connection is up are
  discarded, so the media clock starts when someone can receive. If the engine fails the session, a
  new one is opened (at most RESTARTS_PER_MINUTE times a minute, else the call ends: "engine_error");
- mic: `MicReader` draining the inbound audio track into the session; the track ending ends the call
  (before the first packet, while paused and across network stalls the live session tops its own
  input up with silence, so its idle frames keep coming);
- watchdog: ends the call if ICE/DTLS does not connect in `connect_timeout_s`, if no mic packet has
  arrived for `idle_timeout_s` (a vanished browser is otherwise only noticed after ~30 s of failed
  ICE consent checks), or when it has lasted `max_call_s`.
The call also ends on `bye` and when the connection goes `failed` or `closed`. `close()` is idempotent
and frees everything: tasks cancelled, tracks stopped, pacer closed, engine session closed, pc closed.

Changing avatar or emotion: an engine session's conditions are fixed for its life, so the change is
stored and applied at the next pause in the speech that is going out (a voice-activity gate on the
outgoing audio): the session is closed and a new one opened with the new conditions, the mic is
re-pointed at it, and the pacer plays the old session's buffered tail then repeats the last picture
until the new session's first frames arrive (about one generation block).

A two-person call (`Offer.speakers` 2) opens a session with two voices: the mic is speaker 1 and
speaker 2 is a media file played from the moment the call connects (`SecondVoice`), or the mic's right
channel (`stereo_split`); both follow the call across session changes (streaming/webrtc/dialogue.py).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Protocol

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from audio.pcm import MEDIA_SAMPLE_RATE
from audio.resample import PcmFormat
from audio.vad import VadConfig, VoiceActivityDetector
from avatar.types import AvatarFrame, AvatarSessionProtocol, SegmentEnd, SessionError
from streaming.clock import MediaClock
from streaming.events import EventBus
from streaming.metrics import LiveMetrics
from streaming.pacer import Pacer, PacerOptions, Slot
from streaming.source_policy import SourcePolicy
from streaming.webrtc.candidates import add_host_candidates
from streaming.webrtc.dialogue import SecondVoice, split_channels
from streaming.webrtc.errors import CapacityError, LiveError
from streaming.webrtc.tracks import AvatarAudioTrack, AvatarVideoTrack, MicReader

log = logging.getLogger(__name__)

VIDEO_CODECS = {"vp8": "video/VP8", "h264": "video/H264"}
MODES = ("voice", "file")  # "speak my voice" / "play an audio file" (both arrive as the mic track)
MAX_SDP_CHARS = 64 * 1024  # an offer's SDP
MAX_MEDIA_LINES = 8
MAX_CANDIDATES = 64  # ICE candidates in one offer
RESTARTS_PER_MINUTE = 3  # engine failures a call survives (each reopens its session); one more ends it


class SessionBackend(Protocol):
    """The engine as the service sees it; the app layer implements it (and keeps torch out of here)."""

    default_avatar: str

    def catalog(self) -> dict[str, list[str]]:
        """Avatar name -> its emotion names."""
        ...

    def open(self, avatar: str, emotion: str | None, speakers: int = 1) -> AvatarSessionProtocol:
        """A realtime session at 48 kHz output with `speakers` voices (one per face, left to right);
        raises CapacityError when full."""
        ...

    def snapshot(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Offer:
    sdp: str
    avatar: str
    emotion: str | None = None
    mode: str = "voice"
    codec: str = "vp8"
    # a two-person call (streaming/webrtc/dialogue.py): the caller is speaker 1; speaker 2 is a media file
    # (`second_voice`, a path under the media folder) or the caller's right channel (`stereo_split`)
    speakers: int = 1
    second_voice: str | None = None
    stereo_split: bool = False


@dataclass(frozen=True)
class PeerOptions:
    ice_servers: tuple[RTCIceServer, ...] = ()  # none: host candidates only (loopback / LAN)
    idle_timeout_s: float = 30.0  # no mic packet for this long ends the call
    connect_timeout_s: float = 20.0  # ICE + DTLS must reach "connected" within this
    watchdog_interval_s: float = 0.5
    max_call_s: float = 0.0  # a call ends after this long (0: no limit)
    host_candidates: tuple[str, ...] = ()  # addresses offered besides aioice's own (e.g. 127.0.0.1)
    fps: int = 25
    sample_rate: int = MEDIA_SAMPLE_RATE
    pacer: PacerOptions = field(default_factory=PacerOptions)
    sources: SourcePolicy = SourcePolicy()  # what a call's second voice may be read from (none by default)


def check_offer_size(sdp: str) -> None:
    """Bounds checked by counting lines, before anything parses the SDP: a browser's offer is a few KiB
    with a few m-lines and a dozen candidates; thousands would be parsed, paired and checked on the
    event loop (LiveError 413 / 400)."""
    if len(sdp) > MAX_SDP_CHARS:
        raise LiveError(413, "sdp_too_large", f"the offer's SDP has {len(sdp)} characters; the limit is {MAX_SDP_CHARS}")
    media = sdp.count("\nm=") + sdp.startswith("m=")
    if media > MAX_MEDIA_LINES:
        raise LiveError(400, "too_many_media", f"the offer has {media} m-lines; at most {MAX_MEDIA_LINES} are accepted")
    candidates = sdp.count("a=candidate:")
    if candidates > MAX_CANDIDATES:
        raise LiveError(400, "too_many_candidates",
                        f"the offer has {candidates} ICE candidates; at most {MAX_CANDIDATES} are accepted")


def validate_offer(sdp: str, codec: str) -> None:
    """Refuse offers that cannot work before any resource is taken (LiveError 400 / 413)."""
    if codec not in VIDEO_CODECS:
        raise LiveError(400, "bad_codec", f"codec must be one of {sorted(VIDEO_CODECS)}, not {codec!r}")
    check_offer_size(sdp)
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted errors on garbage
        raise LiveError(400, "bad_sdp", f"the offer's SDP does not parse ({type(exc).__name__}: {exc})") from None
    audio = [m for m in desc.media if m.kind == "audio"]
    video = [m for m in desc.media if m.kind == "video"]
    if not audio or not video:
        raise LiveError(400, "bad_sdp", "the offer needs an audio m-line (the microphone, sendrecv) and a video "
                                        "m-line (recvonly, to receive the avatar)")
    if audio[0].direction not in (None, "sendrecv", "sendonly"):
        raise LiveError(400, "bad_sdp", f"the offer's audio is {audio[0].direction}; it must send the microphone")
    if video[0].direction not in (None, "sendrecv", "recvonly"):
        raise LiveError(400, "bad_sdp", f"the offer's video is {video[0].direction}; it must receive")
    offered = {c.mimeType.lower() for c in video[0].rtp.codecs}
    if VIDEO_CODECS[codec].lower() not in offered:
        raise LiveError(400, "codec_unavailable", f"the browser did not offer {VIDEO_CODECS[codec]} "
                                                  f"(offered: {sorted(offered)})")


def _prefer_codec(pc: RTCPeerConnection, sender: RTCRtpSender, codec: str) -> None:
    """Must run before setRemoteDescription, or aiortc answers with the offer's first codec."""
    mime = VIDEO_CODECS[codec]
    prefs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == mime]
    transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
    transceiver.setCodecPreferences(prefs)


def _answered_video_codec(sdp: str) -> str | None:
    for m in SessionDescription.parse(sdp).media:
        if m.kind == "video" and m.rtp.codecs:
            return m.rtp.codecs[0].mimeType.split("/")[-1]
    return None


class LivePeer:
    def __init__(self, peer_id: str, offer: Offer, backend: SessionBackend, options: PeerOptions,
                 metrics: LiveMetrics, events: EventBus, *, on_closed: Callable[[LivePeer], None],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task]) -> None:
        self.id, self.backend, self.options = peer_id, backend, options
        self.metrics, self.events = metrics, events
        self._on_closed, self._spawn_detached = on_closed, spawn
        self.avatar, self.emotion, self.mode, self.codec = offer.avatar, offer.emotion, offer.mode, offer.codec
        self.speakers, self.stereo_split = offer.speakers, offer.stereo_split
        self.second_voice = (None if offer.second_voice is None else
                             SecondVoice(offer.second_voice, options.sources, lambda: self.session))
        self._offer_sdp = offer.sdp
        self.negotiated_codec: str | None = None
        self.created_at, self.created_wall = time.monotonic(), time.time()
        self.connected_at: float | None = None
        self.state = "new"  # new -> connecting -> connected -> closed
        self.end_reason: str | None = None
        self.error: str | None = None
        self.paused = False
        self.pending: tuple[str, str | None] | None = None  # conditions waiting for a pause
        self.swaps = 0
        self.restarts = 0  # engine sessions reopened after a failure
        self._restart_times: deque[float] = deque()
        self.mic_ignored = 0  # mic packets dropped while paused
        self._silence_before_s = 0.0  # inserted by the sessions this call had before the current one
        self.discarded_before_connect = 0  # idle frames generated while ICE/DTLS was connecting
        self.client: str | None = None  # the remote address the service's per-client limits count
        self.session: AvatarSessionProtocol | None = None
        self.clock = MediaClock(options.fps, options.sample_rate)
        self.pacer = Pacer(self.clock, options.pacer, listener=metrics)
        self.video = AvatarVideoTrack(self.pacer, on_sent=self._on_sent)
        self.audio = AvatarAudioTrack(self.pacer)
        self.mic: MicReader | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(options.ice_servers)))
        self._tasks: set[asyncio.Task] = set()
        self._closed: asyncio.Future | None = None
        self._vad = VoiceActivityDetector(VadConfig(sample_rate=options.sample_rate))
        self._last_block: tuple[float, float, float] | None = None
        self._sent_at: deque[float] = deque(maxlen=50)
        self._latency_ms: deque[float] = deque(maxlen=250)
        self._pacing_ms: deque[float] = deque(maxlen=200)  # per frame sent: in the pacer -> to the transport

    # ---- setup --------------------------------------------------------------------------------------
    async def negotiate(self) -> RTCSessionDescription:
        # 1. the engine session first: a full engine refuses before any network work
        self.session = self._open(self.avatar, self.emotion)
        # 2. handlers, outgoing tracks, the codec preference (before setRemoteDescription)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)
        video_sender = self.pc.addTrack(self.video)
        self.pc.addTrack(self.audio)
        _prefer_codec(self.pc, video_sender, self.codec)
        # 3. offer -> answer (every candidate is gathered inside setLocalDescription)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(self._offer_sdp, "offer"))
            if self.options.host_candidates:
                await add_host_candidates(self.pc, self.options.host_candidates)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:
            raise LiveError(400, "bad_sdp", f"cannot negotiate this offer ({type(exc).__name__}: {exc})") from exc
        self.negotiated_codec = _answered_video_codec(self.pc.localDescription.sdp)
        self.state = "connecting"
        # 4. the long-lived tasks
        self._spawn(self._feed(), "feeder")
        self._spawn(self._watchdog(), "watchdog")
        return self.pc.localDescription

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("peer %s: task %s failed", self.id, task.get_name(), exc_info=exc)
            self.error = f"{type(exc).__name__}: {exc}"
            self.end("internal_error")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.mic is None:
            self.mic = MicReader(track, self._push_mic)
            self._spawn(self._run_mic(self.mic), "mic")
        else:  # anything else (a camera, a second audio track) is drained and dropped, never queued
            self._spawn(_drain(track), f"drain-{track.kind}")

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.state = "connected"
            if self.second_voice is not None:  # from now on someone hears it: frames before were discarded
                self._spawn(self.second_voice.run(), "second-voice")
            self.events.publish("session_connected", session=self.id,
                                connect_ms=round((self.connected_at - self.created_at) * 1e3, 1))
        elif state in ("failed", "closed"):
            self.end(f"peer_{state}")

    # ---- media ----------------------------------------------------------------------------------------
    async def _run_mic(self, mic: MicReader) -> None:
        await mic.run()
        self.end("mic_ended")  # the remote track ended: the browser hung up or went away

    def _push_mic(self, pcm: np.ndarray, fmt: PcmFormat) -> None:
        self.metrics.mic_frames.inc()
        if self.paused or self.session is None:
            self.mic_ignored += 1  # paused: the avatar stops listening (the session idles on silence)
            return
        if self.stereo_split:
            left, right = split_channels(pcm, fmt)[:2] if fmt.channels >= 2 else (pcm, None)
            self.session.push_audio(left, fmt.sample_rate, speaker=0)
            if right is not None:  # a mono packet: speaker 2 is silent (the session tops it up)
                self.session.push_audio(right, fmt.sample_rate, speaker=1)
            return
        self.session.push_audio(pcm, fmt.sample_rate, channels=fmt.channels, layout=fmt.layout)

    @property
    def silence_pushed_s(self) -> float:
        """Seconds of silence this call's sessions put in place of mic audio that was late or ignored."""
        current = 0.0 if self.session is None else self.session.stats.silence_inserted_s
        return self._silence_before_s + current

    async def _feed(self) -> None:
        """Session frames -> pacer; follows the session across condition changes."""
        while self.session is not None:
            session = self.session
            async for item in session:
                if isinstance(item, AvatarFrame):
                    if self.connected_at is None:  # nobody to send to yet: the clock starts after connect
                        self.discarded_before_connect += 1
                        continue
                    self._on_frame(item)
                elif isinstance(item, SessionError):
                    self.error = item.message
                    if not self._restart_session():
                        self.end("engine_error")
                        return
                    break
                elif isinstance(item, SegmentEnd):
                    self.events.publish("segment_end", session=self.id, segment=item.segment, pts=item.pts)
            if session is self.session:  # ended without being replaced
                self.end("session_ended")
                return

    def _open(self, avatar: str, emotion: str | None) -> AvatarSessionProtocol:
        if self.speakers == 1:  # the one-voice form every backend has
            return self.backend.open(avatar, emotion)
        return self.backend.open(avatar, emotion, speakers=self.speakers)

    def _reopen(self, avatar: str, emotion: str | None) -> None:
        """Replace the engine session (new conditions, a failure, or a fresh audio clock)."""
        if self.session is not None:
            self.session.close()  # frees its engine slot first, so the new one always fits
            self._silence_before_s += self.session.stats.silence_inserted_s
        self.session = None
        self.session = self._open(avatar, emotion)
        self.avatar, self.emotion = avatar, emotion
        self._vad.reset()

    def _restart_session(self) -> bool:
        """An engine failure inside one session: carry the call on with a fresh session, a few times."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > 60.0:
            self._restart_times.popleft()
        if len(self._restart_times) >= RESTARTS_PER_MINUTE:
            return False
        log.warning("peer %s: engine session failed (%s); opening a new one", self.id, self.error)
        try:
            self._reopen(self.avatar, self.emotion)
        except Exception as exc:
            self.error = f"{self.error}; reopening failed: {exc}"
            return False
        self._restart_times.append(now)
        self.restarts += 1
        self.events.publish("session_restarted", session=self.id, error=self.error, restarts=self.restarts)
        return True

    def _on_frame(self, frame: AvatarFrame) -> None:
        t = frame.timing
        block = (t.features_ms, t.denoise_ms, t.decode_ms)
        if block != self._last_block:  # every frame of a block carries that block's stage times
            self._last_block = block
            self.metrics.observe_block(t)
        self.metrics.observe_frame(t)
        self.pacer.push(frame)
        self._vad.push(frame.audio)
        if self.pending is not None and not self._vad.is_speech:
            self._apply_pending()

    def _on_sent(self, slot: Slot, now: float) -> None:
        self._sent_at.append(now)
        latency = None if slot.audio_at is None else now - slot.audio_at
        if latency is not None:
            self._latency_ms.append(latency * 1e3)
        pacer_s = None if slot.repeated or slot.arrived_at is None else now - slot.arrived_at
        if pacer_s is not None:
            self._pacing_ms.append(pacer_s * 1e3)
        self.metrics.observe_sent(pacer_s, latency)

    # ---- control ----------------------------------------------------------------------------------------
    def request_conditions(self, avatar: str, emotion: str | None) -> None:
        """Store a new avatar/emotion; it takes effect at the next pause in the outgoing speech."""
        self.pending = (avatar, emotion)
        self.events.publish("conditions_requested", session=self.id, avatar=avatar, emotion=emotion)
        if self.paused or not self._vad.is_speech:
            self._apply_pending()

    def _apply_pending(self) -> None:
        assert self.pending is not None
        avatar, emotion = self.pending
        self.pending = None
        try:
            self._reopen(avatar, emotion)
        except Exception as exc:
            self.error = f"cannot reopen the session with avatar={avatar!r} emotion={emotion!r}: {exc}"
            self.end("engine_error")
            return
        self.swaps += 1
        self.events.publish("conditions_changed", session=self.id, avatar=avatar, emotion=emotion,
                            engine_session=self.session.id if self.session is not None else None)

    def pause(self) -> None:
        """Stop listening: mic audio is discarded, queued speech dropped, the avatar idles (on silence)."""
        if not self.paused and self.session is not None:
            self.paused = True
            self.session.interrupt()
            dropped = self.pacer.clear()
            self.events.publish("session_paused", session=self.id, dropped_frames=dropped)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.events.publish("session_resumed", session=self.id)

    async def _watchdog(self) -> None:
        opts = self.options
        while True:
            await asyncio.sleep(opts.watchdog_interval_s)
            now = time.monotonic()
            if self.connected_at is None:
                if now - self.created_at > opts.connect_timeout_s:
                    self.end("connect_timeout")
                    return
                continue
            if opts.max_call_s and now - self.created_at > opts.max_call_s:
                self.end("max_duration")
                return
            heard = self.mic.last_at if self.mic is not None and self.mic.last_at is not None else self.connected_at
            if now - heard > opts.idle_timeout_s:
                self.end("idle_timeout")
                return

    # ---- teardown ----------------------------------------------------------------------------------------
    def end(self, reason: str) -> None:
        """Close from a callback or a task of this peer (the close runs on the service's task set)."""
        if self._closed is None:
            self._spawn_detached(self.close(reason), f"{self.id}:close")

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self, reason: str) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        self.state, self.end_reason = "closed", reason
        try:
            # 1. the engine slot and the registry entry first, before any await: a new call fits at once
            if self.session is not None:
                self.session.close()
            self.pacer.close()
            self._on_closed(self)
            # 2. our tasks (not the one running this, if it is ours)
            me = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # 3. media and network
            self.video.stop()
            self.audio.stop()
            try:
                await self.pc.close()
            except Exception:  # the peer is going away either way
                log.exception("peer %s: error closing the peer connection", self.id)
        finally:
            self._closed.set_result(None)

    # ---- reporting ----------------------------------------------------------------------------------------
    def fps(self) -> float:
        if len(self._sent_at) < 2:
            return 0.0
        span = self._sent_at[-1] - self._sent_at[0]
        return round((len(self._sent_at) - 1) / span, 2) if span > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        lat = list(self._latency_ms)
        engine: dict[str, Any] = {"session": None if self.session is None else self.session.id}
        if self.session is not None:
            stats = self.session.stats
            # the session's stages (wait for audio, then compute per block), then this call's own: pacing
            stages = {**stats.stage_ms, "pacing": self._pacing_ms}
            engine.update(frames=stats.frames, idle_frames=stats.idle_frames, blocks=stats.blocks,
                          dropped_input_samples=stats.dropped_input_samples, dropped_frames=stats.dropped_frames,
                          held_frames=stats.held_frames,
                          stage_ms={k: round(statistics.median(list(v)), 2) if v else None
                                    for k, v in stages.items()})
        now = time.monotonic()
        return {
            "id": self.id, "state": self.state, "connection": self.pc.connectionState, "end_reason": self.end_reason,
            "error": self.error, "avatar": self.avatar, "emotion": self.emotion, "mode": self.mode,
            "codec": self.negotiated_codec, "paused": self.paused, "swaps": self.swaps, "restarts": self.restarts,
            "pending": None if self.pending is None else {"avatar": self.pending[0], "emotion": self.pending[1]},
            "age_s": round(now - self.created_at, 2), "created": self.created_wall,
            "video": {"sent": self.video.sent, "fps": self.fps(), "skipped": self.video.skipped},
            "audio": {"sent": self.audio.sent, "skipped_samples": self.audio.skipped_samples},
            "mic": None if self.mic is None else {**self.mic.snapshot(), "ignored_while_paused": self.mic_ignored,
                                                  "silence_pushed_s": round(self.silence_pushed_s, 2)},
            "pacer": self.pacer.snapshot(),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
                           "p95": round(float(np.percentile(lat, 95)), 1) if lat else None,
                           "last": round(lat[-1], 1) if lat else None},
            "speaking": self._vad.is_speech,
            "speakers": self.speakers,
            "dialogue": None if self.speakers == 1 else {
                "stereo_split": self.stereo_split,
                "second_voice": None if self.second_voice is None else self.second_voice.snapshot()},
            "engine": engine,
        }


async def _drain(track: MediaStreamTrack) -> None:
    """Read and discard an inbound track we do not use (aiortc would queue its frames without bound)."""
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return
