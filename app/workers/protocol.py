"""The bytes between the gateway and an engine worker, one message each way at a time.

A message is a fixed struct header (kind, session key, then the kind's fields) followed by raw bytes:
a frame's uint8 RGB pixels and its float32 PCM, or a chunk of mono float32 PCM; control messages carry
a small UTF-8 JSON body. Nothing is pickled, so the cost per frame is one copy into the message and a
zero-copy view out of it (`np.frombuffer`). The same encoding travels over a local worker's pipe and
inside the `bytes` a Ray actor's long-poll returns.

Gateway -> worker: `Open`, `Push`, `EndSegment`, `Interrupt`, `Close`, `Stop`.
Worker -> gateway: `Output` with kind HELLO / HEARTBEAT (JSON info), FRAME / SEGMENT_END / SESSION_ERROR
(a session item, tagged with the session's interrupt epoch), SESSION_CLOSED, FATAL (the worker could
not start; JSON info with "error").
"""

from __future__ import annotations

import json
import queue
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from avatar.types import AvatarFrame, SegmentEnd, SessionError, SessionItem, Timing

# ---- kinds ------------------------------------------------------------------------------------------------
HELLO, HEARTBEAT, FRAME, SEGMENT_END, SESSION_ERROR, SESSION_CLOSED, FATAL = 1, 2, 3, 4, 5, 6, 7
OPEN, PUSH, END_SEGMENT, INTERRUPT, CLOSE, STOP = 10, 11, 12, 13, 14, 15

_HEAD = struct.Struct("<BI")  # kind, session key (0 for worker-wide messages)
_FRAME = struct.Struct("<IqIHIBHHI5fd")  # epoch, pts, rate, fps, segment, flags (idle 1, held 2), h, w,
# samples, timing x5, sent
_SEGMENT = struct.Struct("<IIq")  # epoch, segment, pts
_EPOCH = struct.Struct("<I")
_PUSH = struct.Struct("<IdB")  # sample rate, gateway send time (time.monotonic), speaker
_TIMING = ("wait_ms", "features_ms", "denoise_ms", "decode_ms", "emit_ms")


class ProtocolError(ValueError):
    """A message that does not decode: a bug or a version mismatch between gateway and worker."""


# ---- gateway -> worker --------------------------------------------------------------------------------------
class Open(NamedTuple):
    key: int
    avatar: str
    emotion: str | None
    same_clock: bool = False  # gateway and worker share time.monotonic() (one machine, one boot)
    speakers: int = 1  # voices, one per face of the avatar (left to right)


class Push(NamedTuple):
    key: int
    pcm: np.ndarray  # (samples,) mono float32
    sample_rate: int
    sent_at: float  # the gateway's time.monotonic() when it was queued
    speaker: int = 0  # whose voice: the avatar's face of that index


class EndSegment(NamedTuple):
    key: int


class Interrupt(NamedTuple):
    key: int
    epoch: int  # the gateway session's epoch after this interrupt


class Close(NamedTuple):
    key: int


class Stop(NamedTuple):
    key: int = 0


Command = Open | Push | EndSegment | Interrupt | Close | Stop
COMMAND_QUEUE = 2048  # commands waiting for a worker's sender thread (see Outbox)
_COMMAND_KINDS = {Open: OPEN, Push: PUSH, EndSegment: END_SEGMENT, Interrupt: INTERRUPT, Close: CLOSE, Stop: STOP}


def encode_command(cmd: Command) -> bytes:
    kind = _COMMAND_KINDS[type(cmd)]
    head = _HEAD.pack(kind, cmd.key)
    if isinstance(cmd, Open):
        return head + json.dumps({"avatar": cmd.avatar, "emotion": cmd.emotion, "same_clock": cmd.same_clock,
                                  "speakers": cmd.speakers}).encode()
    if isinstance(cmd, Push):
        pcm = np.ascontiguousarray(cmd.pcm, dtype=np.float32)
        return b"".join((head, _PUSH.pack(cmd.sample_rate, cmd.sent_at, cmd.speaker), pcm.data))
    if isinstance(cmd, Interrupt):
        return head + _EPOCH.pack(cmd.epoch)
    return head


def decode_command(buf: bytes) -> Command:
    kind, key = _head(buf)
    body = memoryview(buf)[_HEAD.size:]
    if kind == OPEN:
        spec = _json(body)
        return Open(key, str(spec["avatar"]), spec.get("emotion"), bool(spec.get("same_clock")),
                    int(spec.get("speakers") or 1))
    if kind == PUSH:
        rate, sent_at, speaker = _PUSH.unpack_from(body)
        return Push(key, np.frombuffer(body[_PUSH.size:], np.float32), rate, sent_at, speaker)
    if kind == INTERRUPT:
        return Interrupt(key, _EPOCH.unpack_from(body)[0])
    if kind == END_SEGMENT:
        return EndSegment(key)
    if kind == CLOSE:
        return Close(key)
    if kind == STOP:
        return Stop(key)
    raise ProtocolError(f"unknown command kind {kind}")


class Outbox:
    """The gateway's commands for one worker, waiting for that link's sender thread. Bounded: at 50 audio
    chunks a second per call, COMMAND_QUEUE holds seconds of audio; past it the worker has stopped reading,
    and `put` says so (the caller fails the session) instead of blocking the event loop."""

    def __init__(self, maxsize: int = COMMAND_QUEUE) -> None:
        self._queue: queue.Queue[Command | None] = queue.Queue(maxsize=maxsize)

    def put(self, cmd: Command) -> bool:
        try:
            self._queue.put_nowait(cmd)
            return True
        except queue.Full:
            return False

    def close(self) -> None:
        """Ends the sender thread once it has sent what is queued (a full outbox: the worker is gone)."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def take(self) -> list[Command | None]:
        """Blocks for the next command, then takes whatever else is queued with it (None: closed)."""
        batch = [self._queue.get()]
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return batch


# ---- worker -> gateway --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """One decoded worker message."""

    kind: int
    key: int = 0
    epoch: int = 0  # the session's interrupt epoch when the item left the worker
    item: SessionItem | None = None  # FRAME, SEGMENT_END, SESSION_ERROR
    info: dict[str, Any] | None = None  # HELLO, HEARTBEAT, FATAL
    sent_at: float = 0.0  # the worker's time.monotonic() when a frame was encoded


def encode_info(kind: int, info: dict[str, Any]) -> bytes:
    """HELLO, HEARTBEAT or FATAL."""
    return _HEAD.pack(kind, 0) + json.dumps(info, separators=(",", ":")).encode()


def encode_item(key: int, epoch: int, item: SessionItem, sent_at: float) -> bytes:
    """A session's AvatarFrame, SegmentEnd or SessionError."""
    if isinstance(item, AvatarFrame):
        video = np.ascontiguousarray(item.video, dtype=np.uint8)
        audio = np.ascontiguousarray(item.audio, dtype=np.float32)
        if video.ndim != 3 or video.shape[2] != 3 or audio.ndim != 1:
            raise ProtocolError(f"a frame is (H, W, 3) video and (samples,) audio, got {video.shape} {audio.shape}")
        t = item.timing
        flags = item.idle | item.held << 1
        head = _FRAME.pack(epoch, item.pts, item.sample_rate, item.fps, item.segment, flags, video.shape[0],
                           video.shape[1], audio.size, *(getattr(t, name) for name in _TIMING), sent_at)
        return b"".join((_HEAD.pack(FRAME, key), head, video.data, audio.data))
    if isinstance(item, SegmentEnd):
        return _HEAD.pack(SEGMENT_END, key) + _SEGMENT.pack(epoch, item.segment, item.pts)
    if isinstance(item, SessionError):
        return _HEAD.pack(SESSION_ERROR, key) + _EPOCH.pack(epoch) + item.message.encode()
    raise ProtocolError(f"not a session item: {type(item).__name__}")


def encode_closed(key: int) -> bytes:
    return _HEAD.pack(SESSION_CLOSED, key)


def decode_output(buf: bytes) -> Output:
    kind, key = _head(buf)
    body = memoryview(buf)[_HEAD.size:]
    if kind == FRAME:
        (epoch, pts, rate, fps, segment, flags, h, w, n, *timing, sent_at) = _FRAME.unpack_from(body)
        pixels = h * w * 3
        if len(body) != _FRAME.size + pixels + 4 * n:
            raise ProtocolError(f"frame message of {len(body)} bytes does not hold {h}x{w} video and {n} samples")
        video = np.frombuffer(body, np.uint8, pixels, _FRAME.size).reshape(h, w, 3)  # (H, W, 3), read-only view
        audio = np.frombuffer(body, np.float32, n, _FRAME.size + pixels)  # (samples,)
        frame = AvatarFrame(video=video, audio=audio, sample_rate=rate, pts=pts, fps=fps, segment=segment,
                            idle=bool(flags & 1), held=bool(flags & 2), timing=Timing(**dict(zip(_TIMING, timing))))
        return Output(FRAME, key, epoch, frame, sent_at=sent_at)
    if kind == SEGMENT_END:
        epoch, segment, pts = _SEGMENT.unpack_from(body)
        return Output(SEGMENT_END, key, epoch, SegmentEnd(segment=segment, pts=pts))
    if kind == SESSION_ERROR:
        (epoch,) = _EPOCH.unpack_from(body)
        return Output(SESSION_ERROR, key, epoch, SessionError(bytes(body[_EPOCH.size:]).decode(errors="replace")))
    if kind == SESSION_CLOSED:
        return Output(SESSION_CLOSED, key)
    if kind in (HELLO, HEARTBEAT, FATAL):
        return Output(kind, key, info=_json(body))
    raise ProtocolError(f"unknown output kind {kind}")


# ---- helpers ------------------------------------------------------------------------------------------------
def _head(buf: bytes) -> tuple[int, int]:
    if len(buf) < _HEAD.size:
        raise ProtocolError(f"a message of {len(buf)} bytes has no header")
    return _HEAD.unpack_from(buf)


def _json(body: memoryview) -> dict[str, Any]:
    try:
        value = json.loads(bytes(body))
    except ValueError as exc:
        raise ProtocolError(f"bad JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("a JSON body must be an object")
    return value
