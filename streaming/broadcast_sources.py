"""What a broadcast streams: a live call's output, or an engine session driven by an audio file or URL.

    frames = pacer_frames(peer.pacer)                        # a live call: what its WebRTC tracks send
    await broadcaster.run(frames)

    probe_audio(source, policy)                              # fail early: refused, missing, not audio, bad URL
    session = backend.open(avatar, emotion)                  # a realtime engine session (48 kHz out)
    await broadcast_audio(broadcaster, session, AudioDriver(session, source, policy=policy))

A dialogue (a session with several speakers, one per face) takes one driver per speaker
(`AudioDriver(session, a, speakers=(0,))`, `AudioDriver(session, b, speakers=(1,))`), or one
multi-channel source whose channel i drives speaker i (`speakers=(0, 1)`). A source that ends before
the others goes silent at the same pace, so its face rests while the other talks.

`AudioDriver` decodes with PyAV chunk by chunk (files and http(s) streams alike; memory stays bounded)
and pushes at the source's own rate (the session resamples) at the wall-clock pace, `lead_s` ahead,
then silence, so the session keeps producing idle frames at 25 fps. What may be read is the policy's
call (streaming/source_policy.py): the command line reads anything, the admin API only its media
folder and the URLs its settings allow. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol, Sequence

import av
import numpy as np

from audio.pcm import MEDIA_SAMPLE_RATE
from audio.resample import PcmFormat, pcm_from_av_frame
from avatar.types import AvatarFrame, SessionItem
from streaming.broadcast import Broadcaster
from streaming.pacer import Pacer, PacerClosed
from streaming.source_policy import FETCH_ERRORS, TRUSTED, AudioSource, AudioSourceError, SourcePolicy

__all__ = [
    "TRUSTED",
    "AudioDriver",
    "AudioSourceError",
    "SourcePolicy",
    "broadcast_audio",
    "check_audio_source",
    "decode_audio",
    "pacer_frames",
    "probe_audio",
    "split_channels",
]


# ---- a live call ------------------------------------------------------------------------------------------
async def pacer_frames(pacer: Pacer, delay_frames: int = 2) -> AsyncIterator[AvatarFrame]:
    """A live call's output as frames: slot k of its pacer, read `delay_frames` after it is due (by then
    its WebRTC tracks have resolved it, so this reads the same pictures and samples they send). Ends
    when the call closes. A reader that falls behind jumps to the present."""
    clock = pacer.clock
    try:
        await pacer.wait_started()
    except PacerClosed:
        return
    k = max(0, clock.video_slot_at(clock.now()) - delay_frames)
    while True:
        await clock.sleep_until(clock.video_due(k + delay_frames))
        k = max(k, clock.video_slot_at(clock.now()) - delay_frames - pacer.options.max_lag_frames)
        try:
            slot = pacer.slot(k)
        except PacerClosed:
            return
        yield AvatarFrame(video=slot.video, audio=slot.audio.astype(np.float32) / 32768.0,
                          sample_rate=clock.sample_rate, pts=k, fps=clock.fps, idle=slot.repeated)
        k += 1


# ---- an audio file or URL ---------------------------------------------------------------------------------
class PushTarget(Protocol):
    """What the audio driver needs from a session (avatar.session.AvatarSession)."""

    def push_audio(self, pcm: np.ndarray, sample_rate: int, speaker: int = 0, channels: int = 1,
                   layout: str = "interleaved") -> None: ...

    def end_segment(self) -> None: ...


def check_audio_source(source: str | AudioSource, policy: SourcePolicy = TRUSTED) -> AudioSource:
    """The source if `policy` may read it (opens nothing, looks no name up); AudioSourceError otherwise."""
    return source if isinstance(source, AudioSource) else policy.check(source)


def decode_audio(source: AudioSource, policy: SourcePolicy = TRUSTED) -> Iterator[tuple[np.ndarray, PcmFormat, int]]:
    """Decode a file or URL chunk by chunk at its own rate and layout (the session resamples):
    (pcm, its format, samples per channel). Blocking: run it on a thread."""
    with policy.open(source) as media:
        try:
            container = av.open(media.target, options=media.options)
        except (av.error.FFmpegError, OSError, EOFError, *FETCH_ERRORS) as exc:
            raise policy.media_error(source, "", exc) from None
        with container:
            if not container.streams.audio:
                raise AudioSourceError(source.given, "it has no audio stream")
            try:
                for frame in container.decode(container.streams.audio[0]):
                    pcm, fmt = pcm_from_av_frame(frame)
                    yield pcm, fmt, frame.samples
            except (av.error.FFmpegError, OSError, EOFError, *FETCH_ERRORS) as exc:
                raise policy.media_error(source, "decoding failed: ", exc) from None
            except ValueError as exc:  # a sample rate outside 8-96 kHz
                raise AudioSourceError(source.given, str(exc)) from None


def split_channels(pcm: np.ndarray, fmt: PcmFormat) -> list[np.ndarray]:
    """One chunk of `fmt.channels`-channel PCM -> one array per channel (same dtype, same rate)."""
    x = np.asarray(pcm)
    c = fmt.channels
    if c == 1:
        return [x.reshape(-1)]
    frames = x if fmt.layout == "planar" else x.reshape(-1, c).T  # (C, N)
    if frames.shape[0] != c:
        raise ValueError(f"planar {c}-channel PCM must have shape ({c}, num_samples), got {x.shape}")
    return [np.ascontiguousarray(ch) for ch in frames]


class AudioDriver:
    """Feeds an audio file or URL into a session like a microphone: at the wall-clock pace, `lead_s`
    ahead (so generation has its audio before the frames are due); then silence, at the same pace, so
    the session keeps making idle frames. `loop_audio` plays the source again at its end. Every
    play opens the source again under `policy`. `speakers`: whose voice it is (one speaker: all its
    channels mixed), or one speaker per channel of a multi-channel source."""

    def __init__(self, session: PushTarget, source: str | AudioSource, *, policy: SourcePolicy = TRUSTED,
                 loop_audio: bool = False, lead_s: float = 1.0, speakers: tuple[int, ...] = (0,),
                 now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not speakers:
            raise ValueError("an audio driver drives at least one speaker")
        self.session, self.policy, self.source = session, policy, check_audio_source(source, policy)
        self.loop_audio, self.lead_s, self.speakers = loop_audio, lead_s, tuple(speakers)
        self._now, self._sleep = now, sleep
        self.pushed_s = 0.0  # audio (file and silence) pushed into the session
        self.silence_s = 0.0
        self.plays = 0  # completed passes over the source
        self._t0: float | None = None

    def _ahead_s(self) -> float:
        """How far the pushed audio runs ahead of the wall clock."""
        assert self._t0 is not None
        return self.pushed_s - (self._now() - self._t0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = self._now()
        rate = MEDIA_SAMPLE_RATE
        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="broadcast-audio")
        try:
            while True:
                chunks, played = decode_audio(self.source, self.policy), 0
                try:
                    while (chunk := await loop.run_in_executor(reader, next, chunks, None)) is not None:
                        pcm, fmt, samples = chunk
                        seconds = samples / fmt.sample_rate  # after this push: at most lead_s ahead
                        while self._ahead_s() > 0 and self._ahead_s() + seconds > self.lead_s:
                            await self._sleep(0.01)
                        if not self._push(pcm, fmt, samples):
                            return
                        rate, played = fmt.sample_rate, played + samples
                finally:
                    reader.submit(chunks.close)  # on the reader thread: never while it is decoding
                self.plays += 1
                self.session.end_segment()
                if not self.loop_audio or played == 0:
                    break
        finally:
            reader.shutdown(wait=False)  # a cancelled driver does not wait for a slow URL
        # then silence at the source's rate, topped up every 20 ms to the same lead
        while True:
            gap = int((self.lead_s - self._ahead_s()) * rate)
            if gap > 0 and not self._push(np.zeros(gap, np.float32), PcmFormat(rate), gap, silence=True):
                return
            await self._sleep(0.02)

    def _push(self, pcm: np.ndarray, fmt: PcmFormat, samples: int, silence: bool = False) -> bool:
        try:
            if len(self.speakers) == 1:
                self.session.push_audio(pcm, fmt.sample_rate, speaker=self.speakers[0], channels=fmt.channels,
                                        layout=fmt.layout)
            else:
                channels = split_channels(pcm, fmt) if not silence else [pcm] * len(self.speakers)
                if len(channels) != len(self.speakers):
                    raise AudioSourceError(self.source.given, f"it has {len(channels)} channels, not one for each "
                                                              f"of the {len(self.speakers)} speakers")
                for speaker, channel in zip(self.speakers, channels):
                    self.session.push_audio(channel, fmt.sample_rate, speaker=speaker)
        except RuntimeError:  # the session closed: nothing left to drive
            return False
        self.pushed_s += samples / fmt.sample_rate
        if silence:
            self.silence_s += samples / fmt.sample_rate
        return True


def probe_audio(source: str | AudioSource, policy: SourcePolicy = TRUSTED) -> PcmFormat:
    """Open the source and decode its first chunk (blocking): the format, or AudioSourceError."""
    checked = check_audio_source(source, policy)
    chunks = decode_audio(checked, policy)
    try:
        first = next(chunks, None)
    finally:
        chunks.close()
    if first is None:
        raise AudioSourceError(checked.given, "it decodes to no audio")
    return first[1]


class Session(PushTarget, Protocol):
    def close(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[SessionItem]: ...


async def broadcast_audio(broadcaster: Broadcaster, session: Session,
                          driver: AudioDriver | Sequence[AudioDriver]) -> dict[str, Any]:
    """Drive `session` with `driver` (or one driver per speaker) while `broadcaster` streams it; a driver
    failure fails the broadcast. The session is closed at the end. Returns the broadcaster's final snapshot."""
    drivers = [driver] if isinstance(driver, AudioDriver) else list(driver)
    loop = asyncio.get_running_loop()
    drives = [loop.create_task(d.run(), name=f"broadcast-audio-{i}") for i, d in enumerate(drivers)]

    def driver_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            broadcaster.fail(str(task.exception()))

    for drive in drives:
        drive.add_done_callback(driver_done)
    try:
        return await broadcaster.run(session)
    finally:
        for drive in drives:
            drive.remove_done_callback(driver_done)
            drive.cancel()
        await asyncio.gather(*drives, return_exceptions=True)
        session.close()
