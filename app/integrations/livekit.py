"""avatarcast as a LiveKit Agents avatar (`livekit.agents.voice.avatar`), both ways LiveKit's plugins work.

- In process (`LocalAvatar`): the agent's speech goes into a `QueueAudioOutput`; LiveKit's `AvatarRunner`
  pumps it into our `VideoGenerator` and publishes the synchronized tracks from the agent's participant.
- Separate participant (`AvatarSession` + `avatarcast livekit-worker`): the agent mints a token for the
  avatar (publishing on behalf of the agent) and sends its speech over a data stream
  (`DataStreamAudioOutput`); the worker joins the room and runs `AvatarRunner` with a
  `DataStreamAudioReceiver`, on this machine or on a GPU box.

Either way one avatar session (source.py) turns the speech into frames that each carry their own audio,
so `AVSynchronizer` publishes picture and sound from one clock. Idle frames between turns are video only:
silence yielded as audio would count as playback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, Awaitable, Callable, Protocol

try:
    from livekit import api, rtc
    from livekit.agents import APIError
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.agents.voice.avatar import (
        AudioReceiver,
        AudioSegmentEnd,
        AvatarOptions,
        AvatarRunner,
        DataStreamAudioOutput,
        DataStreamAudioReceiver,
        QueueAudioOutput,
        VideoGenerator,
    )
    from livekit.agents.voice.avatar import AvatarSession as _LiveKitAvatarSession
except ImportError as exc:  # the core installs without the framework
    raise ImportError("the LiveKit adapter needs the livekit extra: pip install 'avatarcast[livekit]'") from exc

from app.integrations.source import SessionSource, mono_from_pcm16, pcm16
from avatar.types import AvatarFrame, AvatarSessionProtocol, SegmentEnd, SessionError

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_RATE = 24_000  # what LiveKit's TTS plugins produce; the session resamples any other rate
AVATAR_IDENTITY = "avatarcast-avatar"
TOKEN_ENV = "AVATARCAST_LIVEKIT_TOKEN"  # how a launched worker gets its token (not on its command line)


class AvatarcastVideoGenerator(VideoGenerator):
    """LiveKit's `VideoGenerator` over one avatar session: audio in, video frames each followed by its audio.

    `push_audio` -> `push_audio` / `end_segment`, `clear_buffer` -> `interrupt`; iteration yields
    `rtc.VideoFrame` (RGB24), then the `rtc.AudioFrame` of that frame's 1/fps unless the frame is idle,
    and `AudioSegmentEnd` once a segment's last frame is out. A closed or failed session raises
    `APIError` (not retryable) instead of waiting forever."""

    def __init__(self, session: AvatarSessionProtocol, sample_rate: int, settle_s: float = 0.5) -> None:
        self._session = session
        self.sample_rate = sample_rate  # the session's output rate: what the AudioSource plays
        self.settle_s = settle_s
        self._closed = False
        self._error: str | None = None
        self._interrupts = 0
        self._consumer_waiting = asyncio.Event()  # nothing we yielded is still in the runner's hands
        self._consumer_waiting.set()

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        self._check_open()
        try:
            if isinstance(frame, AudioSegmentEnd):
                self._session.end_segment()
            else:
                pcm = mono_from_pcm16(frame.data, frame.sample_rate, frame.num_channels)
                self._session.push_audio(pcm, frame.sample_rate)
        except RuntimeError as exc:  # the session closed under us
            self._closed = True
            raise APIError(f"avatarcast session closed: {exc}", retryable=False) from exc

    async def clear_buffer(self) -> None:
        """Interrupt the session, then wait (at most `settle_s`) until the runner has pushed what it already
        took from us: it reports the playback position when this returns and counts any audio frame it
        pushes afterwards as a new turn's start."""
        if self._closed:
            return
        self._session.interrupt()
        self._interrupts += 1
        self._consumer_waiting.clear()
        try:
            await asyncio.wait_for(self._consumer_waiting.wait(), self.settle_s)
        except asyncio.TimeoutError:
            log.warning("the avatar runner did not come back for frames within %.1f s of an interrupt", self.settle_s)

    async def __aiter__(self):
        self._check_open()
        items = aiter(self._session)
        while True:
            self._consumer_waiting.set()  # the runner is back for more: all it took is pushed
            try:
                item = await anext(items)
            except StopAsyncIteration:
                break
            if isinstance(item, AvatarFrame):
                interrupts = self._interrupts
                self._consumer_waiting.clear()
                yield video_frame(item)
                if not item.idle and interrupts == self._interrupts:  # the turn was cut while the runner
                    yield audio_frame(item)  # pushed this frame's picture: its sound goes with the turn
            elif isinstance(item, SegmentEnd):
                self._consumer_waiting.clear()
                yield AudioSegmentEnd()
            elif isinstance(item, SessionError):
                self._closed, self._error = True, item.message
                raise APIError(f"avatarcast session failed: {item.message}", retryable=False)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise APIError(f"avatarcast session {'failed: ' + self._error if self._error else 'closed'}",
                           retryable=False)

    async def aclose(self) -> None:
        self._closed = True
        self._session.close()


def video_frame(frame: AvatarFrame) -> rtc.VideoFrame:
    h, w, _ = frame.video.shape  # (H, W, 3) uint8 RGB
    return rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, frame.video.tobytes())


def audio_frame(frame: AvatarFrame) -> rtc.AudioFrame:
    pcm = pcm16(frame.audio)  # (samples,) int16 mono
    return rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, pcm.size)


def avatar_options(source: SessionSource, sample_rate: int = DEFAULT_SAMPLE_RATE) -> AvatarOptions:
    """What `AvatarRunner` publishes: the model's frame size and rate, mono audio at `sample_rate`."""
    fmt = source.format
    return AvatarOptions(video_width=fmt.width, video_height=fmt.height, video_fps=fmt.fps,
                         audio_sample_rate=sample_rate, audio_channels=1)


class AvatarPipeline:
    """One running avatar: an `AvatarRunner` over our generator, and the session it owns."""

    def __init__(self, room: rtc.Room, audio_recv: AudioReceiver, source: SessionSource,
                 sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
        self.generator = AvatarcastVideoGenerator(source.open(sample_rate), sample_rate)
        self.audio_recv = audio_recv
        self.runner = AvatarRunner(room, audio_recv=audio_recv, video_gen=self.generator,
                                   options=avatar_options(source, sample_rate))
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> AvatarPipeline:
        await self.runner.start()
        # barge-in also drops what the synchronizer holds (up to its 100 ms queues), not only what
        # the session has not sent yet
        self.audio_recv.on("clear_buffer", self._drop_synchronizer_queue)
        return self

    def _drop_synchronizer_queue(self) -> None:
        task = asyncio.get_running_loop().create_task(self.runner.av_sync.clear_queue())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_for_complete(self) -> None:
        await self.runner.wait_for_complete()

    async def aclose(self) -> None:
        self.audio_recv.off("clear_buffer", self._drop_synchronizer_queue)
        await self.runner.aclose()
        await self.generator.aclose()
        for task in list(self._tasks):
            task.cancel()


# ---- in process -----------------------------------------------------------------------------------
class LocalAvatar:
    """The avatar inside the agent's own process and participant (the way local avatar plugins do it):

        avatar = LocalAvatar(EngineSource.load())
        await avatar.start(agent_session, room=ctx.room)
    """

    def __init__(self, source: SessionSource, sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
        self.source, self.sample_rate = source, sample_rate
        self.audio_output: QueueAudioOutput | None = None
        self.pipeline: AvatarPipeline | None = None

    async def start(self, agent_session: Any, room: rtc.Room) -> None:
        """Route the agent's speech to the avatar and publish the avatar's tracks in `room`."""
        if self.pipeline is not None:
            raise RuntimeError("this avatar is already started")
        # playback_started comes from the runner when the avatar's first audio frame is out, not on capture
        self.audio_output = QueueAudioOutput(sample_rate=self.sample_rate, wait_playback_start=True)
        agent_session.output.replace_audio_tail(self.audio_output)  # keeps the transcript synchronizer
        self.pipeline = await AvatarPipeline(room, self.audio_output, self.source, self.sample_rate).start()

    async def aclose(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.aclose()
            self.pipeline = None


# ---- separate participant ---------------------------------------------------------------------------
class WorkerHandle(Protocol):
    async def aclose(self) -> None: ...


Launcher = Callable[[str, str], Awaitable[WorkerHandle]]  # (LiveKit url, avatar token) -> running worker


def avatar_token(api_key: str, api_secret: str, room: str, agent_identity: str | None,
                 identity: str = AVATAR_IDENTITY, name: str = "avatarcast") -> str:
    """A token for the avatar worker: an agent participant of `room` that publishes on behalf of
    `agent_identity` (so the frontend shows its tracks as the agent's)."""
    if not (api_key and api_secret):
        raise ValueError("minting an avatar token needs the LiveKit API key and secret "
                         "(LIVEKIT_API_KEY / LIVEKIT_API_SECRET)")
    token = (api.AccessToken(api_key, api_secret).with_kind("agent").with_identity(identity).with_name(name)
             .with_grants(api.VideoGrants(room_join=True, room=room)))
    if agent_identity:
        token = token.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
    return token.to_jwt()


def token_claims(token: str) -> api.access_token.Claims:
    """The claims of a token, unverified (the server verifies it): who we are, on whose behalf."""
    try:
        return api.TokenVerifier().verify(token, verify_signature=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the same user error
        raise ValueError(f"not a LiveKit access token ({type(exc).__name__}: {exc})") from None


class WorkerProcess:
    """`avatarcast livekit-worker` in a child process of the agent (the default launcher)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def launch(cls, url: str, token: str, *extra_args: str) -> WorkerProcess:
        env = {**os.environ, TOKEN_ENV: token}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "app.cli", "livekit-worker",
                                                    "--url", url, *extra_args, env=env)
        return cls(proc)

    async def aclose(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class AvatarSession(_LiveKitAvatarSession):
    """The avatar as its own participant, fed by a data stream (the way hosted avatar plugins work):

        avatar = AvatarSession()                  # launches `avatarcast livekit-worker` here
        await avatar.start(agent_session, room=ctx.room)

    `launcher=None` launches nothing: a worker started elsewhere (a GPU box running
    `avatarcast livekit-worker --room ... --agent-identity ...`) joins as `avatar_identity`.
    Any other launcher is an async `(url, token) -> handle with aclose()`."""

    def __init__(self, *, avatar_identity: str = AVATAR_IDENTITY, sample_rate: int = DEFAULT_SAMPLE_RATE,
                 launcher: Launcher | None | str = "process", worker_args: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._identity, self.sample_rate = avatar_identity, sample_rate
        if launcher == "process":
            launcher = lambda url, token: WorkerProcess.launch(  # noqa: E731
                url, token, "--sample-rate", str(sample_rate), *worker_args)
        self._launcher = launcher
        self.worker: WorkerHandle | None = None
        self.audio_output: DataStreamAudioOutput | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatarcast"

    async def start(self, agent_session: Any, room: rtc.Room, *, livekit_url: str | None = None,
                    livekit_api_key: str | None = None, livekit_api_secret: str | None = None) -> None:
        await super().start(agent_session, room)
        if self._launcher is not None:
            url = livekit_url or os.environ.get("LIVEKIT_URL")
            if not url:
                raise ValueError("the avatar worker needs the LiveKit URL: livekit_url= or LIVEKIT_URL")
            token = avatar_token(livekit_api_key or os.environ.get("LIVEKIT_API_KEY", ""),
                                 livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET", ""),
                                 room.name, room.local_participant.identity, self._identity)
            self.worker = await self._launcher(url, token)
        self.audio_output = DataStreamAudioOutput(room, destination_identity=self._identity,
                                                  sample_rate=self.sample_rate,
                                                  wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                                                  wait_playback_start=True)  # our worker reports it
        agent_session.output.replace_audio_tail(self.audio_output)

    async def aclose(self) -> None:
        await super().aclose()
        if self.worker is not None:
            await self.worker.aclose()
            self.worker = None


# ---- the worker ---------------------------------------------------------------------------------------
async def serve_room(room: rtc.Room, source: SessionSource, *, sender_identity: str | None = None,
                     sample_rate: int = DEFAULT_SAMPLE_RATE, stop: asyncio.Event | None = None) -> None:
    """In a connected `room`: receive the agent's speech over the data stream, publish the avatar, until
    the agent leaves, the room disconnects or `stop` is set. `sender_identity` None: the first agent."""
    stop = stop or asyncio.Event()
    receiver = DataStreamAudioReceiver(room, sender_identity=sender_identity)
    pipeline = AvatarPipeline(room, receiver, source, sample_rate)

    def on_left(participant) -> None:
        agent_left = (participant.identity == sender_identity if sender_identity
                      else participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        if agent_left:
            log.info("agent %s left; the avatar leaves too", participant.identity)
            stop.set()

    def on_disconnected(*_) -> None:
        stop.set()

    room.on("participant_disconnected", on_left)
    room.on("disconnected", on_disconnected)
    try:
        await pipeline.start()  # waits for the agent to be in the room
        runner_done = asyncio.ensure_future(pipeline.wait_for_complete())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({runner_done, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (runner_done, stopped):
            fut.cancel()
    finally:
        room.off("participant_disconnected", on_left)
        room.off("disconnected", on_disconnected)
        await pipeline.aclose()


async def run_worker(url: str, token: str, source: SessionSource, *, sample_rate: int = DEFAULT_SAMPLE_RATE,
                     stop: asyncio.Event | None = None, room: rtc.Room | None = None) -> None:
    """`avatarcast livekit-worker`: join with `token` and serve the agent it publishes on behalf of.
    `room`: the (unconnected) room object to join with; default a new `rtc.Room()`."""
    claims = token_claims(token)
    agent = (claims.attributes or {}).get(ATTRIBUTE_PUBLISH_ON_BEHALF)
    room = room if room is not None else rtc.Room()
    await room.connect(url, token)
    log.info("joined %s as %s; avatar for %s", room.name, claims.identity, agent or "the first agent")
    try:
        await serve_room(room, source, sender_identity=agent, sample_rate=sample_rate, stop=stop)
    finally:
        await room.disconnect()


def worker_command(*, url: str | None, token: str | None = None, api_key: str | None = None,
                   api_secret: str | None = None, room: str | None = None, agent_identity: str | None = None,
                   identity: str = AVATAR_IDENTITY, model: str = "auto", avatar: str | None = None,
                   emotion: str | None = None, sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
    """`avatarcast livekit-worker`: check the arguments, load the engine, join, serve until the agent leaves,
    the room closes, Ctrl-C or SIGTERM. User errors are ValueErrors naming what to give."""
    import signal

    from app.integrations.source import EngineSource

    if not url:
        raise ValueError("--url (or LIVEKIT_URL) is required: the LiveKit server to join")
    if not token:
        if not (api_key and api_secret and room):
            raise ValueError(f"give --token (or {TOKEN_ENV}), or --api-key, --api-secret and --room to mint one")
        token = avatar_token(api_key, api_secret, room, agent_identity, identity)
    token_claims(token)  # a malformed token fails here, before the model loads
    with EngineSource.load(model, avatar, emotion, max_sessions=1) as source:
        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGTERM, stop.set)  # how an agent's launcher ends us
            except (NotImplementedError, RuntimeError):
                pass
            try:
                await run_worker(url, token, source, sample_rate=sample_rate, stop=stop)
            except rtc.ConnectError as exc:
                raise ValueError(f"cannot join {url}: {exc}") from None

        asyncio.run(serve())
