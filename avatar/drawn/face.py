"""Parametric stylised face renderer: the built-in avatars, and the teacher of the embedded demo model (DESIGN §5).

An ``Identity`` (who: face shape, skin, hair, eyes, brows, nose, lips, clothes, background) is drawn
from an integer seed, so identities are unlimited and unseen seeds are unseen faces. A ``FaceState``
(what the face does in one frame: mouth, smile, blink, brows, head pose) changes per frame.
``render(identity, state)`` draws them with OpenCV at 2x (antialiased, sub-pixel coordinates) and
downsamples with INTER_AREA; it is deterministic (same inputs -> identical pixels).

Geometry lives in "head units": fractions of the canvas' shorter side ``S``, origin at the face
centre (``FACE_CENTER`` of the canvas), y pointing down. Head parts go through the head pose
(translate ``dx * W, dy * H``, zoom ``scale``, roll about the neck pivot); neck and shirt translate and
zoom but do not roll. Roll is in degrees, positive = clockwise on screen.

Boxes are ``(x0, y0, x1, y1)`` integer pixels, x1/y1 exclusive, clipped to the canvas. The mouth box
depends on identity and pose only (never on the mouth state), so a probe can measure the mouth of any
frame inside it; the mouth's rest line lies at ``MOUTH_BOX_ANCHOR`` of the box height.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from functools import lru_cache

import cv2
import numpy as np

from avatar.drawn import shapes
from avatar.drawn.shapes import RGB

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, exclusive end

FACE_CENTER = (0.5, 0.47)  # face centre as a fraction of the canvas (x of width, y of height)
ZOOM = 1.15  # canvas pixels per head unit = ZOOM * shorter side * scale
MOUTH_BOX_ANCHOR = 0.4  # the mouth's rest line is this far down the mouth box
MAX_MOUTH_OPEN = 0.08  # interior height at mouth_open=1, head units
HAIR_STYLES = ("short", "bob", "long", "afro", "bun", "spiky", "side_part", "buzz")
COLLARS = ("crew", "v", "shirt", "turtleneck")
NOSES = ("button", "line", "soft")
BACKGROUNDS = ("flat", "vgradient", "radial", "stripes", "dots", "split")
GLASSES = ("none", "round", "square")

_SS = 2  # supersampling factor
_SHIFT = 4  # OpenCV fractional bits for sub-pixel coordinates
_FIX = float(1 << _SHIFT)
_AA = cv2.LINE_AA
_INTERIOR: RGB = (50, 16, 24)  # mouth interior: darker than any lip or skin colour (probes rely on it)
_TEETH: RGB = (246, 242, 234)
_PUPIL: RGB = (20, 18, 22)

_SKIN = ((255, 226, 200), (246, 208, 178), (234, 190, 156), (222, 170, 130), (198, 144, 104),
         (170, 117, 82), (142, 94, 64), (116, 76, 54))
_HAIR = ((28, 24, 26), (60, 40, 30), (98, 64, 40), (140, 64, 36), (214, 178, 112), (236, 212, 160),
         (150, 150, 156), (222, 222, 224), (44, 130, 142), (118, 72, 150), (226, 118, 160))
_HAIR_P = (0.22, 0.18, 0.15, 0.08, 0.1, 0.06, 0.06, 0.04, 0.04, 0.04, 0.03)
_IRIS = ((88, 54, 34), (52, 36, 30), (128, 98, 50), (70, 120, 80), (70, 118, 180), (118, 130, 142))


# ---------------------------------------------------------------------------------------------
# Identity and state


@dataclass(frozen=True)
class Identity:
    """Who is drawn. Lengths in head units (fractions of the canvas' shorter side); colours RGB."""

    seed: int
    face_rx: float  # face half-width
    face_ry: float  # face half-height
    jaw: float  # 0 round .. 0.35 narrow chin
    skin: RGB
    hair_style: str
    hair_color: RGB
    hair_volume: float  # 1.0 = close to the head
    eye_y: float  # eye line below the face centre (negative = above)
    eye_dx: float  # half the distance between the eyes
    eye_w: float  # eye half-width
    eye_h: float  # eye half-height
    eye_tilt: float  # outer corner up (+) / down (-), head units
    iris_color: RGB
    brow_gap: float  # brow above the eye line
    brow_thick: float
    brow_arch: float
    brow_color: RGB
    nose_style: str
    nose_y: float
    nose_size: float
    mouth_y: float
    mouth_w: float  # mouth half-width at mouth_width=0.5, no smile
    lip_upper: float  # upper lip thickness
    lip_lower: float
    lip_color: RGB
    blush: bool
    glasses: str
    glasses_color: RGB
    shirt_color: RGB
    collar: str
    shoulder_w: float
    bg_color: RGB
    bg_color2: RGB
    bg_pattern: str

    @classmethod
    def from_seed(cls, seed: int) -> Identity:
        """Draw every parameter from ``seed`` (a non-negative int); the same seed gives the same face."""
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"identity seed must be a non-negative integer, got {seed!r}")
        rng = np.random.default_rng([int(seed), 0x1D])
        u = rng.uniform
        face_rx, face_ry = u(0.195, 0.235), u(0.25, 0.29)
        tone = u(0, len(_SKIN) - 1)
        lo = int(tone)
        skin = shapes.jitter(shapes.mix(_SKIN[lo], _SKIN[min(lo + 1, len(_SKIN) - 1)], tone - lo), rng, 5)
        hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)]
        style = str(rng.choice(HAIR_STYLES))
        hair_color = shapes.mix(shapes.jitter(hair, rng, 8), skin, 0.4 if style == "buzz" else 0.0)  # buzz: skin shows
        eye_w = u(0.03, 0.04)
        mouth_y = u(0.145, min(0.17, face_ry - 0.09))  # the mouth box ends above the chin
        nose_y = u(0.055, 0.08)
        nose_size = min(u(0.018, 0.03), mouth_y - 0.06 - nose_y)  # the nose stays out of the mouth box
        # lips: tinted and darkened more on darker skin (contrast), never as dark as the mouth interior
        tint = shapes.mix(skin, (186, 62, 78), u(0.3, 0.5))  # draws before `darken`: the seed's order
        lip = shapes.mix(tint, (0, 0, 0), u(0.08, 0.2) + 0.15 * (1 - shapes.luma(skin) / 255))
        lip = shapes.mix(lip, (255, 255, 255), max(0.0, (66 - shapes.luma(lip)) / (255 - shapes.luma(lip))))
        bg_h = u(0, 1)
        return cls(
            seed=int(seed), face_rx=face_rx, face_ry=face_ry, jaw=u(0.05, 0.3), skin=skin, hair_style=style,
            hair_color=hair_color, hair_volume=u(1.0, 1.12), eye_y=u(-0.04, -0.01),
            eye_dx=face_rx * u(0.4, 0.48), eye_w=eye_w, eye_h=eye_w * u(0.5, 0.72), eye_tilt=u(-0.006, 0.01),
            iris_color=shapes.jitter(_IRIS[rng.integers(len(_IRIS))], rng, 10),
            brow_gap=u(0.045, 0.06), brow_thick=u(0.008, 0.015), brow_arch=u(0.0, 0.014),
            brow_color=shapes.mix(hair, (20, 16, 16), u(0.2, 0.6)),
            nose_style=str(rng.choice(NOSES)), nose_y=nose_y, nose_size=nose_size,
            mouth_y=mouth_y, mouth_w=u(0.058, 0.072), lip_upper=u(0.009, 0.016),
            lip_lower=u(0.013, 0.022), lip_color=lip, blush=bool(rng.random() < 0.4),
            glasses=str(rng.choice(GLASSES, p=(0.78, 0.11, 0.11))),
            glasses_color=shapes.hsv(u(0, 1), u(0, 0.6), u(0.1, 0.45)),
            shirt_color=shapes.hsv(u(0, 1), u(0.25, 0.75), u(0.3, 0.9)), collar=str(rng.choice(COLLARS)),
            shoulder_w=u(0.4, 0.48), bg_color=shapes.hsv(bg_h, u(0.1, 0.4), u(0.55, 0.92)),
            bg_color2=shapes.hsv((bg_h + u(-0.15, 0.15)) % 1.0, u(0.1, 0.4), u(0.5, 0.95)),
            bg_pattern=str(rng.choice(BACKGROUNDS)),
        )


@dataclass(frozen=True)
class FaceState:
    """What the face does in one frame. Pose: dx, dy in fractions of the canvas width / height."""

    mouth_open: float = 0.0  # 0 closed .. 1 wide open
    mouth_width: float = 0.5  # 0 rounded / narrow .. 1 spread
    smile: float = 0.0  # -1 corners down .. 1 corners up
    blink: float = 0.0  # 0 open .. 1 closed
    brow_raise: float = 0.0  # 0 rest .. 1 raised
    dx: float = 0.0
    dy: float = 0.0
    roll: float = 0.0  # degrees, positive = clockwise on screen
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name, lo, hi in _STATE_RANGES:
            v = getattr(self, name)
            if not (isinstance(v, int | float | np.floating | np.integer) and lo <= v <= hi):
                raise ValueError(f"FaceState.{name}={v!r} is outside [{lo}, {hi}]")

    def as_array(self) -> np.ndarray:
        """The fields in ``STATE_FIELDS`` order as float32 ``(9,)``."""
        return np.asarray(astuple(self), dtype=np.float32)

    @classmethod
    def from_array(cls, values: np.ndarray) -> FaceState:
        """Inverse of ``as_array`` (values are clipped into range to absorb float32 rounding)."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size != len(STATE_FIELDS):
            raise ValueError(f"expected {len(STATE_FIELDS)} state values, got {v.size}")
        return cls(*(float(np.clip(x, lo, hi)) for x, (_, lo, hi) in zip(v, _STATE_RANGES, strict=True)))


_STATE_RANGES = (("mouth_open", 0.0, 1.0), ("mouth_width", 0.0, 1.0), ("smile", -1.0, 1.0),
                 ("blink", 0.0, 1.0), ("brow_raise", 0.0, 1.0), ("dx", -0.25, 0.25),
                 ("dy", -0.25, 0.25), ("roll", -30.0, 30.0), ("scale", 0.7, 1.3))
STATE_FIELDS = tuple(f.name for f in fields(FaceState))
assert STATE_FIELDS == tuple(r[0] for r in _STATE_RANGES)
NEUTRAL = FaceState()


@dataclass(frozen=True)
class RenderInfo:
    """Where things are in a rendered frame (pixels; see the module doc for the box convention)."""

    face_box: Box  # the face outline (no hair, no ears)
    mouth_box: Box  # fixed for identity + pose; holds the mouth at any opening / width / smile
    eyes_box: Box  # both eyes


# ---------------------------------------------------------------------------------------------
# Public rendering


def render(identity: Identity, state: FaceState = NEUTRAL,
           size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, RenderInfo]:
    """Draw one frame: ``(uint8 (H, W, 3) RGB, RenderInfo)``; ``size`` is ``(height, width)``."""
    h, w = _check_size(size)
    canvas = _background(identity, h * _SS, w * _SS).copy()
    pose = _Pose(state, h, w)
    _draw_face(canvas, identity, state, pose)
    img = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    return img, _info(identity, pose, h, w)


def render_pair(id_a: Identity, state_a: FaceState, id_b: Identity, state_b: FaceState,
                size: tuple[int, int] = (128, 256)) -> tuple[np.ndarray, tuple[RenderInfo, RenderInfo]]:
    """Two faces side by side, each in its own half (``width`` must be even); boxes in scene pixels."""
    h, w = _check_size(size)
    if w % 2:
        raise ValueError(f"render_pair needs an even width, got size={size}")
    left, info_a = render(id_a, state_a, (h, w // 2))
    right, info_b = render(id_b, state_b, (h, w // 2))
    info_b = RenderInfo(*((b[0] + w // 2, b[1], b[2] + w // 2, b[3]) for b in astuple(info_b)))
    return np.concatenate([left, right], axis=1), (info_a, info_b)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in size) if len(size) == 2 else (0, 0)
    if not (16 <= h <= 4096 and 16 <= w <= 4096):
        raise ValueError(f"size must be (height, width) with 16..4096 pixels per side, got {size!r}")
    return h, w


# ---------------------------------------------------------------------------------------------
# Pose: head units -> fixed-point pixels of the 2x canvas


class _Pose:
    """Similarity transforms of one frame: ``head`` (with roll) and ``body`` (without)."""

    def __init__(self, state: FaceState, h: int, w: int):
        self.unit = min(h, w) * _SS * ZOOM * state.scale  # 2x pixels per head unit
        centre = np.array([(FACE_CENTER[0] + state.dx) * w * _SS, (FACE_CENTER[1] + state.dy) * h * _SS])
        self.roll = state.roll
        t = math.radians(state.roll)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        pivot = np.array([0.0, 0.3])  # the head rolls about the top of the neck
        # head: p -> ((p - pivot) R^T + pivot) * unit + centre, as one affine map in 2x pixels
        self._head_m = rot.T * self.unit
        self._head_b = (pivot - pivot @ rot.T) * self.unit + centre
        self._body_b = centre

    def head_f(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) head units -> (N, 2) float 2x pixels."""
        return pts @ self._head_m + self._head_b

    def head(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) head units -> (N, 2) int32 fixed-point 2x pixels (``_SHIFT`` fractional bits)."""
        return np.rint(self.head_f(pts) * _FIX).astype(np.int32)

    def body(self, pts: np.ndarray) -> np.ndarray:
        return np.rint((pts * self.unit + self._body_b) * _FIX).astype(np.int32)

    def head_ellipse(self, center: tuple[float, float], axes: tuple[float, float], angle: float = 0.0):
        cx, cy = self.head(np.asarray([center]))[0]
        ax, ay = np.rint(np.asarray(axes) * self.unit * _FIX).astype(int)
        return (int(cx), int(cy)), (int(ax), int(ay)), angle + self.roll

    def px(self, length: float) -> int:
        """A line thickness in whole 2x pixels (OpenCV thickness has no sub-pixel part)."""
        return max(1, int(round(length * self.unit)))


def _fill(img: np.ndarray, pts: np.ndarray | list[np.ndarray], color: RGB) -> None:
    cv2.fillPoly(img, pts if isinstance(pts, list) else [pts], color, _AA, _SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, color: RGB, thickness: int, closed: bool = False) -> None:
    cv2.polylines(img, [pts], closed, color, thickness, _AA, _SHIFT)


def _ellipse(img: np.ndarray, args, color: RGB, thickness: int = -1) -> None:
    center, axes, angle = args
    cv2.ellipse(img, center, axes, angle, 0, 360, color, thickness, _AA, _SHIFT)


# ---------------------------------------------------------------------------------------------
# Drawing, back to front


def _draw_face(img: np.ndarray, idt: Identity, st: FaceState, pose: _Pose) -> None:
    g = _geometry(idt)
    skin = idt.skin
    # 1. hair behind the head, neck, shirt
    for poly in g.hair_back:
        _fill(img, pose.head(poly), idt.hair_color)
    _fill(img, pose.body(g.neck), shapes.mix(skin, (40, 20, 20), 0.18))
    _fill(img, pose.body(g.shirt), idt.shirt_color)
    for poly, color in g.collar:
        _fill(img, pose.body(poly), color)
    # 2. ears, face, cheeks, nose
    if g.ears:
        for side in (-1, 1):
            _ellipse(img, pose.head_ellipse((side * idt.face_rx * 0.97, idt.eye_y + 0.03), (0.032, 0.05)),
                     shapes.mix(skin, (60, 20, 20), 0.1))
    _fill(img, pose.head(g.face), skin)
    _line(img, pose.head(g.face), shapes.mix(skin, (60, 30, 30), 0.25), 1, closed=True)
    if idt.blush:
        for side in (-1, 1):
            _ellipse(img, pose.head_ellipse((side * idt.face_rx * 0.58, idt.mouth_y - 0.045), (0.032, 0.018)),
                     shapes.mix(skin, (236, 120, 130), 0.22))
    _draw_nose(img, idt, pose)
    # 3. eyes, brows, mouth
    for side in (-1, 1):
        _draw_eye(img, idt, st, pose, side)
        _draw_brow(img, idt, st, pose, side)
    _draw_mouth(img, idt, st, pose)
    # 4. hair in front (fringe), glasses
    for poly in g.hair_front:
        _fill(img, pose.head(poly), idt.hair_color)
    if idt.glasses != "none":
        _draw_glasses(img, idt, pose)


def _draw_nose(img: np.ndarray, idt: Identity, pose: _Pose) -> None:
    y, s, skin = idt.nose_y, idt.nose_size, idt.skin
    shade = shapes.mix(skin, (70, 30, 20), 0.28)
    if idt.nose_style == "button":
        _ellipse(img, pose.head_ellipse((0.0, y), (s * 0.75, s * 0.5)), shapes.mix(skin, (255, 255, 255), 0.12))
        for side in (-1, 1):
            _ellipse(img, pose.head_ellipse((side * s * 0.45, y + s * 0.35), (s * 0.2, s * 0.13)), shade)
    elif idt.nose_style == "line":
        t = np.linspace(0, 1, 8)[:, None]
        pts = np.hstack([s * (0.1 + 0.5 * t ** 3), y - s * 2.0 + s * 2.4 * t]).reshape(-1, 2)
        pts = np.vstack([pts, [[s * 0.1, y + s * 0.55], [-s * 0.25, y + s * 0.45]]])
        _line(img, pose.head(pts), shade, pose.px(0.006))
    else:  # soft: a shadow under the tip
        _ellipse(img, pose.head_ellipse((0.0, y + s * 0.35), (s * 0.85, s * 0.35)),
                 shapes.mix(skin, (70, 30, 20), 0.16))
        _ellipse(img, pose.head_ellipse((0.0, y), (s * 0.55, s * 0.45)), skin)


def _draw_eye(img: np.ndarray, idt: Identity, st: FaceState, pose: _Pose, side: int) -> None:
    ex, ey, ew, eh = side * idt.eye_dx, idt.eye_y, idt.eye_w, idt.eye_h
    u = np.linspace(-1.0, 1.0, 13)
    tilt = -idt.eye_tilt * u * side  # the outer corner moves up for positive tilt
    top = np.stack([ex + ew * u, ey + tilt - eh * (1 - u * u) ** 0.65], axis=1)
    low = np.stack([ex + ew * u, ey + tilt + 0.8 * eh * (1 - u * u) ** 0.8], axis=1)
    outline = np.vstack([top, low[::-1]])
    skin = idt.skin
    # 1. white, iris, pupil, highlight; then repaint skin around the eye to clip the iris
    _fill(img, pose.head(outline), (246, 244, 240))
    r = min(eh * 0.95, ew * 0.58)
    _ellipse(img, pose.head_ellipse((ex, ey + 0.1 * eh), (r, r)), idt.iris_color)
    _ellipse(img, pose.head_ellipse((ex, ey + 0.1 * eh), (r * 0.5, r * 0.5)), _PUPIL)
    _ellipse(img, pose.head_ellipse((ex + 0.35 * r, ey - 0.3 * r), (r * 0.22, r * 0.22)), (255, 255, 255))
    ring = (outline - (ex, ey)) * (1.25, 1.9) + (ex, ey)
    _fill(img, [pose.head(ring), pose.head(outline)], skin)
    # 2. lids: the upper lid comes down with blink; a smile pushes the lower lid up
    lid_color = shapes.mix(skin, (40, 20, 20), 0.08)
    if st.smile > 0.05:
        cheek = low.copy()
        cheek[:, 1] -= 0.35 * st.smile * eh * (1 - u * u)
        _fill(img, pose.head(np.vstack([low + (0, 0.2 * eh), cheek[::-1]])), skin)
        low = cheek
    lid = top.copy()
    lid[:, 1] += st.blink * (low[:, 1] - top[:, 1])
    if st.blink > 0.01:
        _fill(img, pose.head(np.vstack([top - (0, 0.25 * eh), lid[::-1]])), lid_color)
    _line(img, pose.head(lid), (34, 26, 28), pose.px(0.0075))
    corner = lid[0] if side < 0 else lid[-1]
    lash = np.array([corner, corner + (side * 0.25 * ew, -0.2 * eh)])
    _line(img, pose.head(lash), (34, 26, 28), pose.px(0.006))


def _draw_brow(img: np.ndarray, idt: Identity, st: FaceState, pose: _Pose, side: int) -> None:
    u = np.linspace(0.0, 1.0, 9)  # 0 inner end .. 1 outer end
    x = side * (idt.eye_dx - idt.eye_w * 1.05 + u * idt.eye_w * 2.35)
    sad = max(0.0, -st.smile)
    arch = (idt.brow_arch + 0.01 * st.brow_raise) * np.sin(np.pi * np.clip(u * 1.15, 0, 1))
    y = (idt.eye_y - idt.brow_gap - 0.028 * st.brow_raise - arch
         - 0.018 * sad * (1 - u) ** 2 + 0.004 * u)
    half = idt.brow_thick * (0.75 - 0.4 * u) + 0.002  # tapers towards the outer end
    poly = np.vstack([np.stack([x, y - half], axis=1), np.stack([x, y + half], axis=1)[::-1]])
    _fill(img, pose.head(poly), idt.brow_color)


def _draw_mouth(img: np.ndarray, idt: Identity, st: FaceState, pose: _Pose) -> None:
    u = np.linspace(-1.0, 1.0, 17)
    w = idt.mouth_w * (0.75 + 0.5 * st.mouth_width) * (1.0 + 0.12 * max(st.smile, 0.0))
    h = 0.004 + MAX_MOUTH_OPEN * st.mouth_open  # interior height; a closed mouth is a thin dark line
    base = idt.mouth_y - 0.45 * st.smile * w * u * u  # corners up for a smile, down for sad
    env = (1.0 - u * u) ** 0.7
    bow = (1.0 - u * u) ** 0.5 * (1.0 - 0.3 * np.exp(-(u / 0.2) ** 2))  # cupid's bow dip

    def curve(y: np.ndarray) -> np.ndarray:
        return np.stack([u * w, y], axis=1)

    upper_in, lower_in = curve(base - 0.35 * h * env), curve(base + 0.65 * h * env)  # the jaw drops more
    upper_out = curve(upper_in[:, 1] - idt.lip_upper * bow)
    lower_out = curve(lower_in[:, 1] + idt.lip_lower * (1.0 - u * u) ** 0.55)
    _fill(img, pose.head(np.vstack([upper_out, lower_out[::-1]])), idt.lip_color)
    _fill(img, pose.head(np.vstack([upper_in, lower_in[::-1]])), _INTERIOR)
    if st.mouth_open > 0.08:  # upper teeth: a fixed fraction of the opening (the probe stays linear)
        teeth = curve(upper_in[:, 1] + 0.22 * h * env)
        _fill(img, pose.head(np.vstack([upper_in[2:-2], teeth[2:-2][::-1]])), _TEETH)
    shine = curve(0.4 * lower_in[:, 1] + 0.6 * lower_out[:, 1])[5:-5]
    _line(img, pose.head(shine), shapes.mix(idt.lip_color, (255, 255, 255), 0.18), pose.px(0.004))


def _draw_glasses(img: np.ndarray, idt: Identity, pose: _Pose) -> None:
    t = pose.px(0.007)
    r = idt.eye_w * 1.45
    for side in (-1, 1):
        cx, cy = side * idt.eye_dx, idt.eye_y + 0.004
        if idt.glasses == "round":
            _ellipse(img, pose.head_ellipse((cx, cy), (r, r * 0.85)), idt.glasses_color, t)
        else:
            box = np.array([[cx - r, cy - r * 0.7], [cx + r, cy - r * 0.7], [cx + r, cy + r * 0.75],
                            [cx - r, cy + r * 0.75]])
            _line(img, pose.head(box), idt.glasses_color, t, closed=True)
    bridge = np.array([[-idt.eye_dx + r, idt.eye_y - 0.005], [0, idt.eye_y - 0.012],
                       [idt.eye_dx - r, idt.eye_y - 0.005]])
    _line(img, pose.head(bridge), idt.glasses_color, t)


# ---------------------------------------------------------------------------------------------
# Boxes


def _info(idt: Identity, pose: _Pose, h: int, w: int) -> RenderInfo:
    g = _geometry(idt)
    return RenderInfo(face_box=_box(pose.head_f(g.face), h, w), mouth_box=_box(pose.head_f(g.mouth_box), h, w),
                      eyes_box=_box(pose.head_f(g.eyes_box), h, w))


def _box(pts2x: np.ndarray, h: int, w: int) -> Box:
    p = pts2x / _SS
    x0, y0 = np.floor(p.min(axis=0)).astype(int)
    x1, y1 = np.ceil(p.max(axis=0)).astype(int)
    return (int(np.clip(x0, 0, w)), int(np.clip(y0, 0, h)), int(np.clip(x1, 0, w)), int(np.clip(y1, 0, h)))


# ---------------------------------------------------------------------------------------------
# Per-identity static geometry and background (cached)


@dataclass(frozen=True)
class _Geometry:
    """An identity's static polygons: head units (head pose) or body units (neck, shirt, collar)."""

    face: np.ndarray
    hair_back: tuple[np.ndarray, ...]
    hair_front: tuple[np.ndarray, ...]
    ears: bool
    neck: np.ndarray
    shirt: np.ndarray
    collar: tuple[tuple[np.ndarray, RGB], ...]
    mouth_box: np.ndarray  # 4 corners
    eyes_box: np.ndarray


@lru_cache(maxsize=4096)
def _geometry(idt: Identity) -> _Geometry:
    rx, ry = idt.face_rx, idt.face_ry
    back, front, ears = shapes.hair(idt)
    # the mouth box: everything any mouth state can reach, rest line at MOUTH_BOX_ANCHOR
    reach_w = idt.mouth_w * 1.25 * 1.12 + 0.012
    up = max(0.35 * (MAX_MOUTH_OPEN + 0.004) + idt.lip_upper, 0.45 * reach_w) + 0.008
    down = max(0.65 * (MAX_MOUTH_OPEN + 0.004) + idt.lip_lower, 0.45 * reach_w) + 0.008
    half_h = max(up / MOUTH_BOX_ANCHOR, down / (1 - MOUTH_BOX_ANCHOR))
    top, bottom = idt.mouth_y - MOUTH_BOX_ANCHOR * half_h, idt.mouth_y + (1 - MOUTH_BOX_ANCHOR) * half_h
    mouth_box = np.array([[-reach_w, top], [reach_w, top], [reach_w, bottom], [-reach_w, bottom]])
    ex = idt.eye_dx + idt.eye_w * 1.1
    eyes_box = np.array([[-ex, idt.eye_y - idt.eye_h * 1.4], [ex, idt.eye_y - idt.eye_h * 1.4],
                         [ex, idt.eye_y + idt.eye_h * 1.2], [-ex, idt.eye_y + idt.eye_h * 1.2]])
    neck_w = rx * 0.42
    neck = np.array([[-neck_w, ry * 0.5], [neck_w, ry * 0.5], [neck_w * 1.05, 0.45], [-neck_w * 1.05, 0.45]])
    shirt, collar = shapes.clothes(idt, neck_w)
    return _Geometry(face=shapes.face_outline(rx, ry, idt.jaw), hair_back=back, hair_front=front, ears=ears,
                     neck=neck, shirt=shirt, collar=collar, mouth_box=mouth_box, eyes_box=eyes_box)


@lru_cache(maxsize=256)
def _background(idt: Identity, h: int, w: int) -> np.ndarray:
    """The identity's background at (h, w); cached and read-only (callers copy)."""
    bg = shapes.paint_background(idt, h, w)
    bg.setflags(write=False)
    return bg
