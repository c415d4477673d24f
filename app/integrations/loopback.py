"""A Pipecat pipeline with our video service to a WebRTC client on 127.0.0.1, measured from what the client
receives (tests and benchmarks).

TTS-like speech frames -> `AvatarcastVideoService` -> Pipecat's `SmallWebRTCTransport` output -> an
aiortc client (no ICE servers, loopback candidates only). The client notes when each RTP timestamp's
packets arrive, so picture and sound are timed as they come off the wire, before its own jitter buffers
(a player lines those up itself from the RTCP sender reports).

A/V lag needs to know which picture belongs to which sound. `EnvelopeMarkedSource` wraps any source and
paints every frame it emits: the left half grey in proportion to the loudness of the frame's own audio,
the right half a per-frame code. Lag is then the shift that best lines up the brightness the client sees
with the loudness it hears; it is the transport path's sync (how far apart a frame's picture and its
sound arrive), which is what the adapter controls, not how well a model moves its lips.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace

import numpy as np

from app.integrations.source import AvatarFormat, SessionSource, pcm16
from avatar.types import AvatarFrame

FULL_SCALE_RMS = 0.25  # frame RMS painted as white
CODE_STEP = 37  # right-half grey of frame pts: (pts * 37) % 256, so consecutive frames differ by >= 37


class EnvelopeMarkedSource:
    """A `SessionSource` whose frames show their own audio's loudness (left) and a frame code (right)."""

    def __init__(self, source: SessionSource) -> None:
        self.source = source

    @property
    def format(self) -> AvatarFormat:
        return self.source.format

    def open(self, sample_rate: int):
        return _MarkedSession(self.source.open(sample_rate))


class _MarkedSession:
    def __init__(self, session) -> None:
        self._session = session

    def push_audio(self, pcm, sample_rate, speaker=0) -> None:
        self._session.push_audio(pcm, sample_rate, speaker)

    def end_segment(self) -> None:
        self._session.end_segment()

    def interrupt(self) -> None:
        self._session.interrupt()

    def close(self) -> None:
        self._session.close()

    def __aiter__(self):
        return self._marked()

    async def _marked(self):
        async for item in self._session:
            if isinstance(item, AvatarFrame):
                rms = float(np.sqrt(np.mean(np.square(item.audio, dtype=np.float64)))) if item.audio.size else 0.0
                video = np.full_like(item.video, int(np.clip(rms / FULL_SCALE_RMS * 255, 0, 255)))
                video[:, video.shape[1] // 2:] = (item.pts * CODE_STEP) % 256
                item = replace(item, video=video)
            yield item


@dataclass
class Received:
    """What the client got: (arrival s, left grey, right grey) per video frame; (arrival s, rms) per audio
    packet; arrival times are monotonic, of the packets that carried each RTP timestamp."""

    video: list[tuple[float, float, float]] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)
    audio_rate: int = 0

    def fps(self, start: float | None = None) -> float:
        t = [v[0] for v in self.video if start is None or v[0] >= start]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0

    def fresh_fps(self, start: float | None = None) -> float:
        """New pictures per second (repeats of the same frame not counted)."""
        v = [x for x in self.video if start is None or x[0] >= start]
        if len(v) < 2:
            return 0.0
        codes = np.array([x[2] for x in v])
        return int(np.sum(np.abs(np.diff(codes)) > CODE_STEP / 4)) / (v[-1][0] - v[0][0])

    def av_lag_ms(self, max_ms: float = 300.0, grid_ms: float = 5.0) -> tuple[float, float]:
        """(lag of the picture behind its sound in ms, correlation at that lag): brightness vs loudness,
        each held from its arrival to the next, cross-correlated on a `grid_ms` grid."""
        vt, vb = np.array([v[0] for v in self.video]), np.array([v[1] for v in self.video])
        at, ar = np.array([a[0] for a in self.audio]), np.array([a[1] for a in self.audio])
        grid = np.arange(max(vt[0], at[0]), min(vt[-1], at[-1]), grid_ms / 1000)
        held = lambda t, x: x[np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(x) - 1)]  # noqa: E731
        v, a = held(vt, vb), held(at, ar)
        a = np.convolve(a, np.ones(int(40 / grid_ms)) / int(40 / grid_ms), mode="same")  # a frame's 40 ms
        v, a = (v - v.mean()) / (v.std() or 1), (a - a.mean()) / (a.std() or 1)
        best, corr = 0, -1.0
        for lag in range(-int(max_ms / grid_ms), int(max_ms / grid_ms) + 1):
            c = float(np.mean(v[max(0, lag):v.size + min(0, lag)] * a[max(0, -lag):a.size - max(0, lag)]))
            if c > corr:
                best, corr = lag, c
        return best * grid_ms, corr

    def speech_until(self, after: float, threshold: float = 0.02) -> float:
        """Arrival time of the last loud audio packet after `after` (`after` if none)."""
        loud = [t for t, rms in self.audio if t > after and rms >= threshold]
        return max(loud, default=after)

    def loud_between(self, start: float, end: float, threshold: float = 0.02) -> int:
        """Loud audio packets that arrived in (start, end]."""
        return sum(start < t <= end and rms >= threshold for t, rms in self.audio)


class LoopbackClient:
    """An aiortc peer that receives the transport's audio and video (and opens the data channel it wants)."""

    def __init__(self) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.createDataChannel("messages")
        for kind in ("audio", "video"):
            receiver = self.pc.addTransceiver(kind, direction="recvonly").receiver
            self._note_arrivals(kind, receiver)
        self.received = Received()
        self._arrivals: dict[str, dict[int, float]] = {"audio": {}, "video": {}}
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", self._on_track)

    def _note_arrivals(self, kind: str, receiver) -> None:
        handle = receiver._handle_rtp_packet

        async def noting(packet, arrival_time_ms):
            self._arrivals[kind][packet.timestamp] = time.monotonic()  # the last packet of a frame wins
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = noting

    def _on_track(self, track) -> None:
        self._tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        arrivals = self._arrivals[track.kind]
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            at = arrivals.get(frame.pts, time.monotonic())
            if track.kind == "video":
                img = frame.to_ndarray(format="rgb24")
                w = img.shape[1]
                self.received.video.append((at, float(img[:, w // 8:3 * w // 8].mean()),
                                            float(img[:, 5 * w // 8:7 * w // 8].mean())))
            else:
                x = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float32).mean(1) / 32768
                self.received.audio.append((at, float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))))
                self.received.audio_rate = frame.sample_rate

    async def offer(self) -> tuple[str, str]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp, self.pc.localDescription.type

    async def accept(self, answer: dict) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    async def close(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def tts_frames(pcm: np.ndarray, rate: int, chunk_ms: int = 20) -> list:
    """What a TTS service emits for one turn: TTSStartedFrame, `chunk_ms` audio frames, TTSStoppedFrame."""
    from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame

    n = rate * chunk_ms // 1000
    chunks = [pcm16(pcm[i:i + n]).tobytes() for i in range(0, pcm.size, n)]
    return [TTSStartedFrame(), *(TTSAudioRawFrame(c, rate, 1) for c in chunks), TTSStoppedFrame()]


@contextlib.asynccontextmanager
async def pipecat_loopback(source: SessionSource, sample_rate: int = 48_000, video_out_framerate: int = 30):
    """A running pipeline [AvatarcastVideoService(source), SmallWebRTCTransport output] connected to a
    `LoopbackClient`; yields (worker, service, client). Loopback candidates only."""
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
    from pipecat.workers.runner import WorkerRunner

    from app.integrations.pipecat import AvatarcastVideoService
    from streaming.webrtc.testing import loopback_candidates_only

    with loopback_candidates_only():
        client = LoopbackClient()
        connection = SmallWebRTCConnection(ice_servers=None)
        sdp, kind = await client.offer()
        await connection.initialize(sdp=sdp, type=kind)
        await client.accept(connection.get_answer())
        service = AvatarcastVideoService(source)
        fmt = service.format
        transport = SmallWebRTCTransport(connection, TransportParams(
            audio_out_enabled=True, video_out_enabled=True, video_out_is_live=False,
            video_out_width=fmt.width, video_out_height=fmt.height, video_out_framerate=video_out_framerate))
        worker = PipelineWorker(Pipeline([service, transport.output()]), idle_timeout_secs=None,
                                params=PipelineParams(audio_out_sample_rate=sample_rate))
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        run = asyncio.ensure_future(runner.run())
        try:
            yield worker, service, client
        finally:
            from pipecat.frames.frames import EndFrame

            if not run.done():
                await worker.queue_frame(EndFrame())
                try:
                    await asyncio.wait_for(asyncio.shield(run), 30)
                except asyncio.TimeoutError:
                    await worker.cancel()
                    await asyncio.wait_for(run, 10)
            await client.close()
            await connection.disconnect()
