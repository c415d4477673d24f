"""Loopback-only WebRTC clients for tests and benchmarks: aiortc peers on 127.0.0.1, no ICE servers.

`LoopbackClient` offers a 127.0.0.1 host candidate of its own (`add_host_candidates`, what the server
does when bound to loopback) and keeps only loopback candidates in the SDP it sends and in the answer it
applies, so every ICE check goes to 127.0.0.1, on a machine with a LAN or in a namespace with only `lo`.
It plays PCM as its microphone in real time (mono, or stereo for a two-person call whose voices are the
two channels) and records what comes back.

`loopback_candidates_only()` replaces aioice's address list with 127.0.0.1 for every connection made
while it is active (older tests and benchmarks); the server never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from typing import Iterator

import aioice.ice
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from audio.pcm import MEDIA_SAMPLE_RATE
from audio.resample import PcmFormat, resample_audio
from streaming.webrtc.candidates import add_host_candidates

LOOPBACK = ("127.0.0.1", "::1")
SAMPLE_RATE = MEDIA_SAMPLE_RATE
PACKET = 960  # 20 ms


def loopback_only_sdp(sdp: str) -> str:
    """`sdp` without its ICE candidates on any address but loopback."""
    lines = sdp.split("\r\n")
    keep = [ln for ln in lines if not ln.startswith("a=candidate:") or ln.split()[4] in LOOPBACK]
    return "\r\n".join(keep)


@contextlib.contextmanager
def loopback_candidates_only() -> Iterator[None]:
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


def announce_stereo(sdp: str) -> str:
    """`sdp` with its Opus marked as sent in stereo (`sprop-stereo=1`), as a browser's page does for a
    two-channel microphone (browsers send mono Opus unless the offer says so)."""
    lines = sdp.split("\r\n")
    opus = [ln.split(":", 1)[1].split()[0] for ln in lines if ln.startswith("a=rtpmap:") and " opus/" in ln.lower()]
    out = []
    for ln in lines:
        if opus and ln.startswith(f"a=fmtp:{opus[0]} "):
            continue  # replaced below
        out.append(ln)
        if opus and ln.startswith(f"a=rtpmap:{opus[0]} "):
            out.append(f"a=fmtp:{opus[0]} stereo=1;sprop-stereo=1")
    return "\r\n".join(out)


class PcmMicTrack(MediaStreamTrack):
    """Plays float PCM at 48 kHz as 20 ms s16 packets in real time, then silence: mono (N,), or stereo
    (N, 2) (left, right)."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray | None = None) -> None:
        super().__init__()
        pcm = np.zeros(0, np.float32) if pcm is None else np.asarray(pcm, np.float32)
        if pcm.ndim == 2 and pcm.shape[1] != 2:
            raise ValueError(f"a stereo microphone plays (samples, 2) PCM, not {pcm.shape}")
        self.channels = 2 if pcm.ndim == 2 else 1
        self.pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
        self.sent = 0  # samples
        self.started_at: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started_at is None:
            self.started_at = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self.started_at + self.sent / SAMPLE_RATE - time.monotonic()))
        chunk = np.zeros((PACKET, self.channels), np.int16)
        part = self.pcm[self.sent:self.sent + PACKET].reshape(-1, self.channels)
        chunk[:len(part)] = part
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16",
                                        layout="stereo" if self.channels == 2 else "mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, self.sent, fractions.Fraction(1, SAMPLE_RATE)
        self.sent += PACKET
        return frame


class LoopbackClient:
    """An aiortc 'browser': sends a mic track (sendrecv audio), receives video (recvonly) and audio."""

    def __init__(self, pcm: np.ndarray | None = None, keep_video: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = PcmMicTrack(pcm)
        self.keep_video = keep_video
        self.video_times: list[float] = []
        self.video_pts: list[int] = []
        self.video: list[np.ndarray] = []  # decoded RGB frames (when keep_video)
        self.audio: list[np.ndarray] = []  # mono float32 at 48 kHz, as received
        self.audio_first_at: float | None = None
        self._tasks: set[asyncio.Task] = set()
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        reader = self._read_video(track) if track.kind == "video" else self._read_audio(track)
        task = asyncio.get_running_loop().create_task(reader)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_video(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.video_times.append(time.monotonic())
            self.video_pts.append(frame.pts)
            if self.keep_video:
                self.video.append(frame.to_ndarray(format="rgb24"))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if self.audio_first_at is None:
                self.audio_first_at = time.monotonic()
            x = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float32).mean(axis=1)
            self.audio.append(x / 32768.0)

    async def offer(self) -> str:
        self.pc.addTransceiver(self.mic, direction="sendrecv")
        self.pc.addTransceiver("video", direction="recvonly")
        await add_host_candidates(self.pc, ["127.0.0.1"])
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = loopback_only_sdp(self.pc.localDescription.sdp)
        return announce_stereo(sdp) if self.mic.channels == 2 else sdp

    async def accept(self, answer: dict) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(loopback_only_sdp(answer["sdp"]), answer["type"]))

    def received_audio(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    def fps(self, skip_s: float = 0.0) -> float:
        """Video frames per second of arrival time, ignoring the first `skip_s` seconds."""
        if len(self.video_times) < 2:
            return 0.0
        t = [x for x in self.video_times if x >= self.video_times[0] + skip_s]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0

    async def close(self) -> None:
        self.mic.stop()
        await self.pc.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def audio_lag(sent: np.ndarray, received: np.ndarray, rate: int = SAMPLE_RATE, max_lag_s: float = 4.0,
              analysis_rate: int = 16_000) -> tuple[float, float]:
    """Where `sent` starts inside `received`: (lag in seconds, normalised correlation at that lag).

    Both are resampled to `analysis_rate` first; the lag is the peak of the FFT cross-correlation over
    0..max_lag_s, and the correlation is computed over the overlap at that lag (1.0 = identical shape).
    """
    a = resample_audio(np.asarray(sent, np.float32), PcmFormat(rate), out_rate=analysis_rate).astype(np.float64)
    b = resample_audio(np.asarray(received, np.float32), PcmFormat(rate), out_rate=analysis_rate).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    n = 1 << int(np.ceil(np.log2(a.size + b.size)))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    corr = corr[:max(1, min(b.size, int(max_lag_s * analysis_rate)))]
    lag = int(np.argmax(corr))
    seg = b[lag:lag + a.size]
    denom = np.sqrt(np.sum(a[:seg.size] ** 2) * np.sum(seg ** 2)) or 1.0
    return lag / analysis_rate, float(np.dot(a[:seg.size], seg) / denom)


def audio_lag_by_window(sent: np.ndarray, received: np.ndarray, rate: int = SAMPLE_RATE, window_s: float = 0.5,
                        min_rms: float = 0.01, max_lag_s: float = 6.0) -> list[tuple[float, float, float]]:
    """`audio_lag` for each speech window of `sent` (RMS >= min_rms): [(window start s, lag s, corr)].

    Per window, because an underrun (a repeated frame with silence) shifts everything after it by
    1/fps: one global lag cannot fit a whole call, while each window still matches closely.
    """
    out = []
    n = int(window_s * rate)
    for start in range(0, sent.size - n + 1, n):
        seg = sent[start:start + n]
        if np.sqrt(np.mean(seg.astype(np.float64) ** 2)) < min_rms:
            continue
        lag, corr = audio_lag(seg, received, rate, max_lag_s=start / rate + max_lag_s)
        out.append((start / rate, lag - start / rate, corr))
    return out
