"""The session contract through the real engine thread, with random TINY models (CPU)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import soxr
import torch

from audio.align import group_by_latent
from avatar.decoder import FrameDecoder
from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
from avatar.generator import CausalGenerator, CausalOptions, Conditions
from avatar.session import SessionOptions
from avatar.types import AvatarFrame, SegmentEnd, SessionError, frames_for_samples

H = W = 32  # pixels -> 4x4 latents -> 2x2 tokens per frame
OPTS = CausalOptions(block_frames=2, sink_frames=1, window_frames=2, steps=(1000, 500))
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle():
    return ModelBundle.random("tiny", "tiny", seed=0)


@pytest.fixture
def engine(bundle):
    eng = AvatarEngine(bundle, EngineOptions(causal=OPTS, max_sessions=3, decoder="torch")).start()
    yield eng
    eng.stop()


def _cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditions(reference=torch.randn(1, 16, 1, H // 8, W // 8, generator=g))


def _speech(seconds, rate, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


async def _collect(session, until_segment_end=True, max_frames=None, timeout=120):
    frames, ends = [], []
    async def run():  # noqa: E306
        async for item in session:
            if isinstance(item, AvatarFrame):
                frames.append(item)
                if max_frames and len(frames) >= max_frames:
                    return
            elif isinstance(item, SegmentEnd):
                ends.append(item)
                if until_segment_end:
                    return
            elif isinstance(item, SessionError):
                raise AssertionError(item.message)
    await asyncio.wait_for(run(), timeout)
    return frames, ends


async def _speak_one_turn(eng: AvatarEngine, seconds: float, seed: int):
    """One utterance through an offline-paced session, checked against the contract every generation
    mode keeps: a frame per 1/25 s of audio, pts 0..n-1, the audio that came in sample for sample."""
    s = eng.open_session(_cond(), SessionOptions(realtime=False))
    pcm = _speech(seconds, 16_000, seed=seed)
    s.push_audio(pcm, 16_000)
    s.end_segment()
    frames, _ = await _collect(s)
    assert len(frames) == frames_for_samples(pcm.size, 16_000, 25)
    assert [f.pts for f in frames] == list(range(len(frames)))
    np.testing.assert_array_equal(np.concatenate([f.audio for f in frames])[:pcm.size], pcm)
    return s


async def test_frames_cover_the_audio_and_carry_it_sample_exact(engine):
    rate = 48_000
    pcm = _speech(0.93, rate)  # not a whole number of frames
    s = engine.open_session(_cond(), SessionOptions(realtime=False))
    for chunk in np.array_split(pcm, 17):  # odd chunk sizes
        s.push_audio((chunk * 32767).astype(np.int16), rate)
    s.end_segment()
    frames, ends = await _collect(s)
    assert len(frames) == frames_for_samples(pcm.size, rate, 25) == 24
    assert [f.pts for f in frames] == list(range(24)) and ends[0].pts == 23
    assert all(f.video.shape == (H, W, 3) and f.video.dtype == np.uint8 for f in frames)
    assert all(f.audio.size == rate // 25 and f.sample_rate == rate for f in frames)
    out = np.concatenate([f.audio for f in frames])
    ints = (pcm * 32767).astype(np.int16).astype(np.float32) / 32768
    np.testing.assert_array_equal(out[:pcm.size], ints)  # the audio that came in, sample for sample
    assert not out[pcm.size:].any() and not any(f.idle for f in frames[:-1])
    s.close()


async def test_other_input_rates_are_resampled_to_the_session_rate(engine):
    pcm = _speech(0.6, 44_100, seed=2)
    s = engine.open_session(_cond(), SessionOptions(realtime=False, sample_rate=48_000))
    s.push_audio(pcm, 44_100)
    s.end_segment()
    frames, _ = await _collect(s)
    out = np.concatenate([f.audio for f in frames])
    ref = soxr.resample(pcm, 44_100, 48_000, quality="HQ")
    n = min(ref.size, out.size) - 200
    assert np.corrcoef(out[:n], ref[:n])[0, 1] > 0.999
    s.close()


@pytest.mark.parametrize("lead_s", [0.0, 0.3], ids=["speech-at-once", "silence-first"])
async def test_engine_stream_equals_direct_generation(engine, bundle, lead_s):
    """The engine adds scheduling and pairing, nothing else: same frames as driving the generator by hand.
    Speech from the first latent on: frame 0 is the settled reference and latent 1 moves from it; a
    silent first latent: frame 0 is latent 1 held (`FrameDecoder.open_at`)."""
    pcm = np.concatenate([np.zeros(int(lead_s * 16_000), np.float32), _speech(1.0, 16_000, seed=3)])
    s = engine.open_session(_cond(1), SessionOptions(realtime=False, seed=7))
    s.push_audio(pcm, 16_000)
    s.end_segment()
    frames, _ = await _collect(s)
    feats = bundle.features(pcm, len(frames) + 8)  # offline features (mel streams exactly)
    gen = CausalGenerator(bundle.dit, OPTS)
    state = gen.init_state(_cond(1), seed=7)
    dec = FrameDecoder(bundle.vae, H // 8, W // 8)
    dec.settle(_cond(1).reference)  # as a session's decoder does while its reference waits for latent 1
    a0 = torch.from_numpy(group_by_latent(feats[:1], 0))[None]
    gen.prefill_reference(state, a0)
    video, v = [], 1
    while sum(len(x) for x in video) < len(frames):
        s0 = state.next_frame
        n = 4 if not video else 8  # the first block after the reference is one latent, then blocks of two
        blk = torch.from_numpy(np.ascontiguousarray(group_by_latent(feats[v:v + n], s0)))[None]
        latents = gen.generate_block(state, blk)
        if not video:  # frame 0: the settled reference where speech starts at once, else latent 1 held
            video.append(dec.open_still() if lead_s == 0 else dec.open_at(latents[:, :, :1]))
        video.append(dec.decode(latents))
        v += n
    video = np.concatenate(video)[:len(frames) - 1]  # the last frame's lookahead is padded silence
    for f, img in zip(frames, video):
        np.testing.assert_array_equal(f.video, img)
    s.close()


async def test_sessions_of_one_reference_share_its_settled_decoder(engine):
    """A session settles its decoder on the reference once per engine (`AvatarEngine.settle` can do it ahead
    of the first session); later sessions on that reference find it settled and show the same frames."""
    pcm = _speech(0.6, 16_000, seed=4)

    async def run(cond):
        s = engine.open_session(cond, SessionOptions(realtime=False, seed=7))
        s.push_audio(pcm, 16_000)
        s.end_segment()
        frames, _ = await _collect(s)
        s.close()
        return np.stack([f.video for f in frames])

    own = await run(_cond(5))  # the first session on this reference settles the decoder itself
    assert (engine.settled.hits, engine.settled.misses) == (0, 1)
    engine.settle(_cond(6))  # ahead of its first session
    assert (engine.settled.hits, engine.settled.misses) == (0, 2)
    await run(_cond(6))
    again = await run(_cond(5))
    assert (engine.settled.hits, engine.settled.misses) == (2, 2)
    np.testing.assert_array_equal(own, again)


async def test_idle_frames_keep_coming_without_audio(engine):
    s = engine.open_session(_cond(), SessionOptions(realtime=True, sample_rate=16_000, jitter_ms=0))
    frames, _ = await _collect(s, until_segment_end=False, max_frames=9, timeout=60)
    assert [f.pts for f in frames] == list(range(9)) and all(f.idle for f in frames)
    assert len({f.video.tobytes() for f in frames}) > 1  # generated, not a frozen picture
    assert all(not f.audio.any() and f.audio.size == 640 for f in frames)
    s.close()


async def test_interrupt_drops_queued_audio_and_unsent_frames(engine):
    s = engine.open_session(_cond(), SessionOptions(realtime=False, max_pending_frames=9))
    s.push_audio(_speech(4.0, 16_000), 16_000)  # 100 frames of queued speech
    first, _ = await _collect(s, until_segment_end=False, max_frames=3)
    s.interrupt()
    s.push_audio(_speech(0.2, 16_000, seed=5), 16_000)  # the new turn: 5 frames
    s.end_segment()
    after, ends = await _collect(s)
    assert len(after) <= 5 + 9 + 9  # the new turn plus at most what was in flight, not 100 frames
    assert after[0].pts > first[-1].pts and [f.pts for f in after] == list(range(after[0].pts, after[-1].pts + 1))
    assert s.stats.dropped_input_samples > 16_000
    s.close()


async def test_two_sessions_are_isolated(engine):
    async def run(seed, pcm):
        s = engine.open_session(_cond(seed), SessionOptions(realtime=False, seed=seed))
        s.push_audio(pcm, 16_000)
        s.end_segment()
        frames, _ = await _collect(s)
        s.close()
        return [f.video for f in frames]

    a, b = _speech(0.5, 16_000, 1), _speech(0.5, 16_000, 2)
    alone_a, alone_b = await run(1, a), await run(2, b)
    both = await asyncio.gather(run(1, a), run(2, b))
    for x, y in zip(both[0], alone_a):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(both[1], alone_b):
        np.testing.assert_array_equal(x, y)


async def test_a_failing_session_does_not_take_down_the_engine(engine):
    bad = engine.open_session(Conditions(reference=torch.randn(1, 3, 1, 4, 4)), SessionOptions(realtime=False))
    good = engine.open_session(_cond(), SessionOptions(realtime=False))
    for s in (bad, good):
        s.push_audio(_speech(0.3, 16_000), 16_000)
        s.end_segment()
    items = []
    async for item in bad:
        items.append(item)
    assert isinstance(items[-1], SessionError) and "must be (B, 33" in items[-1].message
    frames, ends = await _collect(good)
    assert len(frames) == 8 and ends and engine.failures == 1
    good.close()


async def test_session_limit_and_bad_pushes(engine):
    sessions = [engine.open_session(_cond()) for _ in range(3)]
    with pytest.raises(Exception, match="limit is 3"):
        engine.open_session(_cond())
    with pytest.raises(ValueError, match="sample_rate"):
        sessions[0].push_audio(np.zeros(100, np.float32), 4000)
    with pytest.raises(ValueError, match="speaker"):
        sessions[0].push_audio(np.zeros(100, np.float32), 16_000, speaker=1)
    for s in sessions:
        s.close()
    sessions[0].close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sessions[0].push_audio(np.zeros(10, np.float32), 16_000)


async def test_overlap_mode_streams_chunks_with_the_same_contract(bundle):
    from avatar.chunking import OverlapOptions

    opts = EngineOptions(mode="overlap", overlap=OverlapOptions(chunk_frames=4, overlap_frames=2, steps=2),
                         decoder="torch")
    with AvatarEngine(bundle, opts) as eng:
        s = await _speak_one_turn(eng, 1.3, seed=4)
        assert s.state.next_frame >= 9  # chunks of 2 new latents after the first
        s.close()


async def test_live_fusion_mode_waits_for_lookahead_and_keeps_the_contract(bundle):
    from avatar.chunking import LiveFusionOptions

    opts = EngineOptions(mode="fusion", fusion=LiveFusionOptions(block_frames=2, lookahead_frames=1, steps=2),
                         decoder="torch")
    with AvatarEngine(bundle, opts) as eng:
        budget = eng.latency_budget()
        assert budget["block_ms"] == 1000 * 4 * 3 / 25  # 2 latents + 1 lookahead latent of audio
        s = await _speak_one_turn(eng, 1.5, seed=5)
        s.close()


async def test_portrait_to_talking_session_with_two_speakers(engine, tmp_path):
    """A real photo through face detection and the VAE encoder; two faces, two voices (FAA masks)."""
    import cv2
    from skimage.data import astronaut

    from avatar.faces import FixedBoxes

    img = astronaut()  # 512x512, one face at about (180, 65)-(270, 165)
    two = np.concatenate([img[:, 100:356], img[:, 100:356]], axis=1)  # the same face twice, side by side
    path = tmp_path / "duo.png"
    cv2.imwrite(str(path), cv2.cvtColor(two, cv2.COLOR_RGB2BGR))
    boxes = FixedBoxes([(80, 65, 170, 165), (336, 65, 426, 165)])
    avatar = engine.prepare_avatar(path, expected_faces=2, detector=boxes, cache_dir=tmp_path / "cache")
    cond = engine.conditions(avatar)
    assert cond.face_mask.shape == (1, 2, H // 16, W // 16) and cond.reference.shape == (1, 16, 1, H // 8, W // 8)
    s = engine.open_session(cond, SessionOptions(realtime=False, speakers=2))
    a, b = _speech(0.5, 16_000, 1), _speech(0.3, 16_000, 2)
    s.push_audio(a, 16_000, speaker=0)
    s.push_audio(b, 16_000, speaker=1)
    s.end_segment()
    frames, _ = await _collect(s)
    out = np.concatenate([f.audio for f in frames])
    mix = a.copy()
    mix[:b.size] += b
    np.testing.assert_allclose(out[:a.size], np.clip(mix, -1, 1), atol=1e-6)
    s.close()
    again = engine.prepare_avatar(path, expected_faces=2, detector=boxes, cache_dir=tmp_path / "cache")
    assert torch.equal(again.reference_latent, avatar.reference_latent)


async def test_onnx_decoder_in_the_engine_matches_torch(bundle, tmp_path, monkeypatch):
    """decoder='onnx' exports the streaming decoder once (cached) and decodes the same frames."""
    import copy

    monkeypatch.setenv("AVATARCAST_CACHE", str(tmp_path))
    onnx_bundle = copy.copy(bundle)
    onnx_bundle.decoder_backend = None
    pcm = _speech(0.5, 16_000, seed=9)

    async def frames_with(models, decoder):
        with AvatarEngine(models, EngineOptions(causal=OPTS, decoder=decoder)) as eng:
            s = eng.open_session(_cond(2), SessionOptions(realtime=False, seed=3))
            s.push_audio(pcm, 16_000)
            s.end_segment()
            frames, _ = await _collect(s)
            s.close()
            return [f.video for f in frames], eng.snapshot()

    ref, _ = await frames_with(bundle, "torch")
    got, snap = await frames_with(onnx_bundle, "onnx")
    assert snap["decoder"] == "CPUExecutionProvider" and snap["warmup_ms"] > 0
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


async def test_idle_realtime_session_at_48k_keeps_going(engine):
    """Silence padding goes through the 48k->16k resampler, which holds small pads back: it must not stall."""
    s = engine.open_session(_cond(), SessionOptions(realtime=True, sample_rate=48_000, jitter_ms=0))
    frames, _ = await _collect(s, until_segment_end=False, max_frames=60, timeout=120)
    assert [f.pts for f in frames] == list(range(60)) and all(f.audio.size == 1920 for f in frames)
    s.close()


def test_every_dit_preset_has_engine_defaults_and_overrides_win():
    from avatar.engine import PRESET_DEFAULTS, preset_options
    from models.config import DIT_PRESETS

    assert set(PRESET_DEFAULTS) == set(DIT_PRESETS)
    omni = preset_options("omniavatar-14b")
    assert omni.mode == "overlap" and omni.overlap.guidance.passes == 2 and omni.overlap.overlap_frames == 4
    demo = preset_options("demo", max_sessions=2, decoder="torch")
    assert demo.mode == "causal" and len(demo.causal.steps) <= 4 and demo.max_sessions == 2
    with pytest.raises(KeyError, match="no engine defaults"):
        preset_options("nope")


def test_a_model_trained_to_hear_audio_early_needs_a_front_end_that_leads_as_much():
    from dataclasses import replace

    from audio.features.mel import MelConfig, MelFeatures

    bundle = ModelBundle.random("tiny", "tiny")
    bundle.check()
    bundle.dit.cfg = bundle.dit.cfg.replace(audio_lead_frames=1)  # as a lead-1 checkpoint's config reads
    with pytest.raises(ValueError, match="1 frame.s. early, its front end 0 samples"):
        bundle.check()
    replace(bundle, features=MelFeatures(MelConfig(n_mels=bundle.features.feature_dim, lead_samples=640))).check()


def test_engine_threads_are_validated_and_applied():
    before = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match="threads"):
            AvatarEngine(ModelBundle.random("tiny", "tiny"),
                         EngineOptions(threads=0, decoder="torch", warmup=False)).start()
        with AvatarEngine(ModelBundle.random("tiny", "tiny"), EngineOptions(threads=1, decoder="torch", warmup=False)):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


async def test_blocks_decode_on_their_own_thread_and_a_decode_failure_stays_in_its_session(engine):
    """The worker hands latents to the decode thread (the DiT runs on while the VAE decodes); a decoder
    that raises there ends only its own session, with the error."""
    import threading

    good = engine.open_session(_cond(), SessionOptions(realtime=False))
    bad = engine.open_session(_cond(1), SessionOptions(realtime=False))
    threads = set()
    decode = good.decoder.decode

    def traced(latents):
        threads.add(threading.current_thread().name)
        return decode(latents)

    def broken(latents):
        raise RuntimeError("decoder exploded")

    good.decoder.decode, bad.decoder.decode = traced, broken
    for s in (good, bad):
        s.push_audio(_speech(0.3, 16_000), 16_000)
        s.end_segment()
    items = [item async for item in bad]
    assert isinstance(items[-1], SessionError) and "decoder exploded" in items[-1].message
    frames, ends = await _collect(good)
    assert len(frames) == 8 and ends and engine.failures == 1
    assert threads == {"avatar-decode"}
    good.close()


async def test_without_the_decode_thread_the_frames_are_the_same(bundle):
    async def run(ahead):
        with AvatarEngine(bundle, EngineOptions(causal=OPTS, decoder="torch", decode_ahead=ahead)) as eng:
            s = eng.open_session(_cond(2), SessionOptions(realtime=False, seed=3))
            s.push_audio(_speech(0.6, 16_000, seed=4), 16_000)
            s.end_segment()
            frames, _ = await _collect(s)
            s.close()
            return [f.video for f in frames]

    serial, pipelined = await run(0), await run(1)
    assert len(serial) == len(pipelined) == 15
    for a, b in zip(serial, pipelined):
        np.testing.assert_array_equal(a, b)


async def test_a_live_input_is_topped_up_with_silence_on_the_clock_and_speech_resumes_from_there(engine):
    """No audio: silence goes in as the wall clock moves (half the jitter allowance behind it), and the
    frames made of it are idle. Speech that starts after the gap, arriving at its real pace, lands where
    the clock has got to, comes out whole and in order, and is not cut by a block's worth of silence
    (late packets may still have silence put in front of them: that is what the allowance is for)."""
    s = engine.open_session(_cond(), SessionOptions(realtime=True, sample_rate=16_000, jitter_ms=200))
    await asyncio.sleep(0.6)
    clock_s = time.monotonic() - s.t0 - 0.1  # where the input should have been topped up to
    assert clock_s - 0.25 <= s.stats.silence_inserted_s <= clock_s + 0.05, (s.stats.silence_inserted_s, clock_s)
    speech = _speech(0.8, 16_000)
    start = time.monotonic()
    for i in range(0, speech.size, 320):  # 20 ms packets on the wall clock's schedule, as a microphone
        await asyncio.sleep(max(0.0, start + i / 16_000 - time.monotonic()))
        s.push_audio(speech[i:i + 320], 16_000)
    lands_s = start - s.t0 - 0.1
    frames, _ = await _collect(s, until_segment_end=False, max_frames=int((lands_s + 1.4) * 25))
    s.close()
    out = np.concatenate([f.audio for f in frames])
    spoken = np.flatnonzero(out)
    first, last = int(spoken[0]), int(spoken[-1])
    assert lands_s - 0.25 <= first / 16_000 <= lands_s + 0.05, (first / 16_000, lands_s)
    np.testing.assert_array_equal(out[spoken], speech)  # every sample, in order (the speech has no zeros)
    assert (last + 1 - first - speech.size) / 16_000 < 8 * 0.04  # silence inside it: less than a block
    assert all(f.idle for f in frames if (f.pts + 1) * 640 <= first)


def test_an_overloaded_engine_serves_a_new_session_instead_of_only_the_late_ones(bundle):
    """Earliest deadline first, except that lateness counts only up to max_lateness_s: sessions that far
    behind take turns (least recently served first), so a new call is not starved by late ones."""
    class Late:  # what _batch reads of a session: its id and next deadline
        def __init__(self, sid: str, deadline: float) -> None:
            self.id, self._deadline, self.state = sid, deadline, None

        def deadline(self) -> float:
            return self._deadline

    eng = AvatarEngine(bundle, EngineOptions(max_lateness_s=1.0, warmup=False))  # not started: _batch alone
    now = time.monotonic()
    late_a, late_b, new = Late("a", now - 9.0), Late("b", now - 8.0), Late("c", now - 1.5)
    eng._served.update(a=now - 0.02, b=now - 0.01)  # the late ones were served just now, the new one never
    assert eng._batch([late_a, late_b, new]) == [new]
    eng._served["c"] = now
    assert eng._batch([late_a, late_b, new]) == [late_a]  # then turns, least recently served first
    on_time = [Late("d", now + 0.3), Late("e", now + 0.1)]
    assert eng._batch(on_time) == [on_time[1]]  # within the bound: earliest deadline first, as before


async def test_a_block_waits_for_its_audio_as_long_as_the_audio_takes_to_arrive(engine):
    """stage_ms["wait"]: a block's first sample arriving -> the last sample its features need arriving
    (pushed, or silence put in). Audio pushed all at once waits for nothing; live audio in 20 ms packets
    on the clock (and the silence topping up the idle before it) waits about a block (2 latents, 320 ms)
    plus the features' lookahead. Every frame carries its block's wait."""
    ahead = engine.open_session(_cond(), SessionOptions(realtime=False))
    ahead.push_audio(_speech(2.0, 16_000), 16_000)
    ahead.end_segment()
    frames, _ = await _collect(ahead)
    ahead.close()
    waits = list(ahead.stats.stage_ms["wait"])
    assert len(waits) == ahead.stats.blocks >= 6
    assert max(waits[:-1]) < 20, waits  # the last block's tail is silence put in when it is taken
    assert {f.timing.wait_ms for f in frames} == set(waits)

    live = engine.open_session(_cond(), SessionOptions(realtime=True, sample_rate=16_000))
    await asyncio.sleep(0.3)
    speech = _speech(1.6, 16_000)
    start = time.monotonic()
    for i in range(0, speech.size, 320):
        await asyncio.sleep(max(0.0, start + i / 16_000 - time.monotonic()))
        live.push_audio(speech[i:i + 320], 16_000)
    frames, _ = await _collect(live, until_segment_end=False, max_frames=40)
    live.close()
    waits = list(live.stats.stage_ms["wait"])
    block_ms = 1000 * 4 * OPTS.block_frames / 25
    lookahead_ms = engine.models.features.timing.lookahead_ms
    # (+ up to a top-up period, 20 ms, for silence; the margins are for a loaded machine's late packets)
    assert len(waits) >= 4 and block_ms - 60 <= float(np.median(waits)) <= block_ms + lookahead_ms + 100, \
        (waits, lookahead_ms)


def test_emotion_as_reference_swaps_a_one_face_avatar_s_reference_and_keeps_a_scene_s(bundle):
    """EngineOptions.emotion_as_reference: with an emotion chosen, a one-face avatar's reference is its
    emotion image's latent (the portrait's kept as `neutral` for emotion guidance); a two-face scene's
    emotion images are cropped around one face, so its reference stays the portrait. emotion_strength moves a
    one-face avatar's emotion reference further from its portrait."""
    from app.avatars import png_bytes
    from avatar.drawn.emotions import rest_state
    from avatar.drawn.face import NEUTRAL, Identity, render, render_pair
    from avatar.faces import FixedBoxes

    idt, other = Identity.from_seed(3), Identity.from_seed(4)
    one, info = render(idt, NEUTRAL, (128, 128))
    two, infos = render_pair(idt, NEUTRAL, other, NEUTRAL, (128, 256))
    happy_one = render(idt, rest_state("happy"), (128, 128))[0]
    happy_two = render_pair(idt, rest_state("happy"), other, rest_state("happy"), (128, 256))[0]
    eng = AvatarEngine(bundle, EngineOptions(causal=OPTS, decoder="torch", warmup=False, emotion_as_reference=True))
    solo = eng.prepare_avatar(png_bytes(one), detector=FixedBoxes([info.face_box]), expected_faces=1,
                              emotion_images={"happy": png_bytes(happy_one)})
    c = eng.conditions(solo, "happy")
    assert torch.equal(c.reference, solo.emotion_latents["happy"]) and torch.equal(c.neutral, solo.reference_latent)
    plain = eng.conditions(solo, None)
    assert torch.equal(plain.reference, solo.reference_latent) and plain.neutral is None
    scene = eng.prepare_avatar(png_bytes(two), detector=FixedBoxes([i.face_box for i in infos]), expected_faces=2,
                               emotion_images={"happy": png_bytes(happy_two)})
    c2 = eng.conditions(scene, "happy")
    assert torch.equal(c2.reference, scene.reference_latent) and c2.neutral is None
    off = AvatarEngine(bundle, EngineOptions(causal=OPTS, decoder="torch", warmup=False))
    assert torch.equal(off.conditions(solo, "happy").reference, solo.reference_latent)
    # emotion_strength: a one-face avatar's emotion reference pushed past its image, from the portrait;
    # a scene's (emotion crops framed on one face) and the no-emotion conditions are left alone
    strong = AvatarEngine(bundle, EngineOptions(causal=OPTS, decoder="torch", warmup=False, emotion_as_reference=True,
                                                emotion_strength=1.5))
    c3 = strong.conditions(solo, "happy")
    push = solo.reference_latent + 1.5 * (solo.emotion_latents["happy"] - solo.reference_latent)
    assert torch.allclose(c3.emotion, push) and torch.allclose(c3.reference, push)
    assert torch.equal(c3.neutral, solo.reference_latent) and (push - solo.emotion_latents["happy"]).abs().max() > 0.01
    assert torch.equal(strong.conditions(scene, "happy").emotion, scene.emotion_latents["happy"])
    assert torch.equal(strong.conditions(solo, None).reference, solo.reference_latent)
    with pytest.raises(ValueError, match="emotion_strength must be positive"):
        AvatarEngine(bundle, EngineOptions(causal=OPTS, decoder="torch", warmup=False, emotion_strength=0.0))


@pytest.mark.parametrize("faces, lead_s, opening", [(1, 0.0, "open_still"), (1, 0.3, "open_at"), (2, 0.0, "open_at")],
                         ids=["one-face-speaking", "one-face-silent-first", "two-faces-speaking"])
async def test_a_stream_opens_moving_only_where_its_one_face_speaks_at_once(engine, monkeypatch, faces, lead_s,
                                                                          opening):
    """Speech in latent 1 of a one-face avatar: frame 0 is the settled reference and latent 1 moves from it
    (`open_still`); otherwise latent 1 is held (`open_at`), so a silent face never shimmers into place."""
    calls = []
    for name in ("open_at", "open_still"):
        original = getattr(FrameDecoder, name)
        monkeypatch.setattr(FrameDecoder, name,
                            lambda self, *a, _f=original, _n=name: calls.append(_n) or _f(self, *a))
    cond = _cond(2)
    if faces == 2:
        cond = Conditions(reference=cond.reference, face_mask=torch.ones(1, 2, H // 16, W // 16))
    pcm = np.concatenate([np.zeros(int(lead_s * 16_000), np.float32), _speech(0.6, 16_000, seed=5)])
    s = engine.open_session(cond, SessionOptions(realtime=False, seed=1))
    s.push_audio(pcm, 16_000)
    s.end_segment()
    frames, _ = await _collect(s)
    s.close()
    assert calls == [opening] and frames[0].pts == 0
