"""A Pipecat pipeline with an avatarcast avatar, offline: a speech file stands in for the TTS, the avatar
(its pictures and the re-timed speech) is recorded to an mp4.

    pip install 'avatarcast[pipecat]'
    python examples/pipecat_pipeline.py speech.wav avatar.mp4 [--model tiny]

In a voice agent, put the service right after the TTS and before the transport's output:

    Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts,
              AvatarcastVideoService(source), transport.output(), context_aggregator.assistant()])

with the transport's video settings from `video_params(service)`.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
from pipecat.frames.frames import (EndFrame, Frame, OutputAudioRawFrame, OutputImageRawFrame, TTSAudioRawFrame,
                                   TTSStartedFrame, TTSStoppedFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from app.integrations.pipecat import AvatarcastVideoService
from app.integrations.source import EngineSource, pcm16
from audio.io import read_audio
from avatar.types import AvatarFrame
from streaming.filesink import Mp4FileSink


def video_params(service: AvatarcastVideoService) -> dict:
    """TransportParams fields that play the service's frames in sync (see app/integrations/pipecat.py)."""
    return dict(audio_out_enabled=True, video_out_enabled=True, video_out_is_live=False, video_out_framerate=30,
                video_out_width=service.format.width, video_out_height=service.format.height)


def speech_frames(path: str, rate: int = 16_000) -> list[Frame]:
    """A speech file as a TTS service would send it: started, 20 ms chunks, stopped."""
    pcm = pcm16(read_audio(path, sample_rate=rate))
    n = rate // 50
    return [TTSStartedFrame(), *(TTSAudioRawFrame(pcm[i:i + n].tobytes(), rate, 1) for i in range(0, pcm.size, n)),
            TTSStoppedFrame()]


class Mp4Recorder(FrameProcessor):
    """Where a transport would be: writes each image with the audio that came just before it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.sink, self.frames, self.pending = Mp4FileSink(path), 0, []
        self.spoken = asyncio.Event()  # the turn's TTSStoppedFrame came through, after its last frame

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame):
            self.pending.append(frame)
        elif isinstance(frame, OutputImageRawFrame):
            audio = np.frombuffer(b"".join(a.audio for a in self.pending), np.int16).astype(np.float32) / 32768
            w, h = frame.size
            self.sink.write(AvatarFrame(video=np.frombuffer(frame.image, np.uint8).reshape(h, w, 3), audio=audio,
                                        sample_rate=self.pending[0].sample_rate, pts=self.frames))
            self.frames, self.pending = self.frames + 1, []
        elif isinstance(frame, TTSStoppedFrame):
            self.spoken.set()
        elif isinstance(frame, EndFrame):
            self.sink.close()
        await self.push_frame(frame, direction)


async def render(speech: str, out: str, model: str = "auto", rate: int = 24_000) -> int:
    """speech file -> avatar service -> mp4; returns the frames written."""
    with EngineSource.load(model) as source:
        recorder = Mp4Recorder(out)
        worker = PipelineWorker(Pipeline([AvatarcastVideoService(source), recorder]), idle_timeout_secs=None,
                                params=PipelineParams(audio_out_sample_rate=rate))
        started = asyncio.Event()
        worker.event_handler("on_pipeline_started")(lambda *_: started.set())
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        run = asyncio.ensure_future(runner.run())
        await started.wait()
        await worker.queue_frames(speech_frames(speech))
        await recorder.spoken.wait()
        await worker.queue_frame(EndFrame())
        await run
    return recorder.frames


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("speech")
    parser.add_argument("out")
    parser.add_argument("--model", default="auto", help="auto | demo | tiny")
    args = parser.parse_args()
    print(f"{asyncio.run(render(args.speech, args.out, args.model))} frames -> {args.out}")
