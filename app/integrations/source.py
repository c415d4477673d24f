"""What the voice-agent adapters drive: a source of avatar sessions, and the PCM conversions at its edges.

The adapters use nothing but the session contract (avatar/session.py): a `SessionSource` opens a
realtime session, the adapter pushes audio, ends segments, interrupts, iterates `AvatarFrame` /
`SegmentEnd` / `SessionError` and closes it. `EngineSource` is the source over an in-process
`AvatarEngine`; `WorkerPoolSource` over `avatarcast serve`'s engine workers (local processes, or Ray
actors on GPU machines), whose sessions keep the same contract across the process boundary.

The frameworks carry int16 PCM at any rate and channel count; sessions take mono PCM at any rate (they
resample, audio/resample.py) and give back mono float32 at the rate they were opened with, which the
adapters choose to be the rate their framework plays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from audio.resample import PcmFormat, downmix
from avatar.types import DEFAULT_FPS, AvatarSessionProtocol


@dataclass(frozen=True)
class AvatarFormat:
    """The video every session of a source produces (what a framework publishes before the first frame)."""

    width: int
    height: int
    fps: int = DEFAULT_FPS


class SessionSource(Protocol):
    """Opens avatar sessions: realtime (idle frames between turns), output audio at `sample_rate`."""

    @property
    def format(self) -> AvatarFormat: ...

    def open(self, sample_rate: int) -> AvatarSessionProtocol: ...


class EngineSource:
    """A `SessionSource` over an in-process engine: one prepared avatar (and emotion) for every session."""

    def __init__(self, engine, avatar=None, emotion: str | None = None, motion: float | None = None,
                 owns_engine: bool = False) -> None:
        """`engine`: a started `AvatarEngine`; `avatar`: a `PreparedAvatar` (None: the built-in drawn one);
        `owns_engine`: `close()` stops the engine too."""
        from app.avatars import BUILTIN_AVATAR, prepare_avatars

        if avatar is None:
            avatars, _ = prepare_avatars(engine)
            avatar = avatars[BUILTIN_AVATAR]
        self.engine, self.owns_engine = engine, owns_engine
        self.conditions = engine.conditions(avatar, emotion, motion=motion)  # ValueError: unknown emotion
        h, w = engine.models.frame_hw
        self._format = AvatarFormat(width=w, height=h, fps=engine.options.fps)
        # TTS audio arrives faster than real time, so a session generates ahead until this many frames wait
        # unsent; interrupt() drops them and the stream then has no frames for that long. One generation
        # unit keeps the next block ready without holding more.
        self.max_pending_frames = 4 * engine.options.unit_geometry()[1]

    @classmethod
    def load(cls, model: str = "auto", avatar: Path | str | None = None, emotion: str | None = None,
             max_sessions: int = 4) -> EngineSource:
        """Load a model ("auto": the shipped demo model when present, else random TINY weights), start its
        engine and prepare the avatar (a portrait, an `avatar new` folder, or None for the built-in one)."""
        from app.avatars import prepare_avatars
        from app.render_worker import load_models
        from avatar.engine import AvatarEngine, preset_options

        if avatar is not None and not Path(avatar).exists():
            raise FileNotFoundError(f"{avatar}: no such portrait file or avatar folder")
        models = load_models(model)
        engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder="auto", max_sessions=max_sessions))
        engine.start()
        try:
            avatars, default = prepare_avatars(engine, Path(avatar) if avatar is not None else None)
            return cls(engine, avatars[default], emotion, owns_engine=True)
        except BaseException:
            engine.stop()
            raise

    @property
    def format(self) -> AvatarFormat:
        return self._format

    def open(self, sample_rate: int) -> AvatarSessionProtocol:
        """A realtime session whose frames carry audio at `sample_rate` (call from the consuming loop)."""
        from avatar.session import SessionOptions

        return self.engine.open_session(self.conditions, SessionOptions(
            realtime=True, sample_rate=sample_rate, max_pending_frames=self.max_pending_frames))

    def close(self) -> None:
        if self.owns_engine:
            self.engine.stop()

    def __enter__(self) -> EngineSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerPoolSource:
    """A `SessionSource` over a started `app.workers.pool.WorkerPool`: each session on the worker with the
    most headroom. Its sessions carry audio at the serve rate (48 kHz): open them at that rate."""

    SAMPLE_RATE = 48_000

    def __init__(self, pool, avatar: str | None = None, emotion: str | None = None) -> None:
        if not pool.info:
            raise ValueError("the worker pool has no ready worker yet: await pool.start() first")
        self.pool = pool
        self.avatar = avatar or pool.default_avatar
        self.emotion = emotion
        if self.avatar not in pool.catalog():
            raise ValueError(f"the workers have no avatar {self.avatar!r}; they have {sorted(pool.catalog())}")
        h, w = pool.info["frame_hw"]
        self._format = AvatarFormat(width=int(w), height=int(h))

    @property
    def format(self) -> AvatarFormat:
        return self._format

    def open(self, sample_rate: int) -> AvatarSessionProtocol:
        if sample_rate != self.SAMPLE_RATE:
            raise ValueError(f"engine workers send {self.SAMPLE_RATE} Hz audio; open at that rate, not {sample_rate} "
                             "(LiveKit: sample_rate=48000; Pipecat: audio_out_sample_rate=48000)")
        return self.pool.open(self.avatar, self.emotion)


def mono_from_pcm16(data: bytes | memoryview, sample_rate: int, channels: int) -> np.ndarray:
    """Interleaved int16 PCM (a framework's audio frame) -> mono float32 in [-1, 1), at the same rate.
    ValueError names the problem: a rate outside 8-96 kHz, a byte count that is not whole samples."""
    fmt = PcmFormat(sample_rate, channels)  # validates the rate and channel count
    raw = memoryview(data).cast("B")
    if raw.nbytes % (2 * channels):
        raise ValueError(f"{raw.nbytes} bytes of int16 PCM is not a whole number of {channels}-channel samples")
    mono, _ = downmix(np.frombuffer(raw, dtype=np.int16), fmt)
    return mono


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1] -> int16, scaled by 32768 so int16 that came in goes out unchanged."""
    return np.clip(np.round(np.asarray(audio, np.float32) * 32768.0), -32768, 32767).astype(np.int16)
