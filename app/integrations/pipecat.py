"""avatarcast as a Pipecat video service: a frame processor placed after TTS.

    pipeline = Pipeline([..., tts, AvatarcastVideoService(EngineSource.load()), transport.output()])

It consumes `TTSAudioRawFrame`s and emits, for every video frame, the `TTSAudioRawFrame` carrying that
frame's 1/25 s of the same speech (re-timed: cut at frame boundaries, at the pipeline's output rate)
and then the frame's `OutputImageRawFrame`. Between turns the session keeps producing idle images, each
with its 1/25 s of silence as plain output audio (not bot speech). `TTSStoppedFrame` ends the session's
segment and is passed on after that segment's last frame; `InterruptionFrame` interrupts the session (its
unsent speech frames are dropped) and is passed on at once; Start/End/Cancel open and close the session.

Sync: images are marked `sync_with_audio`, so the output transport queues them with the audio and shows
each one once the audio before it has been handed to its track. The audio then still has to be
packetised (20 ms Opus packets) while a picture goes out at the next video tick, so an image follows its
own audio in the queue: on a SmallWebRTC loopback that puts picture and sound within about 15 ms,
where image-first shows the picture about 45 ms early (tests/integrations/test_pipecat.py measures it).
Transport settings for this: `video_out_enabled=True`, `video_out_is_live=False` (the transport shows the
latest image), `video_out_framerate=30` (its drawing loop sleeps a full period after each draw, so at 25
it runs at about 22 and skips images), `video_out_width/height` = `service.format`, and no
`audio_out_sample_rate` other than the pipeline's (the frames must not be re-chunked by a resampler).
"""

from __future__ import annotations

import asyncio
import logging

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputAudioRawFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ImportError as exc:  # the core installs without the framework
    raise ImportError("the Pipecat adapter needs the pipecat extra: pip install 'avatarcast[pipecat]'") from exc

from app.integrations.source import AvatarFormat, SessionSource, mono_from_pcm16, pcm16
from avatar.types import AvatarFrame, AvatarSessionProtocol, SegmentEnd, SessionError

log = logging.getLogger(__name__)


class AvatarcastVideoService(AIService):
    """Turns TTS audio into avatar video and re-timed audio, one session per pipeline run."""

    def __init__(self, source: SessionSource, *, end_timeout_s: float = 30.0, **kwargs) -> None:
        """`source`: where sessions come from (`EngineSource` for an in-process engine);
        `end_timeout_s`: how long an EndFrame waits for the speech still being generated."""
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self.source = source
        self.end_timeout_s = end_timeout_s
        self.session: AvatarSessionProtocol | None = None
        self._sample_rate: int | None = None
        self._output_task: asyncio.Task | None = None
        self._segment = 0  # the session's current segment (one per end_segment)
        self._contexts: dict[int, str | None] = {}  # segment -> TTS context id of its audio
        self._held_stops: list[TTSStoppedFrame] = []  # passed on with their segment's last frame
        self._interrupts = 0
        self._ended: str | None = None  # why the session stopped producing (failed, closed)
        self._reported: str | None = None  # the last reason reported for dropping frames
        self._segments_done = asyncio.Event()
        self.frames_out = 0
        self.speech_frames_out = 0

    @property
    def format(self) -> AvatarFormat:
        """The video this service emits (the transport's `video_out_width/height`)."""
        return self.source.format

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        self._sample_rate = setup.audio_out_sample_rate  # frames carry audio at the rate the transport plays

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        try:
            self.session = self.source.open(self._sample_rate)
        except Exception as exc:  # noqa: BLE001 - engine full, a bad rate: the pipeline hears why
            await self.push_error(f"avatarcast: cannot open a session: {exc}", exception=exc,
                                  force_treat_as_permanent=True)

    async def stop(self, frame: EndFrame) -> None:
        """Graceful end: the speech already received is generated and passed on, then the session closes."""
        await super().stop(frame)
        if self._held_stops and self.session is not None:
            self._segments_done.clear()
            try:
                await asyncio.wait_for(self._segments_done.wait(), self.end_timeout_s)
            except asyncio.TimeoutError:
                log.warning("avatarcast: %d segment(s) unfinished after %.0f s; ending anyway",
                            len(self._held_stops), self.end_timeout_s)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        if self._output_task is not None:
            await self.cancel_task(self._output_task)
            self._output_task = None
        if self.session is not None:
            self.session.close()
            self.session = None

    # ---- frames in --------------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if self.session is not None:
                self._output_task = self.create_task(self._forward_frames())
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._push_speech(frame)  # replaced by the re-timed audio of the frames that carry it
        elif isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            if await self._check_open(frame):
                self.session.end_segment()
                self._segment += 1
                self._held_stops.append(frame)
        elif isinstance(frame, InterruptionFrame):
            if self.session is not None:
                self.session.interrupt()
            self._interrupts += 1
            self._held_stops.clear()  # their segments will not be played to the end
            self._segments_done.set()
            await self.push_frame(frame, direction)
        else:
            if isinstance(frame, TTSStartedFrame):
                self._contexts[self._segment] = frame.context_id
            await self.push_frame(frame, direction)

    async def _push_speech(self, frame: TTSAudioRawFrame) -> None:
        if not await self._check_open(frame):
            return
        try:
            pcm = mono_from_pcm16(frame.audio, frame.sample_rate, frame.num_channels)
        except ValueError as exc:  # an impossible rate or a torn frame: report it, keep the pipeline
            await self.push_error(f"avatarcast: unusable TTS audio ({exc})", exception=exc)
            return
        self._contexts.setdefault(self._segment, frame.context_id)
        try:
            self.session.push_audio(pcm, frame.sample_rate)  # any rate 8-96 kHz: the session resamples
        except RuntimeError as exc:  # the session closed under us (engine stopped, session failed)
            self._session_ended(f"the session was closed ({exc})")
            await self._check_open(frame)

    async def _check_open(self, frame: Frame) -> bool:
        """Whether there is a session to take `frame`; if not, say why once and drop it (and the rest)."""
        if self.session is not None and self._ended is None:
            return True
        why = self._ended or "no open session (before StartFrame or after EndFrame)"
        if why != self._reported:
            self._reported = why
            await self.push_error(f"avatarcast: {frame.name} dropped: {why}", force_treat_as_permanent=True)
        else:
            log.debug("avatarcast: %s dropped: %s", frame.name, why)
        return False

    # ---- frames out -------------------------------------------------------------------------------------
    async def _forward_frames(self) -> None:
        """The session's frames, in order, as re-timed audio + image; segment ends release TTSStoppedFrame."""
        assert self.session is not None
        w, h = self.source.format.width, self.source.format.height
        async for item in self.session:
            interrupts = self._interrupts
            if isinstance(item, AvatarFrame):
                if item.idle:  # silence (plain output audio: not bot speech) keeps the audio queue in step
                    audio = OutputAudioRawFrame(audio=bytes(2 * item.audio.size), sample_rate=item.sample_rate,
                                                num_channels=1)
                else:
                    audio = TTSAudioRawFrame(audio=pcm16(item.audio).tobytes(), sample_rate=item.sample_rate,
                                             num_channels=1, context_id=self._contexts.get(item.segment))
                image = OutputImageRawFrame(image=item.video.tobytes(), size=(w, h), format="RGB")
                image.sync_with_audio = True
                await self.push_frame(audio)
                if interrupts != self._interrupts and not item.idle:
                    continue  # the turn was cut while its sound went out: its picture goes with it
                await self.push_frame(image)
                self.frames_out += 1
                self.speech_frames_out += not item.idle
            elif isinstance(item, SegmentEnd):
                self._contexts.pop(item.segment, None)
                if self._held_stops:
                    await self.push_frame(self._held_stops.pop(0))
                if not self._held_stops:
                    self._segments_done.set()
            elif isinstance(item, SessionError):
                self._session_ended(f"the session failed: {item.message}")
                await self.push_error(f"avatarcast session failed: {item.message}", force_treat_as_permanent=True)
                return
        self._session_ended("the session was closed")

    def _session_ended(self, why: str) -> None:
        self._ended = why
        self._held_stops.clear()  # no frames will come to release them
        self._segments_done.set()
