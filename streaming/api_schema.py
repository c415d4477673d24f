"""The JSON the live service answers over HTTP (admin API and the page's call routes), as TypedDicts.

One schema for everyone who touches these answers: the code that builds them (service.py, app/admin.py,
app/server.py), the console that reads them (app/console) and the console's scripted fake (its test
data), so the fake cannot show what the server never sends; tests/app/test_console.py runs the real
server's answers and the fake's through it (pydantic validates TypedDicts, strictly).

Closed types (`closed=True`: no other keys) are built by the service and the HTTP handlers themselves.
Open types pass on another part's own snapshot (the engine, the pacer, the mic reader, a broadcaster,
events): every key the console reads is required there, and the part may add keys without breaking
the contract. torch-free, like all of streaming/.
"""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import NotRequired, TypedDict


# ---- the engine -----------------------------------------------------------------------------------------
class LatencyBudget(TypedDict):
    """Milliseconds from a sample's arrival to its frame being ready, by stage (avatar/engine.py)."""

    block_ms: float
    lookahead_ms: float
    features_ms: float
    denoise_ms: float
    decode_ms: float
    total_ms: float


class EngineSessionStats(TypedDict):
    frames: int
    idle_frames: int
    blocks: int
    next_pts: int
    dropped_input_samples: int
    dropped_frames: int
    held_frames: int  # repeats of the last frame: the session fell behind real time by more than max_lag_s


class EngineSnapshot(TypedDict):
    """`AvatarEngine.snapshot()`, as `/admin/metrics` passes it on."""

    model: str
    mode: str
    device: str
    decoder: str
    warmup_ms: float
    sessions: dict[str, EngineSessionStats]
    failures: int
    latency_budget: LatencyBudget
    workers: NotRequired[list[WorkerStatus]]  # a worker pool's workers, with their rates (app/workers)


class Memory(TypedDict, closed=True):
    rss_bytes: int | None  # None where /proc is missing
    cuda_allocated_bytes: NotRequired[int]  # only when the engine runs on CUDA
    cuda_reserved_bytes: NotRequired[int]


class EngineInfo(TypedDict, closed=True):
    """GET /admin/engine: the engine at a glance."""

    model: str
    checkpoint: str | None  # where the weights came from; None for random weights
    mode: str
    device: str
    decoder: str
    warmup_ms: float
    failures: int
    latency_budget: LatencyBudget
    sessions: int
    rtf: float | None  # compute per block / audio per block; None before any block
    memory: Memory


# ---- engine workers ---------------------------------------------------------------------------------------
WorkerState = Literal["starting", "ready", "dead"]


class WorkerStatus(TypedDict):
    """One engine worker as the backend reports it (app/workers/pool.py; the in-process engine is one)."""

    id: str
    pid: int | None  # None until the worker said hello (a Ray actor: its process on its node)
    host: str  # the machine: a host name, or a Ray node's address
    state: WorkerState
    sessions: int
    restarts: int
    max_sessions: int
    fps: float | None  # frames made per second over its last heartbeat (all its sessions)
    block_ms: float | None  # median time to make one block (features + denoise + decode)
    load: float | None  # busy share of its engine (1.0: no room for more work)
    last_error: str | None  # why it last stopped


class WorkerReport(TypedDict, closed=True):
    """One entry of GET /admin/workers."""

    id: str
    pid: int | None
    host: str
    state: WorkerState
    sessions: int
    restarts: int


class WorkerList(TypedDict, closed=True):
    """GET /admin/workers."""

    workers: list[WorkerReport]


class WorkerHealth(TypedDict, closed=True):
    """One worker in GET /healthz."""

    id: str
    state: WorkerState
    sessions: int
    fps: float | None
    block_ms: float | None
    restarts: int


class Health(TypedDict, closed=True):
    """GET /healthz: "ok" when every worker is ready, "degraded" when some are, "down" (503) when none is."""

    status: Literal["ok", "degraded", "down"]
    sessions: int
    max_sessions: int
    workers: list[WorkerHealth]


# ---- one call -------------------------------------------------------------------------------------------
class Pending(TypedDict, closed=True):
    avatar: str
    emotion: str | None


class VideoReport(TypedDict, closed=True):
    sent: int
    fps: float
    skipped: int


class AudioReport(TypedDict, closed=True):
    sent: int
    skipped_samples: int


class MicReport(TypedDict):
    frames: int
    seconds: float
    rejected: int
    last_packet_s_ago: float | None
    ignored_while_paused: int
    silence_pushed_s: float


class PacerReport(TypedDict):
    level: int
    started: bool
    repeated: int
    dropped_overflow: int
    dropped_late: int
    dropped_trim: int
    max_level: int


class LatencyReport(TypedDict, closed=True):
    p50: float | None
    p95: float | None
    last: float | None


class StageMs(TypedDict):
    """Medians over the last 200 blocks (frames for pacing), ms; None until one was measured."""

    wait: float | None  # a block's audio arriving: its first sample -> the last one it needs (lookahead incl.)
    features: float | None
    denoise: float | None
    decode: float | None
    block: float | None  # features + denoise + decode (+ the hand-offs between them)
    pacing: float | None  # a frame entering the call's pacer -> its video track handing it to the transport


class SessionEngineReport(TypedDict):
    """The call's engine session; its counters are missing while the call moves to a new session."""

    session: str | None
    frames: NotRequired[int]
    idle_frames: NotRequired[int]
    blocks: NotRequired[int]
    dropped_input_samples: NotRequired[int]
    dropped_frames: NotRequired[int]
    held_frames: NotRequired[int]
    stage_ms: NotRequired[StageMs]


class SecondVoiceReport(TypedDict, closed=True):
    source: str  # the media file, as the caller named it
    pushed_s: float
    silence_s: float
    error: str | None  # why it stopped early (the file went away or broke)


class DialogueReport(TypedDict, closed=True):
    """A two-person call's second voice: the caller's right channel, or a media file."""

    stereo_split: bool
    second_voice: SecondVoiceReport | None


class SessionReport(TypedDict, closed=True):
    """One call: GET /admin/sessions/{id}, GET /sessions/{id}, each entry of /admin/sessions."""

    id: str
    state: str
    connection: str
    end_reason: str | None
    error: str | None
    avatar: str
    emotion: str | None
    mode: str
    codec: str | None  # None until negotiated
    paused: bool
    swaps: int
    restarts: int
    pending: Pending | None  # a change waiting for the next pause in the avatar's speech
    age_s: float
    created: float
    video: VideoReport
    audio: AudioReport
    mic: MicReport | None  # None until the browser's microphone track arrives
    pacer: PacerReport
    latency_ms: LatencyReport
    speaking: bool
    speakers: int  # voices: 1, or 2 in a two-person call (the caller drives the left face)
    dialogue: DialogueReport | None
    engine: SessionEngineReport


# ---- the page's call routes -----------------------------------------------------------------------------
class OfferRequest(TypedDict, closed=True):
    """POST /offer. A two-person call sets `speakers` 2 and one second voice: `second_voice` (a file GET
    /media lists) or `stereo_split` (a stereo microphone: left = speaker 1, right = speaker 2)."""

    sdp: str
    type: Literal["offer"]
    avatar: NotRequired[str | None]
    emotion: NotRequired[str | None]
    mode: NotRequired[str | None]
    codec: NotRequired[str | None]
    speakers: NotRequired[int]
    second_voice: NotRequired[str | None]
    stereo_split: NotRequired[bool]


class OfferAnswer(TypedDict, closed=True):
    sdp: str
    type: str
    session_id: str
    codec: str | None
    avatar: str
    emotion: str | None
    speakers: int


class PageConfig(TypedDict, closed=True):
    """GET /config: what the page builds its pickers from."""

    avatars: dict[str, list[str]]  # avatar name -> its emotion names
    faces: dict[str, int]  # avatar name -> its faces (a two-person call needs 2)
    avatar_warnings: dict[str, str]  # avatar name -> why the model will draw it badly (e.g. a photo, demo model)
    default_avatar: str
    codecs: list[str]
    default_codec: str
    modes: list[str]
    upload_limit_bytes: int
    ice_servers: list[dict[str, Any]]


class MediaList(TypedDict, closed=True):
    """GET /media: audio files of the media folder (relative paths), the second voices a call may take."""

    files: list[str]


# ---- the service and its actions ------------------------------------------------------------------------
class ServiceSnapshot(TypedDict, closed=True):
    """GET /admin/metrics, and the `hello` event's snapshot."""

    sessions: list[SessionReport]
    max_sessions: int
    uptime_s: float
    engine: EngineSnapshot
    subscribers: int


class SessionList(TypedDict, closed=True):
    sessions: list[SessionReport]


class ConditionsAnswer(TypedDict, closed=True):
    """POST /sessions/{id}/conditions and /admin/sessions/{id}/conditions (200 applied, 202 pending)."""

    session_id: str
    avatar: str
    emotion: str | None
    status: Literal["applied", "pending"]
    applies: str


class CallEnd(TypedDict, closed=True):
    """How an ended call ended: GET /sessions/{id} answers it with 410 while the service remembers it."""

    session_id: str
    reason: str  # bye, admin, idle_timeout, engine_error, ...
    error: str | None  # what failed, for people (e.g. the avatar worker stopped)


class SessionEnded(TypedDict, closed=True):
    session_id: str
    ended: bool
    reason: str
    frames_sent: int


class PauseAnswer(TypedDict, closed=True):
    session_id: str
    paused: bool


class AvatarCatalog(TypedDict, closed=True):
    """GET /admin/avatars: avatar name -> its emotion names."""

    avatars: dict[str, list[str]]
    default_avatar: str


# ---- livestreams ----------------------------------------------------------------------------------------
class BroadcastSource(TypedDict):
    type: Literal["session", "audio"]
    session_id: NotRequired[str]  # type "session"
    audio: NotRequired[str | list[str]]  # type "audio": the file path or URL; one per speaker in a dialogue
    speakers: NotRequired[int]  # type "audio": voices (one per face); one source with more: channel i -> face i


class BroadcastReport(TypedDict):
    """One livestream (streaming/broadcasts.py + the broadcaster's own numbers)."""

    id: str
    source: BroadcastSource
    created: float
    target: str  # the stream key masked
    kind: str
    state: str
    end_reason: str | None
    last_error: str | None
    frames_sent: int
    seconds_sent: float
    bitrate_kbps: float
    video_bitrate_kbps: int
    reconnects: int
    disconnects: int
    buffered: int


class BroadcastList(TypedDict, closed=True):
    broadcasts: list[BroadcastReport]
    max_broadcasts: int


# ---- events (GET /admin/events) -------------------------------------------------------------------------
class Event(TypedDict):
    id: int
    type: str
    time: float


class HelloEvent(TypedDict, closed=True):
    id: int
    type: Literal["hello"]
    snapshot: ServiceSnapshot


class SessionEvent(Event):
    session: str


class SessionOpenedEvent(SessionEvent):
    avatar: str
    emotion: str | None
    mode: str
    codec: str | None


class SessionConnectedEvent(SessionEvent):
    connect_ms: float


class SessionClosedEvent(SessionEvent):
    reason: str
    error: str | None
    frames_sent: int
    age_s: float


class ConditionsEvent(SessionEvent):
    avatar: str
    emotion: str | None


class ConditionsChangedEvent(ConditionsEvent):
    engine_session: str | None


class SessionPausedEvent(SessionEvent):
    dropped_frames: int


class StatsRow(TypedDict, closed=True):
    id: str
    state: str
    fps: float
    paused: bool
    emotion: str | None
    avatar: str
    latency_ms: float | None
    pacer_level: int
    repeated: int


class StatsEvent(Event):
    sessions: list[StatsRow]


class BroadcastEvent(Event):
    broadcast: str
    state: NotRequired[str]


EVENTS: dict[str, type[Any]] = {
    "hello": HelloEvent, "session_opened": SessionOpenedEvent, "session_connected": SessionConnectedEvent,
    "session_closed": SessionClosedEvent, "conditions_requested": ConditionsEvent,
    "conditions_changed": ConditionsChangedEvent, "session_paused": SessionPausedEvent,
    "session_resumed": SessionEvent, "session_restarted": SessionEvent, "segment_end": SessionEvent,
    "stats": StatsEvent, "broadcast_started": BroadcastEvent, "broadcast_state": BroadcastEvent,
    "broadcast_ended": BroadcastEvent, "server_shutdown": Event,
}
"""Each event type -> its shape (an unknown type is checked as a plain `Event`)."""
