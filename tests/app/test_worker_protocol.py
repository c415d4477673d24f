"""The gateway <-> worker messages and the gateway's session proxy, without processes: frames and audio
survive the encoding bit for bit, bad messages are refused by name, the per-session queue drops the
oldest frame (never a marker), and interrupts drop what was queued and what is still in flight."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from app.workers.engine_worker import poisons_the_device
from app.workers.protocol import (FRAME, HEARTBEAT, HELLO, SESSION_CLOSED, SESSION_ERROR, Close, EndSegment, Interrupt,
                                  Open, Output, ProtocolError, Push, Stop, decode_command, decode_output,
                                  encode_closed, encode_command, encode_info, encode_item)
from app.workers.session import WORKER_STOPPED, ItemQueue, WorkerSession
from avatar.types import AvatarFrame, SegmentEnd, SessionError, Timing


def frame(pts: int, hw=(32, 32), samples: int = 1920, seed: int = 0) -> AvatarFrame:
    rng = np.random.default_rng(seed + pts)
    return AvatarFrame(video=rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
                       audio=rng.uniform(-1, 1, samples).astype(np.float32), sample_rate=48_000, pts=pts,
                       segment=3, idle=bool(pts % 2), timing=Timing(1.5, 2.0, 110.25, 70.5, 333.0))


@pytest.mark.parametrize("hw", [(32, 32), (128, 96), (512, 512)])
def test_frames_cross_bit_exact(hw):
    f = frame(41, hw)
    out = decode_output(encode_item(7, 2, f, 123.5))
    assert (out.kind, out.key, out.epoch, out.sent_at) == (FRAME, 7, 2, 123.5)
    got = out.item
    assert isinstance(got, AvatarFrame)
    np.testing.assert_array_equal(got.video, f.video)
    np.testing.assert_array_equal(got.audio, f.audio)
    assert (got.pts, got.sample_rate, got.fps, got.segment, got.idle, got.held) == (41, 48_000, 25, 3, True, False)
    assert got.timing == f.timing
    for idle, held in ((False, True), (True, True), (False, False)):  # a held frame (the session fell behind)
        got = decode_output(encode_item(7, 2, replace(f, idle=idle, held=held), 0.0)).item
        assert (got.idle, got.held) == (idle, held)


def test_markers_info_and_commands_round_trip():
    seg = decode_output(encode_item(3, 1, SegmentEnd(segment=4, pts=99), 0.0))
    assert seg.item == SegmentEnd(segment=4, pts=99) and seg.epoch == 1
    err = decode_output(encode_item(3, 0, SessionError("bad — thing"), 0.0))
    assert err.kind == SESSION_ERROR and err.item == SessionError("bad — thing")
    assert decode_output(encode_closed(5)) == Output(SESSION_CLOSED, 5)
    for kind in (HELLO, HEARTBEAT):
        assert decode_output(encode_info(kind, {"pid": 12, "catalog": {"a": ["x"]}})).info == {"pid": 12,
                                                                                              "catalog": {"a": ["x"]}}
    pcm = np.linspace(-1, 1, 960, dtype=np.float32)
    push = decode_command(encode_command(Push(9, pcm, 44_100, 17.25, speaker=1)))
    assert (push.key, push.sample_rate, push.sent_at, push.speaker) == (9, 44_100, 17.25, 1)
    np.testing.assert_array_equal(push.pcm, pcm)
    for cmd in (Open(1, "sketch", None, True), Open(2, "sketch", "happy"), Open(6, "sketch-duo", None, speakers=2),
                EndSegment(3), Interrupt(4, 7), Close(5), Stop()):
        assert decode_command(encode_command(cmd)) == cmd


def test_bad_messages_are_refused_by_name():
    with pytest.raises(ProtocolError, match="no header"):
        decode_output(b"\x03")
    with pytest.raises(ProtocolError, match="unknown output kind"):
        decode_output(bytes([99, 0, 0, 0, 0]))
    with pytest.raises(ProtocolError, match="does not hold"):
        decode_output(encode_item(1, 0, frame(0), 0.0)[:-4])
    with pytest.raises(ProtocolError, match="unknown command kind"):
        decode_command(bytes([3, 0, 0, 0, 0]))
    with pytest.raises(ProtocolError, match="bad JSON"):
        decode_output(bytes([1, 0, 0, 0, 0]) + b"{nope")
    with pytest.raises(ProtocolError, match=r"\(H, W, 3\)"):
        encode_item(1, 0, AvatarFrame(video=np.zeros((4, 4), np.uint8), audio=np.zeros(3, np.float32),
                                      sample_rate=48_000, pts=0), 0.0)


async def test_the_item_queue_drops_the_oldest_frame_and_never_a_marker():
    q = ItemQueue(max_frames=3)
    q.put(frame(0))
    q.put(SegmentEnd(0, 0))
    for pts in range(1, 5):
        q.put(frame(pts))
    assert q.dropped == 2  # frames 0 and 1 made room
    got = [await q.get() for _ in range(4)]
    assert [type(i).__name__ for i in got] == ["SegmentEnd", "AvatarFrame", "AvatarFrame", "AvatarFrame"]
    assert [i.pts for i in got[1:]] == [2, 3, 4]
    q.put(frame(5))
    q.put(SessionError("x"))
    assert q.clear() == 1  # the frame goes, the error stays
    q.close()
    assert await q.get() == SessionError("x") and await q.get() is None


class FakeHandle:
    """The part of WorkerHandle a session uses: it records what would go to the worker."""

    id = "w9"

    def __init__(self, accept: bool = True) -> None:
        self.sent, self.released, self.accept = [], [], accept

    def send(self, cmd) -> bool:
        self.sent.append(cmd)
        return self.accept

    def release(self, session, tell_worker: bool) -> None:
        self.released.append((session.key, tell_worker))


async def test_a_worker_session_keeps_the_contract():
    handle = FakeHandle()
    s = WorkerSession(handle, key=4, max_frames=10)
    assert s.id == "w9-s4"
    # audio: checked and down-mixed here (packed stereo s16 from aiortc -> mono float32 at its rate)
    stereo = np.stack([np.full(960, 16384, np.int16), np.zeros(960, np.int16)], axis=1).reshape(1, -1)
    s.push_audio(stereo, 48_000, channels=2)
    push = handle.sent[-1]
    assert isinstance(push, Push) and push.sample_rate == 48_000 and push.pcm.shape == (960,)
    np.testing.assert_allclose(push.pcm, 0.25, atol=1e-4)
    with pytest.raises(ValueError, match="sample_rate 1000 Hz"):
        s.push_audio(np.zeros(10, np.float32), 1000)
    with pytest.raises(ValueError, match="speaker"):
        s.push_audio(np.zeros(10, np.float32), 48_000, speaker=1)
    with pytest.raises(ValueError, match="2-channel"):
        s.push_audio(np.zeros(3, np.float32), 48_000, channels=2)
    # frames of the current epoch arrive; an interrupt drops the queued ones and those still in flight
    s.deliver(Output(FRAME, 4, 0, frame(0)), same_clock=False)
    s.deliver(Output(FRAME, 4, 0, frame(1)), same_clock=False)
    s.interrupt()
    assert handle.sent[-1] == Interrupt(4, 1) and s.stats.dropped_frames == 2
    s.deliver(Output(FRAME, 4, 0, frame(2)), same_clock=False)  # made before the worker saw the interrupt
    s.deliver(Output(FRAME, 4, 1, frame(3)), same_clock=False)
    assert s.stats.dropped_frames == 3
    got = await s.__anext__()
    assert got.pts == 3 and s.next_video == 4 and s.stats.frames == 3  # frames that reached the gateway
    # the worker dies: the reader gets the reason, then the end; the slot is released without a Close
    s.fail(WORKER_STOPPED)
    assert await s.__anext__() == SessionError(WORKER_STOPPED)
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    assert handle.released == [(4, False)] and s.closed
    with pytest.raises(RuntimeError, match="closed"):
        s.push_audio(np.zeros(10, np.float32), 48_000)


async def test_audio_a_stalled_worker_cannot_take_is_counted_and_close_tells_the_worker():
    handle = FakeHandle(accept=False)
    s = WorkerSession(handle, key=1, max_frames=5)
    s.push_audio(np.zeros(480, np.float32), 24_000)
    assert s.stats.dropped_input_samples == 480
    handle.accept = True
    s.close()
    s.close()
    assert handle.released == [(1, True)]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(s.__anext__(), 1)


async def test_a_worker_sessions_stage_times_come_from_its_frames_over_the_wire_the_audio_wait_too():
    """The worker measures each block's wait for audio and compute; the frames carry them to the gateway,
    whose session counts one entry per block (every frame of a block carries the same times)."""
    s = WorkerSession(FakeHandle(), key=1, max_frames=10)
    blocks = [Timing(wait_ms=330.0, features_ms=1.0, denoise_ms=20.0, decode_ms=9.0),
              Timing(wait_ms=350.0, features_ms=2.0, denoise_ms=22.0, decode_ms=8.0)]
    for pts, timing in enumerate([blocks[0]] * 3 + [blocks[1]] * 3):
        f = AvatarFrame(**{**frame(pts).__dict__, "timing": timing})
        s.deliver(decode_output(encode_item(1, 0, f, 0.0)), same_clock=False)
    assert {k: list(v) for k, v in s.stats.stage_ms.items()} == {
        "wait": [330.0, 350.0], "features": [1.0, 2.0], "denoise": [20.0, 22.0], "decode": [9.0, 8.0],
        "block": [30.0, 32.0]}
    assert s.stats.blocks == 2 and s.stats.frames == 6


def test_only_errors_that_poison_the_device_retire_a_worker():
    assert poisons_the_device("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert poisons_the_device("RuntimeError: CUDNN_STATUS_EXECUTION_FAILED")
    assert not poisons_the_device("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not poisons_the_device("ValueError: bad audio")


class FakeLink:
    """A worker link that takes every command (no process)."""

    def __init__(self, worker_id: str) -> None:
        self.sent: list = []

    def send(self, cmd) -> bool:
        self.sent.append(cmd)
        return True


def test_the_pool_serves_the_avatar_warnings_of_its_first_ready_worker():
    """A worker's hello names the avatars its model will draw badly (a photo given to the demo model); the
    pool answers them for the page (/config) as it does the catalog."""
    from app.workers.engine_worker import WorkerSpec
    from app.workers.pool import PoolOptions, WorkerPool

    pool = WorkerPool(WorkerSpec(model="demo", avatar="me.jpg"), PoolOptions(workers=2))
    warning = "me.jpg looks unlike the drawn faces this model was trained on (VAE round trip 21.9 dB < 24 dB)"
    first, second = pool.handles
    first.info = {"catalog": {"sketch": [], "me": []}, "faces": {"sketch": 1, "me": 1}, "default_avatar": "me",
                  "avatar_warnings": {"me": warning}}
    pool.worker_ready(first)
    second.info = {**first.info, "avatar_warnings": {}}
    pool.worker_ready(second)  # the first ready worker's answers stand
    assert pool.avatar_warnings() == {"me": warning} and pool.default_avatar == "me"


def test_admission_by_measured_load_refuses_the_call_a_worker_could_not_serve_in_real_time():
    """max_load: a worker with calls takes one more only while load per call x (calls + 1) <= max_load;
    the call goes to the worker that stays under it; sessions opened since the last heartbeat count."""
    from app.workers.engine_worker import WorkerSpec
    from app.workers.pool import CapacityError, PoolOptions, WorkerPool

    pool = WorkerPool(WorkerSpec(model="tiny", max_sessions=4), PoolOptions(workers=2, max_load=0.9))
    for h, load in zip(pool.handles, (0.5, 0.2), strict=True):
        h.link, h.state, h.info = FakeLink(h.id), "ready", {"max_sessions": 4}
        h.open("a", None)  # one call each, measured at the heartbeat below
        h.stats = {"load": load, "sessions": {str(k): {} for k in h.sessions}}
    busy, light = pool.handles
    assert busy.load_with_one_more() == pytest.approx(1.0) and light.load_with_one_more() == pytest.approx(0.4)
    assert pool.open("a", None).worker_id == light.id  # 0.4 fits, 1.0 would not
    assert light.load_with_one_more() == pytest.approx(0.6)  # the new call counts before any heartbeat
    pool.open("a", None)
    assert light.load_with_one_more() == pytest.approx(0.8)
    pool.open("a", None)  # light now holds 4 calls: no free slot; busy is past the load limit
    with pytest.raises(CapacityError, match=r"real-time limit .* 1\.00, the limit is 0\.90"):
        pool.open("a", None)
    # without the limit, the slots alone decide
    pool.options = PoolOptions(workers=2, max_load=0.0)
    assert pool.open("a", None).worker_id == busy.id
    with pytest.raises(ValueError, match="busy share"):
        PoolOptions(max_load=-1)
