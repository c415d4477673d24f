"""Avatars for the live service, and the engine behind the `ServiceBackend` that streaming/ talks to.

The built-in avatars are drawn by the demo model's own face renderer (stylised on purpose: they
impersonate no one; held-out identities) with one image per emotion, so the emotion picker has emotion
references to switch between: "sketch" (one face) and "sketch-duo" (two faces side by side, the renderer's
pair scenes, for dialogue: speaker 0 is the left face). `--avatar PATH` adds the user's portrait (faces
found by the OpenCV Haar cascade) or an `avatarcast avatar new` folder, and makes it the default.

Speaker order is left to right everywhere: `avatar.reference.select_faces` sorts the characters it keeps
by the centre of their boxes, so speaker i drives the i-th face from the left, whether the boxes come
from the detector or from avatar.json.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from audio.pcm import MEDIA_SAMPLE_RATE
from avatar.engine import AvatarEngine, EngineFull
from avatar.faces import FixedBoxes
from avatar.reference import PreparedAvatar
from avatar.session import AvatarSession, SessionOptions
from streaming.api_schema import EngineSnapshot, WorkerStatus
from streaming.webrtc.dialogue import check_speakers
from streaming.webrtc.peer import CapacityError

log = logging.getLogger(__name__)

BUILTIN_AVATAR = "sketch"
BUILTIN_SEED = 1_000_007  # a held-out identity of the demo face renderer (seeds >= 1_000_000 are never trained on)
BUILTIN_DUO = "sketch-duo"
BUILTIN_DUO_SEED = 1_000_021  # a held-out pair: identities 1_000_021 (left) and 1_000_022 (right)
MAX_FACES = 2  # the renderer's scenes: one face, or a pair side by side (what the demo model was trained on)
EMOTIONS = ("neutral", "happy", "sad", "surprised")
SIZE = 256  # px; prepare_avatar crops and scales it to the model's resolution
AVATAR_SPEC = "avatar.json"


@dataclass(frozen=True)
class StylisedAvatar:
    """Drawn identities of the demo renderer: one PNG per emotion and the face boxes (pixels), left to right."""

    seed: int
    images: dict[str, bytes]
    face_boxes: tuple[tuple[int, int, int, int], ...]  # speaker i <-> face_boxes[i]


def png_bytes(image) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes (what prepare_avatar reads)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def stylised_avatar(seed: int, size: int = SIZE, faces: int = 1) -> StylisedAvatar:
    """Identity `seed` of the demo model's face renderer, showing each emotion with the mouth at rest.
    faces=2: identities `seed` (left) and `seed + 1` (right) side by side in a size x 2*size scene, the
    renderer's pair scenes the demo model's face-aware audio adapter was trained on."""
    from avatar.drawn.emotions import rest_state
    from avatar.drawn.face import Identity, render, render_pair

    if seed < 0:
        raise ValueError(f"avatar seed must be >= 0, got {seed}")
    if not 1 <= faces <= MAX_FACES:
        raise ValueError(f"a drawn avatar has 1 or {MAX_FACES} faces, not {faces}")
    ids = [Identity.from_seed(seed + k) for k in range(faces)]
    images, boxes = {}, None
    for emotion in EMOTIONS:
        state = rest_state(emotion)
        if faces == 1:
            frame, info = render(ids[0], state, (size, size))
            infos = (info,)
        else:
            frame, infos = render_pair(ids[0], state, ids[1], state, (size, 2 * size))
        images[emotion] = png_bytes(frame)
        boxes = boxes or tuple(tuple(int(v) for v in i.face_box) for i in infos)
    return StylisedAvatar(seed, images, boxes)


def prepare_stylised(engine: AvatarEngine, av: StylisedAvatar, cache_dir=None) -> PreparedAvatar:
    """A stylised avatar prepared for the engine: its neutral portrait, face boxes and every emotion."""
    return engine.prepare_avatar(av.images["neutral"], detector=FixedBoxes(av.face_boxes),
                                 expected_faces=len(av.face_boxes), emotion_images=dict(av.images),
                                 cache_dir=cache_dir)


def draw_face(emotion: str = "neutral", size: int = SIZE) -> bytes:
    """The built-in avatar's portrait for `emotion` as PNG bytes."""
    if emotion not in EMOTIONS:
        raise ValueError(f"no drawing for emotion {emotion!r}; choose from {EMOTIONS}")
    return stylised_avatar(BUILTIN_SEED, size).images[emotion]


def write_avatar_dir(seed: int, out: Path, size: int = SIZE, faces: int = 1) -> Path:
    """`avatarcast avatar new`: <out>/{neutral,happy,sad,surprised}.png + avatar.json (face boxes, emotions).
    One face keeps the original `"face_box": [x0, y0, x1, y1]`; two faces are written as
    `"faces": [[x0, y0, x1, y1], ...]`, left to right (speaker i = faces[i]). Written to a temporary
    folder first and renamed, so a half-written avatar never exists."""
    av = stylised_avatar(seed, size, faces)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for emotion, png in av.images.items():
        (tmp / f"{emotion}.png").write_bytes(png)
    boxes = {"face_box": list(av.face_boxes[0])} if faces == 1 else {"faces": [list(b) for b in av.face_boxes]}
    spec = {"seed": seed, "size": size, "portrait": "neutral.png", **boxes,
            "emotions": {e: f"{e}.png" for e in EMOTIONS if e != "neutral"}}
    (tmp / AVATAR_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def read_face_boxes(spec: dict) -> list[tuple[float, ...]]:
    """The face boxes of an avatar.json: `"faces": [[x0, y0, x1, y1], ...]` (speaker order, left to right)
    or the one-face `"face_box": [x0, y0, x1, y1]`."""
    if ("faces" in spec) == ("face_box" in spec):
        raise KeyError("avatar.json needs either 'faces' (a list of [x0, y0, x1, y1]) or 'face_box', not "
                       + ("both" if "faces" in spec else "neither"))
    boxes = spec["faces"] if "faces" in spec else [spec["face_box"]]
    if not (isinstance(boxes, list) and 1 <= len(boxes) <= 16):
        raise TypeError(f"faces must be a list of 1 to 16 boxes [x0, y0, x1, y1], not {boxes!r}")
    for box in boxes:
        if not (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box)):
            raise TypeError(f"a face box must be 4 numbers [x0, y0, x1, y1], not {box!r}")
    return [tuple(box) for box in boxes]


def prepare_avatar_dir(engine: AvatarEngine, folder: Path, cache_dir=None) -> PreparedAvatar:
    """An avatar folder (avatar.json + images): the portrait with all its stated face boxes and emotion images."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / AVATAR_SPEC).read_text())
        if not isinstance(spec, dict):
            raise TypeError(f"{AVATAR_SPEC} holds {type(spec).__name__}, not an object")
        portrait, boxes = _inside(folder, spec["portrait"]), read_face_boxes(spec)
        named = spec.get("emotions") or {}
        if not isinstance(named, dict):
            raise TypeError(f"emotions must map names to image files, not {named!r}")
        emotions = {str(e): _inside(folder, f).read_bytes() for e, f in named.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder}: not an avatar folder ({type(exc).__name__}: {exc})") from None
    return engine.prepare_avatar(portrait, detector=FixedBoxes(boxes), expected_faces=len(boxes),
                                 emotion_images=emotions or None, cache_dir=cache_dir)


def _inside(folder: Path, name: object) -> Path:
    """A file named in avatar.json: a plain name of a file in the folder (no path leads out of it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"{name!r} is not the name of a file in the folder")
    return folder / name


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def prepare_avatars(engine: AvatarEngine, portrait: Path | None = None) -> tuple[dict[str, PreparedAvatar], str]:
    """The built-in drawn avatars (with their emotions; "sketch-duo" has two faces, for two speakers) and
    the user's avatar if given -> (avatars, default). The user's avatar is a portrait image (faces found
    by the detector) or an `avatar new` folder."""
    avatars = {BUILTIN_AVATAR: prepare_stylised(engine, stylised_avatar(BUILTIN_SEED)),
               BUILTIN_DUO: prepare_stylised(engine, stylised_avatar(BUILTIN_DUO_SEED, faces=2))}
    default = BUILTIN_AVATAR
    if portrait is not None:
        portrait = Path(portrait)
        name = portrait.stem or "portrait"
        if portrait.is_dir():
            avatars[name] = prepare_avatar_dir(engine, portrait)
        else:
            avatars[name] = engine.prepare_avatar(portrait)
        default = name
        log.info("avatar %r prepared from %s", name, portrait)  # a warning was logged if out of the domain
    return avatars, default


def live_session_options(max_lag_s: float | None = SessionOptions.max_lag_s) -> SessionOptions:
    """What the service opens every live session with: realtime, 48 kHz out, the catch-up bound
    (SessionOptions.max_lag_s; 0 or None: never hold)."""
    return SessionOptions(realtime=True, sample_rate=MEDIA_SAMPLE_RATE, max_lag_s=max_lag_s or None)


class EngineBackend:
    """`streaming.webrtc.service.ServiceBackend` over an `AvatarEngine`: realtime 48 kHz sessions."""

    def __init__(self, engine: AvatarEngine, avatars: dict[str, PreparedAvatar], default_avatar: str,
                 options: SessionOptions | None = None, motion: float | None = None) -> None:
        """`motion`: head-motion intensity of every session (None: the engine's default)."""
        if default_avatar not in avatars:
            raise ValueError(f"default avatar {default_avatar!r} is not among {sorted(avatars)}")
        self.engine, self.avatars, self.default_avatar = engine, avatars, default_avatar
        self.options = options or live_session_options()
        self.motion = motion
        self._conditions: dict[tuple[str, str | None], Any] = {}
        if engine.options.warmup and engine.running:  # the first call opens sooner (AvatarEngine.settle)
            engine.settle(self._conditions_for(default_avatar, None))

    def _conditions_for(self, avatar: str, emotion: str | None):
        key = (avatar, emotion)
        if key not in self._conditions:
            self._conditions[key] = self.engine.conditions(self.avatars[avatar], emotion, motion=self.motion)
        return self._conditions[key]

    @property
    def checkpoint(self) -> str | None:
        return self.engine.models.checkpoint

    def catalog(self) -> dict[str, list[str]]:
        return {name: sorted(a.emotion_latents) for name, a in self.avatars.items()}

    def faces(self) -> dict[str, int]:
        return {name: a.num_characters for name, a in self.avatars.items()}

    def avatar_warnings(self) -> dict[str, str]:
        return {name: a.warning for name, a in self.avatars.items() if a.warning}

    def open(self, avatar: str, emotion: str | None, speakers: int = 1) -> AvatarSession:
        """`speakers` voices drive as many faces (left to right); one voice drives the leftmost face."""
        check_speakers(avatar, speakers, self.faces())
        cond = self._conditions_for(avatar, emotion)
        options = self.options if speakers == self.options.speakers else replace(self.options, speakers=speakers)
        try:
            return self.engine.open_session(cond, options)
        except EngineFull as exc:
            raise CapacityError(str(exc)) from None

    def snapshot(self) -> EngineSnapshot:
        return self.engine.snapshot()

    def workers(self) -> list[WorkerStatus]:
        """The engine in this process, as the one worker (fps is measured only by worker heartbeats)."""
        snap = self.engine.snapshot()
        budget = snap["latency_budget"]
        block_ms = budget["features_ms"] + budget["denoise_ms"] + budget["decode_ms"]
        return [{"id": "engine", "pid": os.getpid(), "host": socket.gethostname(),
                 "state": "ready" if self.engine.running else "dead", "sessions": len(snap["sessions"]),
                 "restarts": 0, "max_sessions": self.engine.options.max_sessions, "fps": None,
                 "block_ms": round(block_ms, 2) if block_ms else None, "load": None, "last_error": None}]
