"""Avatars for the live service, and the engine behind the `SessionBackend` that streaming/ talks to.

The built-in avatar is a drawn face (stylised on purpose: it impersonates no one) with one image per
emotion, so the emotion picker has emotion references to switch between. `--avatar PATH` adds the
user's portrait (faces found by the OpenCV Haar cascade) and makes it the default.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from avatar.engine import AvatarEngine, EngineFull
from avatar.faces import FixedBoxes
from avatar.reference import PreparedAvatar
from avatar.session import AvatarSession, SessionOptions
from streaming.webrtc.peer import CapacityError

log = logging.getLogger(__name__)

BUILTIN_AVATAR = "sketch"
EMOTIONS = ("neutral", "happy", "sad", "surprised")
SIZE = 256  # px; prepare_avatar crops and scales it to the model's resolution
FACE_BOX = (48, 40, 208, 232)  # x0, y0, x1, y1 of the drawn head


def draw_face(emotion: str = "neutral", size: int = SIZE) -> bytes:
    """A simple drawn portrait as PNG bytes: head, hair, eyes, brows and a mouth shaped by `emotion`."""
    if emotion not in EMOTIONS:
        raise ValueError(f"no drawing for emotion {emotion!r}; choose from {EMOTIONS}")
    s = size / SIZE
    img = Image.new("RGB", (size, size), (214, 228, 240))
    d = ImageDraw.Draw(img)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return x0 * s, y0 * s, x1 * s, y1 * s

    d.rectangle(box(0, 200, 256, 256), fill=(70, 96, 140))  # shoulders
    d.rectangle(box(104, 180, 152, 215), fill=(226, 180, 150))  # neck
    d.ellipse(box(*FACE_BOX), fill=(238, 196, 166), outline=(150, 110, 90), width=max(1, int(2 * s)))
    d.chord(box(44, 28, 212, 150), 180, 360, fill=(84, 56, 40))  # hair
    for cx in (100, 156):  # eyes
        d.ellipse(box(cx - 13, 114, cx + 13, 130), fill=(255, 255, 255))
        d.ellipse(box(cx - 6, 116, cx + 6, 128), fill=(60, 80, 110))
    brow = {"neutral": 0, "happy": -3, "sad": 6, "surprised": -9}[emotion]
    d.line([(84 * s, (104 + brow) * s), (116 * s, 100 * s)], fill=(84, 56, 40), width=max(1, int(4 * s)))
    d.line([(140 * s, 100 * s), (172 * s, (104 + brow) * s)], fill=(84, 56, 40), width=max(1, int(4 * s)))
    d.polygon([(128 * s, 132 * s), (120 * s, 158 * s), (136 * s, 158 * s)], fill=(220, 170, 140))  # nose
    lip = (170, 70, 70)
    if emotion == "happy":
        d.chord(box(100, 160, 156, 200), 0, 180, fill=lip)
    elif emotion == "sad":
        d.arc(box(104, 178, 152, 206), 200, 340, fill=lip, width=max(1, int(5 * s)))
    elif emotion == "surprised":
        d.ellipse(box(116, 168, 140, 198), fill=lip)
    else:
        d.line([(108 * s, 182 * s), (148 * s, 182 * s)], fill=lip, width=max(1, int(5 * s)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def prepare_avatars(engine: AvatarEngine, portrait: Path | None = None) -> tuple[dict[str, PreparedAvatar], str]:
    """The built-in drawn avatar (with its emotions) and the user's portrait if given -> (avatars, default)."""
    boxes = FixedBoxes([FACE_BOX])
    avatars = {BUILTIN_AVATAR: engine.prepare_avatar(
        draw_face("neutral"), detector=boxes, emotion_images={e: draw_face(e) for e in EMOTIONS})}
    default = BUILTIN_AVATAR
    if portrait is not None:
        name = Path(portrait).stem or "portrait"
        avatars[name] = engine.prepare_avatar(Path(portrait))
        default = name
        log.info("avatar %r prepared from %s", name, portrait)
    return avatars, default


class EngineBackend:
    """`streaming.webrtc.peer.SessionBackend` over an `AvatarEngine`: realtime 48 kHz sessions."""

    def __init__(self, engine: AvatarEngine, avatars: dict[str, PreparedAvatar], default_avatar: str,
                 options: SessionOptions | None = None) -> None:
        if default_avatar not in avatars:
            raise ValueError(f"default avatar {default_avatar!r} is not among {sorted(avatars)}")
        self.engine, self.avatars, self.default_avatar = engine, avatars, default_avatar
        self.options = options or SessionOptions(realtime=True, sample_rate=48_000)
        self._conditions: dict[tuple[str, str | None], Any] = {}

    def catalog(self) -> dict[str, list[str]]:
        return {name: sorted(a.emotion_latents) for name, a in self.avatars.items()}

    def open(self, avatar: str, emotion: str | None) -> AvatarSession:
        key = (avatar, emotion)
        if key not in self._conditions:
            self._conditions[key] = self.engine.conditions(self.avatars[avatar], emotion)
        try:
            return self.engine.open_session(self._conditions[key], self.options)
        except EngineFull as exc:
            raise CapacityError(str(exc)) from None

    def snapshot(self) -> dict[str, Any]:
        return self.engine.snapshot()
