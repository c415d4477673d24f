"""The pacer and the outgoing tracks on a fake clock: 90 kHz video pts every 3600 ticks, 960-sample
audio packets with sample-count pts, both read from the same slots; start on the first frame;
repeat-last + silence on underrun; a stall skips forward (no burst); drop policies and latency trim."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from audio.buffer import BufferOverflowError, OverflowPolicy
from avatar.types import AvatarFrame, Timing
from streaming.clock import FakeClock, MediaClock
from streaming.pacer import Pacer, PacerOptions
from streaming.webrtc.tracks import AvatarAudioTrack, AvatarVideoTrack

pytestmark = pytest.mark.timeout(30)
SPF = 1920  # 48 kHz / 25 fps


def frame(i: int, emit_ms: float = 0.0) -> AvatarFrame:
    """Engine frame i: picture filled with i, audio a ramp tagged with i (distinct per frame)."""
    audio = (np.full(SPF, i % 100, np.float32) + np.linspace(0, 0.5, SPF, dtype=np.float32)) / 200
    return AvatarFrame(video=np.full((4, 4, 3), i % 256, np.uint8), audio=audio, sample_rate=48_000, pts=i,
                       idle=emit_ms == 0, timing=Timing(emit_ms=emit_ms))


def as_int16(f: AvatarFrame) -> np.ndarray:
    return (np.clip(f.audio, -1, 1) * 32767).round().astype(np.int16)


def setup(options: PacerOptions = PacerOptions()) -> tuple[FakeClock, MediaClock, Pacer]:
    fake = FakeClock()
    clock = fake.media_clock()
    return fake, clock, Pacer(clock, options)


async def test_video_is_stamped_3600_ticks_apart_and_sent_on_time():
    fake, clock, pacer = setup()
    for i in range(10):
        pacer.push(frame(i))
    t0 = clock.t0
    track = AvatarVideoTrack(pacer)
    out = [await track.recv() for _ in range(10)]
    assert [f.pts for f in out] == [3600 * k for k in range(10)]
    assert all(f.time_base == Fraction(1, 90_000) for f in out)
    assert [int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in out] == list(range(10))
    assert fake.t == pytest.approx(t0 + 9 / 25)  # frame 9 went out at t0 + 9/25, not earlier
    assert pacer.stats.played == 10 and pacer.stats.repeated == 0


async def test_audio_packets_are_960_samples_with_sample_count_pts_and_the_frames_own_audio():
    fake, clock, pacer = setup()
    frames = [frame(i) for i in range(3)]
    for f in frames:
        pacer.push(f)
    track = AvatarAudioTrack(pacer)
    packets = [await track.recv() for _ in range(6)]
    assert [p.pts for p in packets] == [0, 960, 1920, 2880, 3840, 4800]
    assert all(p.samples == 960 and p.sample_rate == 48_000 and p.format.name == "s16" for p in packets)
    assert all(p.time_base == Fraction(1, 48_000) for p in packets)
    got = np.concatenate([p.to_ndarray().reshape(-1) for p in packets])
    np.testing.assert_array_equal(got, np.concatenate([as_int16(f) for f in frames]))
    assert fake.t == pytest.approx(clock.t0 + 4800 / 48_000)


async def test_both_tracks_wait_for_the_first_frame_and_share_its_origin():
    fake, clock, pacer = setup()
    video, audio = AvatarVideoTrack(pacer), AvatarAudioTrack(pacer)
    v_task = asyncio.ensure_future(video.recv())
    a_task = asyncio.ensure_future(audio.recv())
    await asyncio.sleep(0.01)
    assert not v_task.done() and not a_task.done() and not clock.started
    fake.advance(2.0)  # the first frame takes 2 s to come: no packet before it, no pts gap after it
    pacer.push(frame(0))
    v, a = await v_task, await a_task
    assert clock.t0 == fake.t and v.pts == 0 and a.pts == 0
    np.testing.assert_array_equal(a.to_ndarray().reshape(-1), as_int16(frame(0))[:960])


async def test_underrun_repeats_the_last_picture_with_silence_and_never_bursts():
    fake, clock, pacer = setup()
    pacer.push(frame(0))
    pacer.push(frame(1))
    video, audio = AvatarVideoTrack(pacer), AvatarAudioTrack(pacer)
    shown, packets = [], []
    for _ in range(4):  # slots 0..3, both tracks as aiortc's senders would run them; slots 2-3 come too late
        f = await video.recv()
        shown.append(int(f.to_ndarray(format="rgb24")[0, 0, 0]))
        packets += [(await audio.recv()).to_ndarray().reshape(-1) for _ in range(2)]
    assert shown == [0, 1, 1, 1] and pacer.stats.repeated == 2
    samples = np.concatenate(packets)
    np.testing.assert_array_equal(samples[:2 * SPF], np.concatenate([as_int16(frame(0)), as_int16(frame(1))]))
    assert not samples[2 * SPF:].any()  # slots 2-3: silence
    for i in (2, 3, 4):  # the late frames arrive together
        pacer.push(frame(i))
    nxt = []
    for _ in range(3):
        nxt.append(await video.recv())
        assert fake.t == pytest.approx(clock.video_due(len(nxt) + 3))  # each at its own time, not in a burst
    assert [f.pts for f in nxt] == [3600 * k for k in (4, 5, 6)]
    assert [int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in nxt] == [2, 3, 4]  # in order, none lost


async def test_after_a_stall_the_tracks_skip_forward_together_and_count_the_drop():
    fake, clock, pacer = setup()
    for i in range(40):
        pacer.push(frame(i))
    video, audio = AvatarVideoTrack(pacer), AvatarAudioTrack(pacer)
    for _ in range(3):
        await video.recv()
        await audio.recv()
        await audio.recv()
    fake.advance(0.5)  # the event loop stalled for 12.5 frame periods
    f = await video.recv()
    a = await audio.recv()
    due_slot = clock.video_slot_at(fake.t)
    assert f.pts == 3600 * due_slot and due_slot == 3 + 12  # jumped to the slot due now
    assert a.pts == clock.audio_sample_at(fake.t) and a.pts % 960 == 0
    assert a.pts // SPF == due_slot  # audio is in the same slot as the picture
    np.testing.assert_array_equal(a.to_ndarray().reshape(-1)[:10],
                                  pacer.slot(due_slot).audio[(a.pts % SPF):(a.pts % SPF) + 10])
    assert pacer.stats.dropped_late == 12 and video.skipped == 12
    t = fake.t
    await video.recv()
    assert fake.t == pytest.approx(t + 1 / 25, abs=1e-6)  # back to one frame per 40 ms


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_OLDEST, OverflowPolicy.DROP_NEWEST])
async def test_overflow_policy(policy):
    _, _, pacer = setup(PacerOptions(max_frames=5, overflow=policy, trim_above_frames=None))
    for i in range(8):
        pacer.push(frame(i))
    kept = [pacer.slot(k).pts for k in range(5)]
    assert pacer.stats.dropped_overflow == 3 and pacer.stats.max_level == 5
    assert kept == ([3, 4, 5, 6, 7] if policy is OverflowPolicy.DROP_OLDEST else [0, 1, 2, 3, 4])


async def test_raise_policy_refuses_a_frame_without_room_and_keeps_the_rest():
    _, _, pacer = setup(PacerOptions(max_frames=5, overflow=OverflowPolicy.RAISE, trim_above_frames=None))
    for i in range(5):
        pacer.push(frame(i))
    with pytest.raises(BufferOverflowError, match="holds 5 frames"):
        pacer.push(frame(5))
    assert pacer.stats.pushed == 5 and pacer.stats.dropped_overflow == 0 and pacer.level == 5
    assert pacer.slot(0).pts == 0
    pacer.push(frame(5))  # a slot made room
    assert [pacer.slot(k).pts for k in range(1, 6)] == [1, 2, 3, 4, 5]


async def test_skip_to_drops_the_skipped_slots_frames_as_late():
    _, _, pacer = setup(PacerOptions(trim_above_frames=None))
    for i in range(6):
        pacer.push(frame(i))
    assert pacer.slot(0).pts == 0
    pacer.skip_to(4)  # slots 1-3 pass without being read: frames 1-3 are late
    assert pacer.stats.dropped_late == 3 and pacer.level == 2
    slot = pacer.slot(4)
    assert (slot.pts, slot.repeated, slot.idle) == (4, False, True)
    np.testing.assert_array_equal(slot.pcm, frame(4).audio)  # the frame's own float samples ...
    np.testing.assert_array_equal(slot.audio, as_int16(frame(4)))  # ... and the int16 the tracks send
    pacer.skip_to(7)  # nothing buffered for slot 6: it is a repeat, nothing is dropped
    assert pacer.stats.dropped_late == 4 and pacer.stats.repeated == 1
    empty = pacer.slot(7)
    assert empty.repeated and empty.idle and not empty.pcm.any() and not empty.audio.any()


async def test_latency_trim_drops_only_what_never_drained():
    _, _, pacer = setup(PacerOptions(trim_above_frames=2, trim_window_frames=10, max_frames=100))
    for i in range(20):
        pacer.push(frame(i))
    played = []
    for k in range(10):  # the buffer never fell below 10 frames during the window
        played.append(pacer.slot(k).pts)
        pacer.push(frame(20 + k))
    assert pacer.stats.dropped_trim == 18 and pacer.level <= 2  # back to the 2 frames allowed
    assert played[:9] == list(range(9)) and played[9] == 9 + 18  # one jump forward at the window's end


async def test_no_trim_when_the_buffer_drains_between_blocks():
    _, _, pacer = setup(PacerOptions(trim_above_frames=2, trim_window_frames=10))
    k = 0
    for block in range(5):  # bursts of 4 frames, each played out before the next
        for i in range(4):
            pacer.push(frame(4 * block + i))
        for _ in range(4):
            pacer.slot(k)
            k += 1
    assert pacer.stats.dropped_trim == 0 and pacer.stats.played == 20


async def test_speech_frames_carry_the_arrival_time_of_their_audio():
    fake, _, pacer = setup()
    pacer.push(frame(0, emit_ms=300.0))
    pacer.push(frame(1))  # idle: no latency to report
    s0, s1 = pacer.slot(0), pacer.slot(1)
    assert s0.audio_at == pytest.approx(fake.t - 0.3) and s1.audio_at is None


async def test_closing_ends_both_tracks():
    _, _, pacer = setup()
    video, audio = AvatarVideoTrack(pacer), AvatarAudioTrack(pacer)
    waiting = asyncio.ensure_future(video.recv())
    await asyncio.sleep(0.01)
    pacer.close()
    with pytest.raises(MediaStreamError):
        await waiting
    with pytest.raises(MediaStreamError):
        await audio.recv()
    assert video.readyState == "ended" and audio.readyState == "ended"


def test_frames_at_another_rate_are_refused_with_a_reason():
    _, _, pacer = setup()
    bad = AvatarFrame(video=np.zeros((4, 4, 3), np.uint8), audio=np.zeros(640, np.float32), sample_rate=16_000, pts=0)
    with pytest.raises(ValueError, match="48000 Hz"):
        pacer.push(bad)
    bad = AvatarFrame(video=np.zeros((4, 4, 3), np.uint8), audio=np.zeros(SPF, np.float32), sample_rate=48_000,
                      pts=0, fps=30)
    with pytest.raises(ValueError, match="at 30 fps; the pacer runs at 25 fps"):
        pacer.push(bad)
    assert pacer.stats.pushed == 0 and not pacer.clock.started


def test_clock_arithmetic():
    clock = MediaClock(25, 48_000, now=lambda: 10.0)
    clock.start()
    assert clock.video_ticks_per_frame == 3600 and clock.samples_per_packet == 960 and clock.samples_per_frame == 1920
    assert clock.video_due(25) == pytest.approx(11.0) and clock.audio_due(48_000) == pytest.approx(11.0)
    assert clock.video_slot_at(10.999) == 24 and clock.audio_sample_at(10.0215) == 960
    with pytest.raises(ValueError):
        MediaClock(7)
