"""The shipped demo model end to end: held-out identities speak held-out audio through the real engine
(ONNX decode, KV-cache streaming), and their mouths follow the teacher's for that audio."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.render_worker import demo_model_available

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="app/demo_model weights are not in the tree")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "speech_en_us_male.wav"
# What the aiortc client's receive jitter buffers add before a frame reaches the test (aiortc's
# rtcrtpreceiver / jitterbuffer): an audio packet is released once 4 later 20 ms packets have arrived,
# a video frame once the next frame's first packet has. Arrival times are corrected by these holds.
AIORTC_AUDIO_HOLD_S = 4 * 0.020
AIORTC_VIDEO_HOLD_S = 1 / 25
LIPSYNC_R = 0.7  # the targets
IDENTITY_DB = 24.0


@pytest.fixture(scope="module")
def generated():
    """The evaluation's held-out identities, each speaking the fixture (speech no clip was made from)."""
    from app.render_worker import load_models
    from audio.io import read_audio
    from training.dataset import make_clip
    from training.evaluate import EvalConfig, avatar_conditions, _engine, run_session

    speech = read_audio(FIXTURE)[: 16_000 * 4]
    models = load_models("demo")
    out = []
    with _engine(models) as engine:
        for ident in EvalConfig().identities:
            clip = make_clip(speech, ident, size=tuple(models.frame_hw), blinks=False)
            frames, _ = asyncio.run(run_session(engine, avatar_conditions(engine, clip), clip.audio))
            out.append((frames[: clip.num_frames], clip))
    return out


def test_the_demo_model_lip_syncs_held_out_faces_to_held_out_speech(generated):
    """The issue's metric: mean Pearson r over the held-out identities, lag within one frame."""
    from training.evaluate import lipsync, openings

    scores = [lipsync(openings(frames, clip.mouth_boxes[0, :len(frames)]), clip.states[0, :len(frames), 0])
              for frames, clip in generated]
    rs, lags = [r for r, _ in scores], [lag for _, lag in scores]
    assert np.mean(rs) >= LIPSYNC_R and all(abs(lag) <= 1 for lag in lags), scores


def test_the_demo_model_keeps_the_identity(generated):
    from training.evaluate import mean_psnr

    for frames, clip in generated:
        assert frames.shape[1:] == clip.frames.shape[1:]
    assert np.mean([mean_psnr(frames, clip.frames[: len(frames)]) for frames, clip in generated]) >= IDENTITY_DB


def frame_envelope(audio: np.ndarray, starts_s: np.ndarray, rate: int, window_s: float = 0.04) -> np.ndarray:
    """RMS of `audio` over [t, t + window) for each start time t (the sound a frame shown at t plays with)."""
    out = []
    for t in starts_s:
        a, b = int(round(t * rate)), int(round((t + window_s) * rate))
        seg = audio[max(0, a):max(0, b)]
        out.append(float(np.sqrt(np.mean(seg ** 2))) if seg.size else 0.0)
    return np.array(out)


@pytest.mark.timeout(180)
async def test_a_webrtc_call_with_the_demo_model_keeps_lips_and_audio_in_sync():
    """What the client receives: the lag of the mouth-opening probe behind the received audio's envelope
    equals the teacher's own (opening vs envelope of the same speech) within one frame."""
    from app.avatars import BUILTIN_SEED, EngineBackend, prepare_avatars
    from app.render_worker import load_models
    from audio.io import read_audio
    from audio.resample import PcmFormat, resample_audio
    from avatar.drawn.face import NEUTRAL, Identity, render
    from avatar.engine import AvatarEngine, preset_options
    from avatar.generator import Guidance
    from streaming.webrtc import LiveService, Offer, ServiceOptions
    from streaming.webrtc.testing import LoopbackClient, loopback_candidates_only
    from training.dataset import make_clip
    from training.evaluate import lipsync, openings

    seconds = 6.0
    speech16 = read_audio(FIXTURE)[: int(16_000 * seconds)]
    speech48 = resample_audio(speech16, PcmFormat(16_000), out_rate=48_000)
    models = load_models("demo")
    size = tuple(models.frame_hw)
    mouth = np.array(render(Identity.from_seed(BUILTIN_SEED), NEUTRAL, size)[1].mouth_box)
    # the teacher's own lag: its mouth opening against the envelope of the same speech
    teacher = make_clip(speech16, BUILTIN_SEED, size=size, blinks=False)
    n = teacher.num_frames
    t_open = openings(teacher.frames, np.repeat(mouth[None], n, 0))
    t_env = frame_envelope(speech16, np.arange(n) / 25, 16_000)
    r_teacher, lag_teacher = lipsync(t_open, t_env)
    assert r_teacher > 0.5  # the probe and the envelope do see each other on the teacher

    # One DiT pass per step (no audio CFG): this checks the transport's sync, and two peers plus the
    # model share the 2 test cores; CFG's second pass leaves no headroom there, and late frames repeat
    options = preset_options(models.dit.cfg.name, decoder="auto", max_sessions=1)
    options = replace(options, causal=replace(options.causal, guidance=Guidance()))
    with AvatarEngine(models, options) as engine:
        avatars, default = prepare_avatars(engine)
        service = LiveService(EngineBackend(engine, avatars, default, motion=0.0), ServiceOptions(max_sessions=1))
        await service.start()
        client = LoopbackClient(speech48, keep_video=True)
        try:
            with loopback_candidates_only():
                answer = await service.offer(Offer(sdp=await client.offer(), avatar=default))
                await client.accept(answer)
                await asyncio.sleep(seconds + 3.0)
        finally:
            await client.close()
            await service.shutdown()
    audio = client.received_audio()
    # network arrival, on the received audio's clock
    times = (np.array(client.video_times) - AIORTC_VIDEO_HOLD_S) - (client.audio_first_at - AIORTC_AUDIO_HOLD_S)
    keep = (times >= 0) & (times + 0.04 <= audio.size / 48_000)
    frames = np.stack(client.video)[keep]
    # at least half of the 150 frames, enough for the lag estimate: how many a loaded CPU decodes in time is
    # load, not sync (127 here with other work running; the sent rate is bench_live's)
    assert frames.shape[1:3] == size and len(frames) >= 75, len(frames)
    g_open = openings(frames, np.repeat(mouth[None], len(frames), 0))
    g_env = frame_envelope(audio, times[keep], 48_000)
    r, lag = lipsync(g_open, g_env)
    assert r > 0.3 and abs(lag - lag_teacher) <= 1, {"r": r, "lag": lag, "teacher": (r_teacher, lag_teacher)}
