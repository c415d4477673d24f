"""Measurements on frames, shared by the teacher tests and the demo model's eval (issue 6).

All probes take a uint8 RGB frame (H, W, 3) and, where they look at the mouth, the mouth box from
``RenderInfo`` (``(x0, y0, x1, y1)`` pixels, exclusive end). The renderer guarantees what they rely on:

- the mouth interior is the darkest thing inside the mouth box (luma ~27; lips, skin, teeth, nose and
  background are all much lighter), so the opening is the vertical extent of dark pixels;
- the mouth box depends on identity and pose only, with the mouth's rest line at
  ``MOUTH_BOX_ANCHOR`` of its height, so corner lift is measured against that line;
- the top rows of the mouth box are skin (the nose is kept above the box).

They are plain numpy / OpenCV and work on generated (blurrier) frames the same way: darkness and
colour masks are soft ramps, not hard thresholds, so a blurred mouth still measures continuously.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from avatar.drawn.face import MOUTH_BOX_ANCHOR, Box

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_DARK_FULL, _DARK_NONE = 35.0, 60.0  # luma ramp: fully "interior" at or below 35, not at all above 60
_CENTRAL = 0.4  # mouth opening: only the middle 40% of the box's columns (the corners may show hair)
_TOP_COLUMNS = 0.5  # ... and of those, the mean dark extent of the darkest half
_SKIN_DIST = (18.0, 48.0)  # colour distance ramp from the skin colour (RGB units) for the mouth mask
_CORNER_COLUMNS = 0.15  # corner lift: the outer 15% of the mouth's width on each side


def mouth_opening(frame: np.ndarray, mouth_box: Box) -> float:
    """Vertical extent of the dark mouth interior as a fraction of the box height (~0 closed .. ~0.35 at
    ``mouth_open=1`` on teacher frames, linear in between).

    Per column of the middle 40% of the box, the soft dark-pixel count; the mean of the largest half of
    those columns, divided by the box height. Column counts (not the bounding extent) keep it
    insensitive to head roll and mouth width; the middle columns keep hair or clothes that can show in
    the box's lower corners (long hair, a narrow chin) out of it.
    """
    patch = _crop(frame, mouth_box)
    w = patch.shape[1]
    cut = int(round(w * (1 - _CENTRAL) / 2))
    patch = patch[:, cut: w - cut] if w - 2 * cut >= 1 else patch
    luma = patch.astype(np.float32) @ _LUMA  # (h, w)
    dark = np.clip((_DARK_NONE - luma) / (_DARK_NONE - _DARK_FULL), 0.0, 1.0)
    cols = np.sort(dark.sum(axis=0))[::-1]
    k = max(1, int(math.ceil(_TOP_COLUMNS * cols.size)))
    return float(cols[:k].mean() / patch.shape[0])


def mouth_corner_lift(frame: np.ndarray, mouth_box: Box) -> float:
    """How far the mouth corners sit above the mouth's rest line, as a fraction of the box height.

    Positive = corners up (smile), negative = down (sad). The mouth is the connected blob of pixels
    whose colour differs from the skin (the median of the box's top two rows) that covers the box
    centre; its corners are the centroid of its outer 15% of columns on each side (averaging left and
    right cancels head roll to first order). The rest line is ``MOUTH_BOX_ANCHOR`` of the box height.
    """
    patch = _crop(frame, mouth_box).astype(np.float32)
    h, w = patch.shape[:2]
    skin = np.median(patch[:2].reshape(-1, 3), axis=0)
    dist = np.linalg.norm(patch - skin, axis=-1)
    lo, hi = _SKIN_DIST
    soft = np.clip((dist - lo) / (hi - lo), 0.0, 1.0)
    soft *= _central_blob(soft > 0.5, h, w)
    mass = soft.sum(axis=0)
    cols = np.flatnonzero(mass > 0.25)
    if cols.size < 2:
        return 0.0  # no mouth found: report the rest line
    left, right = int(cols[0]), int(cols[-1])
    k = max(1, int(round(_CORNER_COLUMNS * (right - left + 1))))
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5  # pixel centres
    corners = np.r_[left: left + k, right - k + 1: right + 1]
    m = soft[:, corners]
    corner_y = float((rows * m).sum() / max(m.sum(), 1e-6))
    return (MOUTH_BOX_ANCHOR * h - corner_y) / h


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images (``inf`` when identical)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs same-shape images, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def _crop(frame: np.ndarray, box: Box) -> np.ndarray:
    f = np.asarray(frame)
    if f.ndim != 3 or f.shape[2] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {f.shape}")
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, f.shape[1]), min(y1, f.shape[0])
    if x1 - x0 < 3 or y1 - y0 < 3:
        raise ValueError(f"mouth box {box} leaves less than 3x3 pixels inside the {f.shape[1]}x{f.shape[0]} frame")
    return f[y0:y1, x0:x1]


def _central_blob(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """The connected component of ``mask`` with most pixels near the box centre, dilated by one pixel
    (to keep its antialiased rim); background showing in a box corner is a separate blob."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros((h, w), dtype=np.float32)
    cy, cx = int(MOUTH_BOX_ANCHOR * h), w // 2
    core = labels[max(cy - h // 4, 0): cy + h // 4 + 1, max(cx - w // 6, 0): cx + w // 6 + 1]
    counts = np.bincount(core.ravel(), minlength=n)
    counts[0] = 0
    if counts.max() == 0:
        return np.zeros((h, w), dtype=np.float32)
    blob = (labels == int(counts.argmax())).astype(np.uint8)
    return cv2.dilate(blob, np.ones((3, 3), np.uint8)).astype(np.float32)
