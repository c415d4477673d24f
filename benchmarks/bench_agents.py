"""Voice-agent adapters, measured: frame rate, A/V lag and interruption latency. Prints JSON.

pipecat: speech (TTS-like frames, 16 kHz) -> AvatarcastVideoService -> SmallWebRTCTransport -> an aiortc
client on 127.0.0.1 (app/integrations/loopback.py). Frames received and new pictures per second while
speaking, the lag of each picture behind its own sound as the client receives them (every frame painted
from its own audio's loudness), first frame at the client, and after an InterruptionFrame how long loud
audio and loud pictures still arrive.

livekit: the in-process avatar (QueueAudioOutput + AvatarRunner + AVSynchronizer with our generator) in
a minimal stand-in room (no LiveKit server here). Video frames per second the synchronizer publishes,
time from the first captured TTS frame to playback_started, and after clear_buffer: the time to the
interrupted playback_finished, speech frames still published, and how long the picture holds still
(frames the session made ahead are dropped; idle frames resume where it had got to).

    python -m benchmarks.bench_agents [--model tiny|demo] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio" / "speech_en_us_male.wav"


def _speech(seconds: float) -> np.ndarray:
    from audio.io import read_audio

    x = read_audio(FIXTURE)  # 16 kHz mono
    return np.tile(x, int(np.ceil(seconds * 16_000 / x.size)))[:int(seconds * 16_000)]


async def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the adapter under measurement stopped making progress")
        await asyncio.sleep(0.02)


# ---- pipecat -------------------------------------------------------------------------------------------
async def bench_pipecat(source, seconds: float) -> dict:
    from pipecat.frames.frames import InterruptionFrame

    from app.integrations.loopback import EnvelopeMarkedSource, pipecat_loopback, tts_frames

    speech = _speech(seconds)
    t0 = time.monotonic()
    async with pipecat_loopback(EnvelopeMarkedSource(source)) as (worker, _service, client):
        got = client.received
        await _wait(lambda: got.video, 60)
        first_frame_s = time.monotonic() - t0
        await _wait(lambda: len(got.video) >= 25, 30)
        t_speak = time.monotonic()
        await worker.queue_frames(tts_frames(speech, 16_000))
        await _wait(lambda: got.speech_until(t_speak) > t_speak, 30)
        first_speech_ms = 1000 * (min(t for t, r in got.audio if t > t_speak and r >= 0.02) - t_speak)
        await asyncio.sleep(seconds + 0.5)
        speaking = [v for v in got.video if v[0] >= t_speak]
        fps, fresh = got.fps(start=t_speak), got.fresh_fps(start=t_speak)
        lag_ms, corr = got.av_lag_ms()
        await worker.queue_frames(tts_frames(speech, 16_000))
        await _wait(lambda: got.loud_between(time.monotonic() - 0.3, time.monotonic()) > 0, 30)
        await asyncio.sleep(1.0)
        t_cut = time.monotonic()
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(2.0)
        bright = [t for t, left, _ in got.video if t > t_cut and left > 40]
        return {"fps_received": round(fps, 2), "new_pictures_per_s": round(fresh, 2),
                "frames_while_speaking": len(speaking), "av_lag_ms": lag_ms, "av_lag_correlation": round(corr, 3),
                "first_frame_s": round(first_frame_s, 2), "speech_to_client_ms": round(first_speech_ms),
                "interruption_audio_stops_ms": round(1000 * (got.speech_until(t_cut) - t_cut)),
                "interruption_pictures_stop_ms": round(1000 * ((max(bright) - t_cut) if bright else 0.0))}


# ---- livekit -------------------------------------------------------------------------------------------
class _Room:
    """The least a LiveKit room must offer AvatarRunner: events, connected, publish_track."""

    def __init__(self) -> None:
        from livekit import rtc

        class Publication:
            async def wait_for_subscription(self) -> None:
                return None

        class Participant:
            async def publish_track(self, track, options=None):
                return Publication()

        self.local_participant = Participant()
        self._emitter = rtc.EventEmitter()
        self.on, self.off = self._emitter.on, self._emitter.off

    def isconnected(self) -> bool:
        return True


async def bench_livekit(source, seconds: float) -> dict:
    from livekit import rtc
    from livekit.agents import AgentSession

    from app.integrations.livekit import LocalAvatar
    from app.integrations.source import pcm16

    session = AgentSession()
    avatar = LocalAvatar(source)
    await avatar.start(session, _Room())
    out = session.output.audio
    video: list[float] = []
    audio: list[float] = []
    av_sync = avatar.pipeline.runner.av_sync
    push = av_sync.push

    async def spying_push(frame, timestamp=None):
        (audio if isinstance(frame, rtc.AudioFrame) else video).append(time.monotonic())
        await push(frame, timestamp)

    av_sync.push = spying_push
    events: list[tuple[str, float, bool]] = []
    out.on("playback_started", lambda ev: events.append(("started", time.monotonic(), False)))
    out.on("playback_finished", lambda ev: events.append(("finished", time.monotonic(), ev.interrupted)))

    async def speak(pcm: np.ndarray, flush: bool) -> float:
        t = time.monotonic()
        for i in range(0, pcm.size, 320):
            c = pcm16(pcm[i:i + 320])
            await out.capture_frame(rtc.AudioFrame(c.tobytes(), 16_000, 1, c.size))
        if flush:
            out.flush()
        return t

    try:
        await _wait(lambda: len(video) >= 25, 60)
        t_speak = await speak(_speech(seconds), flush=True)
        await _wait(lambda: any(e[0] == "finished" for e in events), 60 + seconds)
        started = next(e[1] for e in events if e[0] == "started")
        window = [t for t in video if t_speak <= t]
        fps = (len(window) - 1) / (window[-1] - window[0])
        events.clear()
        await speak(_speech(seconds), flush=False)
        await _wait(lambda: events, 30)
        await asyncio.sleep(1.0)
        t_cut = time.monotonic()
        out.flush()
        out.clear_buffer()
        await _wait(lambda: len(events) >= 2, 10)
        finished_ms = 1000 * (events[-1][1] - t_cut)
        await _wait(lambda: sum(t > t_cut for t in video) >= 5, 10)
        hold_ms = 1000 * (min(t for t in video if t > t_cut) - t_cut)
        return {"fps_published": round(fps, 2), "playback_started_ms": round(1000 * (started - t_speak)),
                "interruption_playback_finished_ms": round(finished_ms),
                "speech_frames_after_clear": sum(t > t_cut for t in audio),
                "picture_holds_after_clear_ms": round(hold_ms)}
    finally:
        await avatar.aclose()


async def _run(model: str, seconds: float) -> dict:
    from app.integrations.source import EngineSource

    t = time.perf_counter()
    with EngineSource.load(model) as source:
        load_s = time.perf_counter() - t
        return {"model": source.engine.models.name, "frame": [source.format.width, source.format.height],
                "load_s": round(load_s, 1), "seconds_of_speech": seconds,
                "pipecat": await bench_pipecat(source, seconds), "livekit": await bench_livekit(source, seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Voice-agent adapters: fps, A/V lag, interruption latency.")
    parser.add_argument("--model", default="tiny", help="tiny | demo | auto")
    parser.add_argument("--seconds", type=float, default=6.0, help="speech per turn")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_run(args.model, args.seconds)), indent=2))


if __name__ == "__main__":
    main()
