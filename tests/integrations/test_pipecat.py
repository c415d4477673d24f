"""avatarcast as a Pipecat video service, with the real library: `run_test` pipelines for frame order,
interruption and bad input, and a full pipeline (speech -> our service -> SmallWebRTCTransport output)
to an aiortc client on 127.0.0.1, measured from what the client receives. TINY engine."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from app.integrations.loopback import CODE_STEP, EnvelopeMarkedSource, pipecat_loopback, tts_frames  # noqa: E402
from app.integrations.pipecat import AvatarcastVideoService  # noqa: E402
from helpers import until  # noqa: E402

pytestmark = pytest.mark.timeout(180)
BLOCK_FRAMES = 12  # one TINY causal block


def media(frames) -> list:
    """The frames that matter here, in order (metadata and the like dropped)."""
    kinds = (TTSStartedFrame, TTSStoppedFrame, OutputAudioRawFrame, OutputImageRawFrame, InterruptionFrame)
    return [f for f in frames if isinstance(f, kinds)]


def speech_frames(frames) -> list[TTSAudioRawFrame]:
    return [f for f in frames if isinstance(f, TTSAudioRawFrame)]


def check_pairs(frames) -> None:
    """Every image comes right after its own 1/25 s of audio (speech, or silence between turns)."""
    out = [f for f in frames if isinstance(f, (OutputAudioRawFrame, OutputImageRawFrame))]
    assert out, "no frames"
    for i, f in enumerate(out):
        if isinstance(f, OutputImageRawFrame):
            assert i > 0 and isinstance(out[i - 1], OutputAudioRawFrame), f"image {i} without its audio"
            assert f.size == (32, 32) and f.format == "RGB" and len(f.image) == 32 * 32 * 3 and f.sync_with_audio
        else:
            assert i + 1 < len(out) and isinstance(out[i + 1], OutputImageRawFrame), f"audio {i} without its image"


@pytest.mark.parametrize("tts_rate, out_rate", [(16_000, 24_000), (22_050, 48_000)])
async def test_a_turn_comes_out_as_paired_frames_then_tts_stopped(source, speech16k, tts_rate, out_rate):
    from audio.resample import PcmFormat, resample_audio

    turn = resample_audio(speech16k[int(0.3 * 16_000):int(0.9 * 16_000)], PcmFormat(16_000), out_rate=tts_rate)
    service = AvatarcastVideoService(source)
    down, up = await run_test(service, frames_to_send=[SleepFrame(0.5), *tts_frames(turn, tts_rate), SleepFrame(0.3)],
                              pipeline_params=PipelineParams(audio_out_sample_rate=out_rate))
    frames = media(down)
    assert not [f for f in up if isinstance(f, ErrorFrame)], up
    check_pairs(frames)
    speech = speech_frames(frames)
    # 0.6 s of speech at any TTS rate -> 15 frames' worth at the pipeline's rate (+1 where the turn starts
    # inside a frame), each exactly 1/25 s
    assert 15 <= len(speech) <= 17, len(speech)
    assert all(f.sample_rate == out_rate and f.num_frames == out_rate // 25 and f.num_channels == 1 for f in speech)
    kinds = [type(f) for f in frames]
    started, stopped = kinds.index(TTSStartedFrame), kinds.index(TTSStoppedFrame)
    first_speech, last_speech = frames.index(speech[0]), frames.index(speech[-1])
    assert started < first_speech and last_speech + 1 < stopped  # stopped after the last speech frame's image
    assert not speech_frames(frames[stopped:]) and kinds.count(TTSStoppedFrame) == 1
    idle = [f for f in frames[:first_speech] if type(f) is OutputAudioRawFrame]
    assert len(idle) >= 5 and all(not any(f.audio) for f in idle)  # idle frames before the turn: silence
    heard = np.concatenate([np.frombuffer(f.audio, np.int16) for f in speech]).astype(np.float32) / 32768
    assert abs(np.sqrt(np.mean(heard ** 2)) / np.sqrt(np.mean(turn ** 2)) - 1) < 0.1  # the turn's sound


async def test_interruption_drops_the_rest_of_the_turn_and_the_next_turn_plays(source, speech16k):
    service = AvatarcastVideoService(source)
    # 34.6 s (864 frames) produced at once, as a TTS does; nothing here paces the output, so the engine
    # runs ahead as fast as the CPU allows: the turn is long enough that no CPU plays it all in 2.5 s
    turn = np.tile(speech16k, 4)
    first = tts_frames(turn, 16_000)
    second = tts_frames(speech16k[int(0.3 * 16_000):int(0.7 * 16_000)], 16_000)
    down, up = await run_test(service, frames_to_send=[*first, SleepFrame(2.5), InterruptionFrame(), SleepFrame(1.0),
                                                       *second, SleepFrame(0.3)])
    frames = media(down)
    assert not [f for f in up if isinstance(f, ErrorFrame)], up
    check_pairs(frames)
    kinds = [type(f) for f in frames]
    cut = kinds.index(InterruptionFrame)
    restart = cut + kinds[cut:].index(TTSStartedFrame)
    before, between, after = (speech_frames(frames[:cut]), speech_frames(frames[cut:restart]),
                              speech_frames(frames[restart:]))
    turn_frames = turn.size * 25 // 16_000
    assert 10 <= len(before) < turn_frames - 4 * BLOCK_FRAMES, len(before)  # playing, and cut before its end
    assert len(between) <= BLOCK_FRAMES, len(between)  # speech stops within one block of the interruption
    assert 10 <= len(after) <= 12  # the second turn, whole
    assert kinds.count(TTSStoppedFrame) == 1 and kinds.index(TTSStoppedFrame) > restart  # only the second's
    assert service.session is None  # EndFrame closed it


async def test_bad_rates_are_reported_and_a_failed_session_errors_instead_of_hanging(source, speech16k):
    service = AvatarcastVideoService(source)
    bad = [TTSStartedFrame(), TTSAudioRawFrame(np.zeros(40, np.int16).tobytes(), 4_000, 1), TTSStoppedFrame()]
    ok = tts_frames(speech16k[int(0.3 * 16_000):int(0.5 * 16_000)], 16_000)
    down, up = await run_test(service, frames_to_send=[SleepFrame(0.3), *bad, *ok, SleepFrame(0.3)])
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "4000 Hz is outside" in errors[0]  # said, not guessed at
    assert 5 <= len(speech_frames(down)) <= 6  # and the pipeline went on: the good turn played

    service = AvatarcastVideoService(source)
    loop = asyncio.get_running_loop()
    loop.call_later(0.6, lambda: service.session.fail("decoder ran out of memory"))  # what the engine does
    t0 = time.monotonic()
    down, up = await run_test(service, frames_to_send=[SleepFrame(1.0), *ok, SleepFrame(0.2)])
    assert time.monotonic() - t0 < 10  # the EndFrame did not wait for frames that will never come
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert any("session failed: decoder ran out of memory" in e for e in errors), errors
    assert sum("dropped: the session failed" in e for e in errors) == 1, errors  # said once, not per frame
    assert not speech_frames(down)


@pytest.mark.slow
async def test_speech_to_a_webrtc_client_in_sync_at_frame_rate_and_interrupted_promptly(source, speech16k):
    """Speech -> our service -> SmallWebRTCTransport -> an aiortc client on 127.0.0.1. Each frame's picture
    is painted from its own audio (loopback.py), so the client can tell how far apart a frame's picture and
    sound arrive."""
    async with pipecat_loopback(EnvelopeMarkedSource(source)) as (worker, service, client):
        got = client.received
        await until(lambda: len(got.video) >= 25, 30, "idle video at the client")
        t_speak = time.monotonic()
        await worker.queue_frames(tts_frames(speech16k[:16_000 * 5], 16_000))
        await until(lambda: got.audio and got.speech_until(t_speak) > t_speak, 15, "speech at the client")
        await asyncio.sleep(5.5)
        fps, fresh = got.fps(start=t_speak), got.fresh_fps(start=t_speak)
        lag_ms, corr = got.av_lag_ms()

        await worker.queue_frames(tts_frames(speech16k[:16_000 * 5], 16_000))
        await until(lambda: got.speech_until(time.monotonic() - 0.3) > time.monotonic() - 0.3, 15, "the next turn")
        await asyncio.sleep(1.0)
        t_cut = time.monotonic()
        cut_while_speaking = got.loud_between(t_cut - 0.3, t_cut)
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(2.0)
        stopped_after = got.speech_until(t_cut) - t_cut
        # new pictures of loud frames: a picture the transport redraws while the session catches up after the
        # barge-in is the last one held, not a speech frame made after the cut
        bright = [t for (t, left, code), (_, _, before) in zip(got.video[1:], got.video[:-1])
                  if t > t_cut and left > 40 and abs(code - before) > CODE_STEP / 4]
        picture_after = (max(bright) - t_cut) if bright else 0.0

    print(f"\npipecat loopback: {fps:.1f} fps received, {fresh:.1f} new pictures/s, A/V lag {lag_ms:+.0f} ms "
          f"(corr {corr:.2f}), speech stopped {1000 * stopped_after:.0f} ms and its pictures "
          f"{1000 * picture_after:.0f} ms after the interruption")
    assert got.audio_rate == 48_000
    # the transport draws at 30 (see pipecat.py), 25 of them new pictures when the CPU keeps up: how close a
    # busy machine gets is the benchmark's number (benchmarks/bench_agents.py); here, that it runs at all
    assert 15.0 <= fps <= 32.0 and 10.0 <= fresh <= 26.0, (fps, fresh)
    assert corr >= 0.6 and abs(lag_ms) <= 40, (lag_ms, corr)
    assert cut_while_speaking >= 5  # it was speaking when cut
    assert stopped_after <= 0.3 and picture_after <= 0.3, (stopped_after, picture_after)


def test_the_lag_estimate_finds_a_known_offset():
    """The A/V lag estimate on a made-up stream whose pictures arrive 60 ms after their sound."""
    from app.integrations.loopback import Received

    rng = np.random.default_rng(0)
    loudness = np.repeat(np.abs(rng.standard_normal(150)) * (rng.random(150) > 0.3), 2)  # per 20 ms packet
    got = Received(audio=[(0.02 * i, float(x)) for i, x in enumerate(loudness)])
    got.video = [(0.04 * k + 0.06, float(loudness[2 * k:2 * k + 2].mean() * 200), 0.0) for k in range(150)]
    lag, corr = got.av_lag_ms()
    assert abs(lag - 60) <= 10 and corr > 0.8, (lag, corr)
    got.video = [(t - 0.12, b, c) for t, b, c in got.video]  # now 60 ms early
    assert abs(got.av_lag_ms()[0] + 60) <= 10


@pytest.mark.slow
async def test_the_service_runs_the_same_on_serve_engine_workers(speech16k):
    """The adapter only speaks the session contract, so `avatarcast serve`'s engine worker processes (the
    sessions cross a process boundary) drive it exactly as the in-process engine does."""
    from app.integrations.source import WorkerPoolSource
    from app.workers.engine_worker import WorkerSpec
    from app.workers.pool import PoolOptions, WorkerPool

    pool = WorkerPool(WorkerSpec(model="tiny", max_sessions=1, threads=1, decoder="torch", heartbeat_s=0.25),
                      PoolOptions(workers=1))
    await asyncio.wait_for(pool.start(), 120)
    try:
        source = WorkerPoolSource(pool)
        with pytest.raises(ValueError, match="48000 Hz audio"):
            source.open(24_000)
        turn = speech16k[int(0.3 * 16_000):int(0.9 * 16_000)]
        down, up = await run_test(AvatarcastVideoService(source),
                                  frames_to_send=[SleepFrame(0.5), *tts_frames(turn, 16_000), SleepFrame(0.3)],
                                  pipeline_params=PipelineParams(audio_out_sample_rate=48_000))
    finally:
        await pool.stop()
    frames = media(down)
    assert not [f for f in up if isinstance(f, ErrorFrame)], up
    check_pairs(frames)
    speech = speech_frames(frames)
    assert 15 <= len(speech) <= 17 and all(f.sample_rate == 48_000 and f.num_frames == 1920 for f in speech)
    kinds = [type(f) for f in frames]
    assert kinds.index(TTSStoppedFrame) > frames.index(speech[-1])


def load_example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_readme_example_renders_a_speech_file_to_mp4(tmp_path, speech16k, source):
    """examples/pipecat_pipeline.py as the README runs it: speech file -> our service -> mp4 with the speech."""
    import soundfile as sf

    from audio.resample import PcmFormat, resample_audio
    from streaming.filesink import probe_media
    from streaming.webrtc.testing import audio_lag

    example = load_example("pipecat_pipeline")
    speech = speech16k[:int(2.0 * 16_000)]
    sf.write(tmp_path / "speech.wav", speech, 16_000)
    frames = await asyncio.wait_for(example.render(str(tmp_path / "speech.wav"), str(tmp_path / "avatar.mp4"),
                                                   model="tiny"), 120)
    media_info = probe_media(tmp_path / "avatar.mp4")
    assert frames == media_info["video_frames"] >= 50 and media_info["video_size"][:2] == (32, 32)
    assert media_info["audio_rate"] == 24_000 and abs(media_info["duration_s"] - frames / 25) < 0.1

    _, corr = audio_lag(resample_audio(speech, PcmFormat(16_000), out_rate=24_000), media_info["audio"], rate=24_000)
    assert corr > 0.8, corr  # the speech is in the file (AAC-coded)
    params = example.video_params(AvatarcastVideoService(source))  # what its docstring tells a transport
    assert (params["video_out_width"], params["video_out_height"], params["video_out_is_live"]) == (32, 32, False)
