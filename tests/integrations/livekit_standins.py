"""Minimal stand-ins for a LiveKit room, for tests (no LiveKit server can run here).

`StandInServer` connects `StandInRoom`s in memory: participants see each other join and leave, publish
tracks (the real native `LocalAudioTrack`/`LocalVideoTrack` objects are created by LiveKit's own code and
handed to `publish_track`), call each other's RPC methods and send byte streams. Only what LiveKit's
avatar code uses is here: `on`/`off`/`emit`, `isconnected()`, `remote_participants`,
`register_byte_stream_handler`, and on the local participant `publish_track`, `register_rpc_method`,
`perform_rpc` and `stream_bytes`. Everything else (AvatarRunner, AVSynchronizer, the audio and video
sources, QueueAudioOutput, DataStreamAudioOutput/Receiver) is the real library.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from livekit import api, rtc

_ids = itertools.count(1)


@dataclass
class Publication:
    track: object
    kind: int
    sid: str = field(default_factory=lambda: f"TR_{next(_ids)}")
    subscribed: bool = True
    published_at: float = field(default_factory=time.monotonic)

    async def wait_for_subscription(self) -> None:
        return None


@dataclass
class StreamInfo:
    stream_id: str
    topic: str
    attributes: dict[str, str]
    name: str = ""


class ByteStreamReader:
    """What the receiving side iterates: the chunks the sender wrote, then the end of the stream."""

    _END = object()

    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self._chunks: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.get()
        if chunk is self._END:
            raise StopAsyncIteration
        return chunk


class ByteStreamWriter:
    def __init__(self, readers: list[ByteStreamReader]) -> None:
        self._readers = readers
        self.bytes_written = 0

    async def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        for r in self._readers:
            r._chunks.put_nowait(bytes(data))

    async def aclose(self) -> None:
        for r in self._readers:
            r._chunks.put_nowait(ByteStreamReader._END)


class RemoteParticipant:
    def __init__(self, identity: str, kind: int, attributes: dict[str, str]) -> None:
        self.identity, self.kind, self.attributes = identity, kind, attributes
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.track_publications: dict[str, Publication] = {}


class LocalParticipant:
    def __init__(self, room: StandInRoom, identity: str, kind: int, attributes: dict[str, str]) -> None:
        self.room, self.identity, self.kind, self.attributes = room, identity, kind, attributes
        self.track_publications: dict[str, Publication] = {}
        self._rpc_handlers: dict[str, object] = {}
        self.rpc_calls: list[tuple[str, str, str]] = []  # (destination, method, payload) performed
        self.streams: list[tuple[StreamInfo, ByteStreamWriter]] = []

    async def publish_track(self, track, options=None) -> Publication:
        pub = Publication(track, track.kind)
        self.track_publications[pub.sid] = pub
        self.room.emit("local_track_published", pub, track)
        self.room.server.published(self, pub)
        return pub

    def register_rpc_method(self, method: str, handler) -> None:
        self._rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None) -> str:
        self.rpc_calls.append((destination_identity, method, payload))
        target = self.room.server.room_of(destination_identity)
        handler = target.local_participant._rpc_handlers.get(method) if target else None
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, f"{destination_identity} has no {method}")
        data = rtc.RpcInvocationData(request_id=f"rpc{next(_ids)}", caller_identity=self.identity,
                                     payload=payload, response_timeout=response_timeout or 10.0, method=method)
        result = handler(data)
        if asyncio.iscoroutine(result):
            result = await result
        return result or ""

    async def stream_bytes(self, name: str, *, topic: str, destination_identities: list[str],
                           attributes: dict[str, str] | None = None, **_) -> ByteStreamWriter:
        info = StreamInfo(stream_id=f"BS_{next(_ids)}", topic=topic, attributes=dict(attributes or {}), name=name)
        readers = []
        for identity in destination_identities:
            target = self.room.server.room_of(identity)
            handler = target._byte_handlers.get(topic) if target else None
            if handler is not None:
                reader = ByteStreamReader(info)
                readers.append(reader)
                handler(reader, self.identity)
        writer = ByteStreamWriter(readers)
        self.streams.append((info, writer))
        return writer


class StandInRoom(rtc.EventEmitter):
    def __init__(self, server: StandInServer, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
                 attributes: dict[str, str] | None = None, name: str = "test-room") -> None:
        super().__init__()
        self.server, self.name = server, name
        self.local_participant = LocalParticipant(self, identity, kind, dict(attributes or {}))
        self.remote_participants: dict[str, RemoteParticipant] = {}
        self._byte_handlers: dict[str, object] = {}
        self._connected = False

    def isconnected(self) -> bool:
        return self._connected

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self._byte_handlers[topic] = handler

    async def connect(self, url: str, token: str, options=None) -> None:
        """Join the way a server admits a token: verified signature, a join grant for this room."""
        claims = api.TokenVerifier(self.server.api_key, self.server.api_secret).verify(token)
        if not (claims.video and claims.video.room_join and claims.video.room == self.name):
            raise rtc.ConnectError(f"token does not grant joining {self.name!r}")
        lp = self.local_participant
        lp.identity, lp.attributes = claims.identity, dict(claims.attributes or {})
        lp.kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT if claims.kind == "agent" else \
            rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
        self.server.attach(self)

    async def disconnect(self) -> None:
        self.server.leave(self)


class StandInServer:
    """One LiveKit room: each participant's view of it (a `StandInRoom`), by identity."""

    def __init__(self, api_key: str = "test-key", api_secret: str = "test-secret-0123456789abcdef0123456789",
                 name: str = "test-room") -> None:
        self.api_key, self.api_secret, self.name = api_key, api_secret, name
        self.rooms: dict[str, StandInRoom] = {}

    def join(self, identity: str, **kw) -> StandInRoom:
        """A participant already connected (what `JobContext.connect()` gives an agent)."""
        return self.attach(StandInRoom(self, identity, name=self.name, **kw))

    def new_room(self) -> StandInRoom:
        """An unconnected room object; `connect(url, token)` joins it."""
        return StandInRoom(self, "", name=self.name)

    def attach(self, room: StandInRoom) -> StandInRoom:
        room._connected = True
        lp = room.local_participant
        for other in self.rooms.values():
            olp = other.local_participant
            seen = RemoteParticipant(olp.identity, olp.kind, olp.attributes)
            seen.track_publications = dict(olp.track_publications)
            room.remote_participants[olp.identity] = seen
            me = RemoteParticipant(lp.identity, lp.kind, lp.attributes)
            other.remote_participants[lp.identity] = me
            other.emit("participant_connected", me)
            other.emit("participant_active", me)
        self.rooms[lp.identity] = room
        room.emit("connection_state_changed", rtc.ConnectionState.CONN_CONNECTED)
        return room

    def leave(self, room: StandInRoom) -> None:
        identity = room.local_participant.identity
        self.rooms.pop(identity, None)
        room._connected = False
        room.emit("connection_state_changed", rtc.ConnectionState.CONN_DISCONNECTED)
        room.emit("disconnected", "client initiated")
        for other in self.rooms.values():
            p = other.remote_participants.pop(identity, None)
            if p is not None:
                other.emit("participant_disconnected", p)

    def room_of(self, identity: str) -> StandInRoom | None:
        return self.rooms.get(identity)

    def published(self, lp: LocalParticipant, pub: Publication) -> None:
        for other in self.rooms.values():
            p = other.remote_participants.get(lp.identity)
            if p is not None:
                p.track_publications[pub.sid] = pub
                other.emit("track_published", pub, p)
