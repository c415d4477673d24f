"""Colour helpers and static shapes of the drawn face renderer (`avatar.drawn.face`).

Shapes are polygons in head units (fractions of the canvas' shorter side, origin at the face centre, y down);
the shirt is in body units with the same origin. Colours are RGB tuples. Everything here is a pure function
of an ``Identity`` (read by attribute only) and its numbers, so the renderer can cache it per identity.
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from avatar.drawn.face import Identity

RGB = tuple[int, int, int]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def jitter(c: RGB, rng: np.random.Generator, amount: int) -> RGB:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]


def luma(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def hsv(h: float, s: float, v: float) -> RGB:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Static shapes (head units; the shirt in body units, same origin)


def ellipse_pts(cx: float, cy: float, ax: float, ay: float, t0: float = 0.0, t1: float = 2 * np.pi,
                 n: int = 48) -> np.ndarray:
    t = np.linspace(t0, t1, n, endpoint=(t1 - t0) < 2 * np.pi)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def face_outline(rx: float, ry: float, jaw: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    s = np.sin(t)
    lower = np.clip(s, 0, None)  # 0 on the upper half, up to 1 at the chin
    x = rx * np.cos(t) * (1 - jaw * lower ** 2.5)
    y = ry * s * (1 + 0.04 * lower ** 6)
    return np.stack([x, y], axis=1)


def hair(idt: Identity) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], bool]:
    """(polygons behind the face, polygons in front of it, ears visible)."""
    rx, ry, v, style = idt.face_rx, idt.face_ry, idt.hair_volume, idt.hair_style
    rng = np.random.default_rng([idt.seed, 0x4A1])
    tight = style in ("buzz", "bun")
    cx, cy, ax, ay = 0.0, -0.2 * ry, rx * (1.03 if tight else 1.08 * v), ry * (0.95 if tight else 0.98 * v)
    back: list[np.ndarray] = [ellipse_pts(cx, cy, ax, ay, n=64)]  # the crown
    # hairline across the forehead: y(u) for u = x / ax from +1 (right temple) to -1 (left temple)
    y_mid, p, tilt, zig = -0.6 * ry, 2.5, 0.0, 0.0
    ears = style not in ("bob", "long", "afro")
    if style == "bob":
        y_mid, p = -0.42 * ry, 8.0
        back.append(rounded_rect(-rx * 1.2 * v, cy, rx * 1.2 * v, ry * 0.78, 0.08))
    elif style == "long":
        y_mid, p = -0.78 * ry, 0.7
        back.append(rounded_rect(-rx * 1.22 * v, cy, rx * 1.22 * v, ry * 1.9, 0.06))
    elif style == "afro":
        t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        r = rx * 1.5 * v * (1 + 0.035 * np.sin(t * 14 + rng.uniform(0, 6)))
        back = [np.stack([r * np.cos(t), -0.35 * ry + r * 0.92 * np.sin(t)], axis=1)]
        y_mid, p = -0.62 * ry, 2.0
    elif style == "bun":
        back.append(ellipse_pts(0.0, -ry * 1.1, rx * 0.36, rx * 0.32))
        y_mid, p = -0.74 * ry, 2.0
    elif style == "spiky":
        t = np.linspace(np.pi, 2 * np.pi, 60)
        saw = np.abs(((t - np.pi) / np.pi * 7) % 1.0 - 0.5) * 2  # 7 spikes over the top
        r = 1 + 0.18 * saw * np.sin(t) ** 2  # spikes point outwards, strongest on top
        back.append(np.stack([cx + ax * r * np.cos(t), cy + ay * r * np.sin(t)], axis=1))
        y_mid, zig = -0.55 * ry, 0.05 * ry
    elif style == "side_part":
        y_mid, tilt = -0.52 * ry, 0.18 * ry * (1 if idt.seed % 2 else -1)
    elif style == "buzz":
        y_mid, p = -0.7 * ry, 3.0
    u = np.linspace(1.0, -1.0, 33)
    y = y_mid + (cy - y_mid) * np.abs(u) ** p + tilt * u * (1 - np.abs(u) ** p)
    y += zig * (np.abs((u * 4.5) % 1.0 - 0.5) * 2 - 0.5)
    hairline = np.stack([ax * u, np.minimum(y, cy)], axis=1)  # meets the crown at the temples
    arc = ellipse_pts(cx, cy, ax, ay, np.pi, 2 * np.pi, n=33)  # left temple, over the top, right temple
    front: list[np.ndarray] = [np.vstack([arc, hairline])]
    if style in ("bob", "long"):  # locks down the sides of the face
        bottom = ry * (0.72 if style == "bob" else 1.0)
        for side in (-1, 1):
            ys = np.linspace(cy, bottom, 12)
            inner = rx * (0.9 - 0.1 * ((ys - cy) / (bottom - cy)) ** 2)
            front.append(np.vstack([np.stack([side * inner, ys], 1), [[side * rx * 1.2 * v, bottom],
                                                                       [side * rx * 1.2 * v, cy]]]))
    return tuple(back), tuple(front), ears


def rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float) -> np.ndarray:
    """A rectangle with its two bottom corners rounded (radius r)."""
    return np.vstack([[[x0, y0], [x1, y0]], ellipse_pts(x1 - r, y1 - r, r, r, 0.0, 0.5 * np.pi, n=6),
                      ellipse_pts(x0 + r, y1 - r, r, r, 0.5 * np.pi, np.pi, n=6)])


def clothes(idt: Identity, neck_w: float) -> tuple[np.ndarray, tuple[tuple[np.ndarray, RGB], ...]]:
    """Shirt polygon and collar pieces (polygon, colour), body units."""
    y0, sw = 0.345, idt.shoulder_w
    t = np.linspace(0, 1, 10)
    right = np.stack([neck_w * 1.25 + (sw - neck_w * 1.25) * t, y0 + 0.1 * t ** 2.2], axis=1)
    shirt = np.vstack([right[::-1] * (-1, 1), right, [[0.9, 0.8], [-0.9, 0.8]]])  # sides run off-canvas
    neck = mix(idt.skin, (40, 20, 20), 0.18)
    band = mix(idt.shirt_color, (0, 0, 0), 0.25)
    c = idt.collar
    if c == "crew":
        outer = ellipse_pts(0.0, y0 - 0.004, neck_w * 1.32, 0.05, 0, np.pi, n=16)
        inner = ellipse_pts(0.0, y0 - 0.004, neck_w * 1.12, 0.035, 0, np.pi, n=16)
        return shirt, ((outer, band), (inner, neck))
    if c in ("v", "shirt"):
        depth = 0.1 if c == "v" else 0.085
        outer = np.array([[-neck_w * 1.3, y0 - 0.01], [neck_w * 1.3, y0 - 0.01], [0.0, y0 + depth + 0.02]])
        inner = np.array([[-neck_w * 1.1, y0 - 0.01], [neck_w * 1.1, y0 - 0.01], [0.0, y0 + depth]])
        if c == "v":
            return shirt, ((outer, band), (inner, neck))
        flap_color = (244, 244, 240) if sum(idt.shirt_color) < 420 else mix(idt.shirt_color, (0, 0, 0), 0.35)
        flaps = tuple((np.array([[s * neck_w * 1.15, y0 - 0.02], [s * 0.012, y0 + depth + 0.01],
                                 [s * neck_w * 2.2, y0 + 0.06]]), flap_color) for s in (-1, 1))
        return shirt, ((inner, neck), *flaps)
    tube = rounded_rect(-neck_w * 1.12, 0.27, neck_w * 1.12, y0 + 0.03, 0.02)[::-1]
    fold = np.array([[-neck_w * 1.12, y0 - 0.03], [neck_w * 1.12, y0 - 0.03], [neck_w * 1.12, y0 - 0.02],
                     [-neck_w * 1.12, y0 - 0.02]])
    return shirt, ((tube, mix(idt.shirt_color, (255, 255, 255), 0.08)), (fold, band))


def paint_background(idt: Identity, h: int, w: int) -> np.ndarray:
    a = np.asarray(idt.bg_color, dtype=np.float32)
    b = np.asarray(idt.bg_color2, dtype=np.float32)
    s = float(min(h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pat = idt.bg_pattern
    if pat == "flat":
        t = np.zeros((h, w), np.float32)
    elif pat == "vgradient":
        t = yy / max(h - 1, 1)
    elif pat == "radial":
        r = np.hypot(xx - w * 0.5, yy - h * 0.4) / (0.75 * s)
        t = np.clip(r, 0, 1) ** 1.5
    elif pat == "stripes":
        period = 0.16 * s
        t = 0.35 * np.clip((np.sin(2 * np.pi * (xx + yy) / period) - 0.3) * 3, 0, 1)
    elif pat == "dots":
        period = 0.14 * s
        d = np.hypot((xx % period) - period / 2, (yy % period) - period / 2) / period
        t = 0.6 * np.clip((0.2 - d) * 20, 0, 1)
    else:  # split: two tones with a soft vertical edge
        t = np.clip((xx - 0.66 * w) / (0.01 * s) + 0.5, 0, 1)
    img = a + (b - a) * t[..., None]
    return np.ascontiguousarray(np.clip(np.round(img), 0, 255).astype(np.uint8))
