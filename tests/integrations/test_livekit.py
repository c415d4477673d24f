"""avatarcast as a LiveKit Agents avatar, with the real library: `AvatarRunner`, `AVSynchronizer`, the
native audio/video sources, `QueueAudioOutput`, `DataStreamAudioOutput`/`DataStreamAudioReceiver`, a real
(unstarted) `AgentSession`, and our generator over a TINY engine. Only the room is a stand-in (no LiveKit
server runs here): see livekit_standins.py."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit import api, rtc  # noqa: E402
from livekit.agents import AgentSession, APIError  # noqa: E402
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.agents.voice.avatar import QueueAudioOutput  # noqa: E402

from app.integrations.livekit import (  # noqa: E402
    AVATAR_IDENTITY,
    AvatarcastVideoGenerator,
    AvatarSession,
    LocalAvatar,
    avatar_token,
    run_worker,
    token_claims,
)
from app.integrations.source import pcm16  # noqa: E402
from avatar.types import AvatarFrame  # noqa: E402
from helpers import until  # noqa: E402
from livekit_standins import StandInServer  # noqa: E402

pytestmark = pytest.mark.timeout(180)
RATE = 24_000  # the avatar's audio rate; the speech comes at 16 kHz and is resampled by the session
BLOCK_FRAMES = 12  # one TINY causal block: 3 latents x 4 frames


class SyncSpy:
    """Records everything the runner pushes into the real AVSynchronizer: (monotonic time, frame)."""

    def __init__(self, av_sync: rtc.AVSynchronizer) -> None:
        self.video: list[float] = []
        self.audio: list[tuple[float, rtc.AudioFrame]] = []
        push = av_sync.push

        async def spying_push(frame, timestamp=None):
            if isinstance(frame, rtc.AudioFrame):
                self.audio.append((time.monotonic(), frame))
            else:
                self.video.append(time.monotonic())
            await push(frame, timestamp)

        av_sync.push = spying_push

    def fps(self) -> float:
        """Video frames per second from the first push to the last (the synchronizer captures them at 25
        fps, catching up after a late frame, so over many seconds this is the publishing rate)."""
        return (len(self.video) - 1) / (self.video[-1] - self.video[0])


def playback_events(output) -> list[tuple]:
    events: list[tuple] = []
    output.on("playback_started", lambda ev: events.append(("started",)))
    output.on("playback_finished", lambda ev: events.append(("finished", ev.playback_position, ev.interrupted)))
    return events


async def speak(output, pcm: np.ndarray, rate: int = 16_000, flush: bool = True) -> None:
    """What an AgentSession does with TTS audio: 20 ms frames, faster than real time, then flush."""
    n = rate // 50
    for i in range(0, pcm.size, n):
        chunk = pcm16(pcm[i:i + n])
        await output.capture_frame(rtc.AudioFrame(chunk.tobytes(), rate, 1, chunk.size))
    if flush:
        output.flush()


@contextlib.asynccontextmanager
async def local_avatar(source):
    """A LocalAvatar started in a stand-in room -> (room, agent audio output, synchronizer spy, playback events)."""
    room = StandInServer().join("agent")
    agent_session = AgentSession()
    avatar = LocalAvatar(source, sample_rate=RATE)
    await avatar.start(agent_session, room)
    try:
        out = agent_session.output.audio
        yield room, out, SyncSpy(avatar.pipeline.runner.av_sync), playback_events(out)
    finally:
        await avatar.aclose()


async def test_in_process_avatar_publishes_at_25_fps_and_reports_playback(source, speech16k):
    async with local_avatar(source) as (room, out, spy, events):
        assert isinstance(out, QueueAudioOutput)

        await until(lambda: len(spy.video) >= 30, 60, "idle video frames")
        kinds = {p.kind for p in room.local_participant.track_publications.values()}
        assert kinds == {rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO}
        assert not spy.audio and not events  # idle frames are video only: no silence counted as playback

        seconds = 1.2
        turn = speech16k[int(0.3 * 16_000):int((0.3 + seconds) * 16_000)]  # speech at 16 kHz into a 24 kHz avatar
        await speak(out, turn)
        await until(lambda: any(e[0] == "finished" for e in events), 60, "playback_finished")
        assert [e[0] for e in events] == ["started", "finished"]
        _, position, interrupted = events[1]
        played = [f for _, f in spy.audio]
        assert not interrupted
        assert all(f.sample_rate == RATE and f.samples_per_channel == RATE // 25 for f in played)
        assert position == pytest.approx(0.04 * len(played), abs=1e-6)  # what the synchronizer was given
        assert seconds - 0.06 <= position <= seconds + 0.08, position  # the turn, cut at frame boundaries
        sent = np.concatenate([np.frombuffer(f.data, np.int16) for f in played]).astype(np.float32) / 32768
        rms_in, rms_out = np.sqrt(np.mean(turn ** 2)), np.sqrt(np.mean(sent ** 2))
        assert abs(rms_out / rms_in - 1) < 0.1, (rms_in, rms_out)  # the turn's audio, not silence

        await until(lambda: len(spy.video) >= 150, 60, "more frames")
        # paced to 25 fps by the synchronizer, never faster; how close to 25 a busy CPU gets is the
        # benchmark's number (benchmarks/bench_agents.py), here only that it runs at about real time
        assert 20.0 <= spy.fps() <= 26.0, spy.fps()


async def test_clear_buffer_interrupts_within_one_block_and_the_next_turn_plays(source, speech16k):
    async with local_avatar(source) as (_room, out, spy, events):
        await speak(out, speech16k[:16_000 * 6], flush=False)  # a long turn, still being spoken
        await until(lambda: len(spy.audio) >= 10, 60, "the turn playing")
        t_clear = time.monotonic()
        out.flush()  # barge-in, as AgentSession does it: end the cancelled segment, then clear
        out.clear_buffer()
        await until(lambda: any(e[0] == "finished" for e in events), 10, "interrupted playback_finished")
        assert events[-1][0] == "finished" and events[-1][2] is True, events
        # the frames the session had generated ahead are dropped; idle frames resume where it had got to
        # (on the wall clock), so the picture holds still for about that long
        await until(lambda: sum(t > t_clear for t in spy.video) >= 10, 6, "idle video after the barge-in")
        after = [t for t, _ in spy.audio if t > t_clear]
        assert len(after) <= BLOCK_FRAMES, len(after)  # the session's output stopped within one block

        events.clear()
        n_before = len(spy.audio)
        await speak(out, speech16k[int(0.3 * 16_000):int(0.8 * 16_000)])
        await until(lambda: any(e[0] == "finished" for e in events), 60, "the next turn's playback_finished")
        assert [e[0] for e in events] == ["started", "finished"] and events[1][2] is False
        assert 0.44 <= events[1][1] <= 0.58 and len(spy.audio) > n_before


async def test_a_closed_or_failed_session_raises_instead_of_hanging(source):
    frame = rtc.AudioFrame(np.zeros(480, np.int16).tobytes(), RATE, 1, 480)
    gen = AvatarcastVideoGenerator(source.open(RATE), RATE)
    await gen.aclose()
    with pytest.raises(APIError, match="closed"):
        await gen.push_audio(frame)
    with pytest.raises(APIError, match="closed"):
        await asyncio.wait_for(anext(aiter(gen)), 5)

    session = source.open(RATE)
    gen = AvatarcastVideoGenerator(session, RATE)
    session.close()  # closed underneath the generator: iteration ends, pushes fail
    assert await asyncio.wait_for(_collect(gen), 5) == []
    with pytest.raises(APIError, match="closed"):
        await gen.push_audio(frame)

    session = source.open(RATE)
    gen = AvatarcastVideoGenerator(session, RATE)
    session.fail("decoder ran out of memory")  # what the engine does when a session breaks
    with pytest.raises(APIError, match="decoder ran out of memory"):
        await asyncio.wait_for(_drain(gen), 5)

    gen = AvatarcastVideoGenerator(source.open(RATE), RATE)
    with pytest.raises(ValueError, match="4000 Hz is outside"):  # no speech rate: said, not guessed
        await gen.push_audio(rtc.AudioFrame(np.zeros(40, np.int16).tobytes(), 4_000, 1, 40))
    await gen.aclose()


async def _drain(gen) -> None:
    async for _ in gen:
        pass


async def _collect(gen) -> list:
    return [x async for x in gen]


def test_the_avatar_token_joins_as_an_agent_publishing_on_behalf_of_the_agent():
    token = avatar_token("key", "secret-0123456789abcdef0123456789", "my-room", "agent-7")
    claims = api.TokenVerifier("key", "secret-0123456789abcdef0123456789").verify(token)
    assert claims.identity == AVATAR_IDENTITY and claims.kind == "agent"
    assert claims.video.room_join and claims.video.room == "my-room"
    assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-7"}
    assert token_claims(token).identity == AVATAR_IDENTITY
    with pytest.raises(ValueError, match="not a LiveKit access token"):
        token_claims("not-a-jwt")
    with pytest.raises(ValueError, match="LIVEKIT_API_KEY"):
        avatar_token("", "", "my-room", "agent-7")


async def test_separate_participant_over_data_streams(source, speech16k, monkeypatch):
    """The hosted-plugin way: the agent mints a token and launches a worker, which joins with it and
    runs AvatarRunner on a DataStreamAudioReceiver; speech goes over a byte stream, playback and
    clear_buffer over RPC. Everything but the transport between the two rooms is the real library."""
    server = StandInServer()
    monkeypatch.setenv("LIVEKIT_URL", "wss://livekit.invalid")
    monkeypatch.setenv("LIVEKIT_API_KEY", server.api_key)
    monkeypatch.setenv("LIVEKIT_API_SECRET", server.api_secret)
    agent_room = server.join("agent-1")
    launched: list[tuple[str, str]] = []
    stop = asyncio.Event()

    class Worker:
        def __init__(self, task):
            self.task = task

        async def aclose(self):
            stop.set()
            await asyncio.wait_for(self.task, 20)

    async def launcher(url: str, token: str) -> Worker:
        launched.append((url, token))
        room = server.new_room()  # joins with the minted token, as `avatarcast livekit-worker` would
        return Worker(asyncio.create_task(run_worker(url, token, source, sample_rate=RATE, stop=stop, room=room)))

    agent_session = AgentSession()
    avatar = AvatarSession(launcher=launcher, sample_rate=RATE)
    await avatar.start(agent_session, agent_room)
    try:
        assert launched and launched[0][0] == "wss://livekit.invalid"
        await asyncio.wait_for(avatar.wait_for_join(timeout=None), 60)  # joined and published its video
        worker_room = server.room_of(AVATAR_IDENTITY)
        assert worker_room.local_participant.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-1"}
        kinds = {p.kind for p in worker_room.local_participant.track_publications.values()}
        assert kinds == {rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO}

        out = agent_session.output.audio
        events = playback_events(out)
        await speak(out, speech16k[int(0.3 * 16_000):int(1.3 * 16_000)])
        await until(lambda: any(e[0] == "finished" for e in events), 60, "playback_finished over RPC")
        assert [e[0] for e in events] == ["started", "finished"]
        assert 0.94 <= events[1][1] <= 1.08 and events[1][2] is False, events
        streams = agent_room.local_participant.streams
        assert streams and streams[0][0].topic == "lk.audio_stream"
        # 16 kHz on the wire (an AgentSession would resample to 24 kHz first): the worker's session resamples
        assert streams[0][0].attributes == {"sample_rate": "16000", "num_channels": "1"}

        events.clear()
        await speak(out, speech16k[:16_000 * 6], flush=False)
        await until(lambda: events == [("started",)], 60, "the second turn playing")
        out.flush()
        out.clear_buffer()  # lk.clear_buffer -> the worker interrupts its session
        await until(lambda: len(events) == 2, 10, "interrupted playback_finished over RPC")
        assert events[1][2] is True
        methods = [m for _, m, _ in agent_room.local_participant.rpc_calls]
        assert "lk.clear_buffer" in methods
    finally:
        await avatar.aclose()  # stops the worker: it leaves the room, its session closes
    assert server.room_of(AVATAR_IDENTITY) is None


async def test_launching_without_credentials_names_them(monkeypatch):
    for var in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(var, raising=False)
    room = StandInServer().join("agent")
    avatar = AvatarSession(launcher=lambda url, token: None)
    with pytest.raises(ValueError, match="LIVEKIT_URL"):
        await avatar.start(AgentSession(), room)
    await avatar.aclose()


def test_frames_are_rgb24_and_int16_of_the_frame():
    frame = AvatarFrame(video=np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3) % 251,
                        audio=np.linspace(-1, 1, 960, dtype=np.float32), sample_rate=RATE, pts=0)
    from app.integrations.livekit import audio_frame, video_frame

    v, a = video_frame(frame), audio_frame(frame)
    assert (v.width, v.height, v.type) == (32, 32, rtc.VideoBufferType.RGB24)
    assert bytes(v.data) == frame.video.tobytes()
    pcm = np.frombuffer(a.data, np.int16)
    assert (a.sample_rate, a.num_channels, a.samples_per_channel) == (RATE, 1, 960)
    assert pcm[0] == -32768 and pcm[-1] == 32767


@pytest.mark.slow
def test_the_worker_command_says_what_is_wrong():
    """`avatarcast livekit-worker`, the way the default launcher runs it: bad arguments and an unreachable
    server end with one line naming the problem (exit 2), not a traceback or a hang."""
    import os
    import subprocess
    import sys

    def worker(*args: str, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "AVATARCAST_LIVEKIT"))}
        return subprocess.run([sys.executable, "-m", "app.cli", "livekit-worker", *args], capture_output=True,
                              text=True, timeout=120, env={**clean, **env})

    proc = worker()
    assert proc.returncode == 2 and "--url (or LIVEKIT_URL) is required" in proc.stderr
    proc = worker("--url", "ws://127.0.0.1:9")
    assert proc.returncode == 2 and "--api-key, --api-secret and --room" in proc.stderr
    proc = worker("--url", "ws://127.0.0.1:9", AVATARCAST_LIVEKIT_TOKEN="not-a-token")
    assert proc.returncode == 2 and "not a LiveKit access token" in proc.stderr
    proc = worker("--url", "ws://127.0.0.1:9", "--api-key", "key", "--api-secret", "secret-0123456789abcdef0123456789",
                  "--room", "my-room", "--model", "tiny")  # loads the engine, then finds no server there
    assert proc.returncode == 2 and "cannot join ws://127.0.0.1:9" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


async def test_the_readme_example_wires_the_avatar_in_process_and_remote(source, speech16k, monkeypatch):
    """examples/livekit_agent.py's `start_avatar`, as its entrypoint calls it, with a stand-in room: the
    agent's speech plays on the avatar; in remote mode a worker elsewhere (here: joined with its own
    minted token, as `avatarcast livekit-worker --api-key ... --room ... --agent-identity ...` does) plays it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "livekit_agent.py"
    spec = importlib.util.spec_from_file_location("example_livekit_agent", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert callable(example.entrypoint) and example.server is not None

    server = StandInServer()
    for mode in ("local", "remote"):
        room = server.join(f"agent-{mode}")
        stop, worker = asyncio.Event(), None
        if mode == "remote":
            token = avatar_token(server.api_key, server.api_secret, server.name, f"agent-{mode}")
            worker = asyncio.create_task(run_worker("wss://livekit.invalid", token, source, sample_rate=RATE,
                                                    stop=stop, room=server.new_room()))
        session = AgentSession()
        avatar = await example.start_avatar(session, room, source, mode=mode)
        try:
            out = session.output.audio
            events = playback_events(out)
            await speak(out, speech16k[int(0.3 * 16_000):int(0.8 * 16_000)])
            await until(lambda: any(e[0] == "finished" for e in events), 60, f"{mode}: playback_finished")
            assert [e[0] for e in events] == ["started", "finished"] and 0.44 <= events[1][1] <= 0.58
        finally:
            await avatar.aclose()
            if worker is not None:
                stop.set()
                await asyncio.wait_for(worker, 20)
        await room.disconnect()
    with pytest.raises(ValueError, match="local, worker or remote"):
        await example.start_avatar(AgentSession(), server.join("agent-x"), source, mode="cloud")
