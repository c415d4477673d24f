"""Face boxes, face detectors and the FAA face masks built from them.

A detector turns an RGB portrait into face boxes in pixel coordinates, largest first. Three implementations:

- `InsightFaceDetector`: insightface's SCRFD detector from a local model-pack directory. It never downloads:
  a missing pack is a `FileNotFoundError` naming the directory and the files it expected.
- `HaarFaceDetector`: OpenCV 4.x's bundled frontal-face Haar cascade (OpenCV 5 ships no cascades).
- `FixedBoxes`: boxes the user gives explicitly.

`make_detector` picks one: explicit boxes, else insightface when a model directory is configured, else Haar.

Masks follow HunyuanVideo-Avatar's face-aware audio adapter (anchors-models §2.3): the face box is scaled
3x in width and height around its centre, clipped to the image, rasterised at pixel resolution and
reduced to the grid the DiT reads (token grid = image // 16 for a Wan VAE (8x) and a (1, 2, 2) patch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

FAA_MASK_SCALE = 3.0  # HunyuanVideo-Avatar get_facemask(area=3.0): covers moderate head motion
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
INSIGHTFACE_PACK = "buffalo_l"  # default pack name; its detector is det_10g.onnx (SCRFD-10GF)


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box in pixels: [x0, x1) x [y0, y1), origin at the top-left corner.

    `score` is the detector's confidence; its scale is detector-specific (SCRFD: probability in [0, 1],
    Haar: cascade level weight, explicit boxes: 1.0). Only the ordering of scores within one detector means much.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    def __post_init__(self) -> None:
        for field in ("x0", "y0", "x1", "y1", "score"):  # plain floats: numpy scalars would leak into JSON
            object.__setattr__(self, field, float(getattr(self, field)))
        coords = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(c) for c in coords):
            raise ValueError(f"face box has a non-finite coordinate: {coords}")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"face box must have x1 > x0 and y1 > y0, got {coords}")

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def scaled(self, scale: float) -> FaceBox:
        """The box scaled by `scale` in width and height around its centre (not clipped)."""
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        cx, cy = self.centre
        hw, hh = self.width * scale / 2, self.height * scale / 2
        return FaceBox(cx - hw, cy - hh, cx + hw, cy + hh, self.score)

    def clipped(self, image_hw: tuple[int, int]) -> FaceBox | None:
        """The part of the box inside an image of (height, width) pixels; None if nothing is left."""
        h, w = image_hw
        x0, y0 = max(self.x0, 0.0), max(self.y0, 0.0)
        x1, y1 = min(self.x1, float(w)), min(self.y1, float(h))
        if x1 <= x0 or y1 <= y0:
            return None
        return FaceBox(x0, y0, x1, y1, self.score)

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1, self.score)


def union_box(boxes: Sequence[FaceBox]) -> FaceBox:
    """The smallest box containing all `boxes` (score: the lowest of theirs)."""
    if not boxes:
        raise ValueError("union_box needs at least one box")
    return FaceBox(
        min(b.x0 for b in boxes), min(b.y0 for b in boxes),
        max(b.x1 for b in boxes), max(b.y1 for b in boxes),
        min(b.score for b in boxes),
    )


def largest_first(boxes: Iterable[FaceBox]) -> list[FaceBox]:
    """Sort by area, largest first; ties by higher score, then left to right (a stable, total order)."""
    return sorted(boxes, key=lambda b: (-b.area, -b.score, b.x0, b.y0))


def _check_rgb(image_rgb: np.ndarray) -> tuple[int, int]:
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image_rgb.dtype} {image_rgb.shape}")
    return image_rgb.shape[0], image_rgb.shape[1]


# ---------------------------------------------------------------------------------------------------------
# Detectors


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in an RGB image.

    `name` identifies the detector and its settings; it is part of the prepared-avatar cache key, so two
    detectors that can return different boxes must have different names.
    """

    name: str

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        """image_rgb: (H, W, 3) uint8 RGB -> face boxes in pixels, sorted by area, largest first."""
        ...


class FixedBoxes:
    """Boxes given by the user (pixel coordinates of the image they will be used on)."""

    def __init__(self, boxes: Iterable[FaceBox | Sequence[float]]):
        parsed = [b if isinstance(b, FaceBox) else FaceBox(*b) for b in boxes]
        if not parsed:
            raise ValueError("FixedBoxes needs at least one box")
        self.boxes = tuple(largest_first(parsed))
        coords = ";".join(",".join(f"{v:g}" for v in b.as_tuple()[:4]) for b in self.boxes)
        self.name = f"fixed:{coords}"

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        h, w = _check_rgb(image_rgb)
        for b in self.boxes:
            if b.clipped((h, w)) is None:
                raise ValueError(f"explicit face box {b.as_tuple()[:4]} lies outside the {w}x{h} image")
        return list(self.boxes)


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade, bundled with opencv-python(-headless) 4.x.

    Frontal, upright faces only; fast on CPU and needs no download. Large images are detected on a copy
    downscaled to `max_side` pixels and the boxes scaled back.
    """

    def __init__(self, *, scale_factor: float = 1.1, min_neighbors: int = 5, min_face_frac: float = 0.05,
                 max_side: int = 1024):
        major = int(cv2.__version__.split(".")[0])
        data_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = Path(data_dir) / HAAR_CASCADE if data_dir else None
        if major >= 5 or not hasattr(cv2, "CascadeClassifier") or path is None or not path.is_file():
            raise RuntimeError(
                f"OpenCV {cv2.__version__} has no bundled Haar cascade ({HAAR_CASCADE} not found in "
                f"{data_dir or 'cv2.data.haarcascades'}); OpenCV 5 dropped them. Install "
                "opencv-python-headless<5, or configure an insightface model directory, or pass explicit boxes."
            )
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV could not load the Haar cascade {path}")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face_frac = min_face_frac
        self.max_side = max_side
        self.name = (f"haar:{cv2.__version__}:sf={scale_factor:g},nb={min_neighbors},"
                     f"min={min_face_frac:g},max={max_side}")

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        h, w = _check_rgb(image_rgb)
        down = min(1.0, self.max_side / max(h, w))
        gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)  # (H, W) uint8
        if down < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * down)), max(1, round(h * down))), interpolation=cv2.INTER_AREA)
        min_side = max(16, round(self.min_face_frac * min(gray.shape)))
        rects, _levels, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(min_side, min_side), outputRejectLevels=True,
        )
        boxes = [
            FaceBox(x / down, y / down, (x + bw) / down, (y + bh) / down, s)
            for (x, y, bw, bh), s in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1))
        ]
        return largest_first(boxes)


def _insightface_pack_dir(model_dir: Path, pack: str) -> Path:
    """The directory holding the pack's .onnx files: `model_dir` itself, `model_dir/<pack>` or
    `model_dir/models/<pack>` (insightface's own `root` layout). Raises FileNotFoundError otherwise."""
    candidates = [model_dir, model_dir / pack, model_dir / "models" / pack]
    for d in candidates:
        if d.is_dir() and (any(d.glob("*.onnx")) or (d / "manifest.json").is_file()):
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(
        f"no insightface model pack in {model_dir}: expected .onnx files (for {pack}: det_10g.onnx, the "
        f"SCRFD detector) in one of: {looked}. avatarcast never downloads models; unpack the pack there, "
        "or leave the model directory unset to use the OpenCV Haar detector."
    )


class InsightFaceDetector:
    """insightface `FaceAnalysis` restricted to its detection model, loaded from a local directory.

    The pack directory is resolved and checked before insightface is imported, and handed to it as a path
    (insightface 2.x loads an existing directory directly), so it can never reach its download code.
    """

    def __init__(self, model_dir: Path | str, *, pack: str = INSIGHTFACE_PACK, det_size: tuple[int, int] = (640, 640),
                 det_thresh: float = 0.5, providers: Sequence[str] | None = None):
        self.pack_dir = _insightface_pack_dir(Path(model_dir).expanduser(), pack)
        import onnxruntime  # lazy: only this detector needs ORT and insightface
        from insightface.app import FaceAnalysis

        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            app = FaceAnalysis(name=str(self.pack_dir), root=str(self.pack_dir), allowed_modules=["detection"],
                               providers=list(providers))
        except AssertionError as e:  # insightface asserts when no .onnx in the directory is a detector
            raise FileNotFoundError(
                f"insightface model pack {self.pack_dir} has no face-detection model (e.g. det_10g.onnx)"
            ) from e
        ctx_id = 0 if "CUDAExecutionProvider" in providers else -1  # ctx_id < 0 keeps the detector on CPU
        app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)
        self._app = app
        self.name = f"insightface:{self.pack_dir}:{det_size[0]}x{det_size[1]}:thr={det_thresh:g}"

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        _check_rgb(image_rgb)
        faces = self._app.get(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # insightface wants BGR
        boxes = []
        for f in faces:
            x0, y0, x1, y1 = f.bbox[:4]
            if x1 > x0 and y1 > y0:
                boxes.append(FaceBox(x0, y0, x1, y1, f.det_score))
        return largest_first(boxes)


def make_detector(model_dir: Path | str | None = None,
                  boxes: Iterable[FaceBox | Sequence[float]] | None = None) -> FaceDetector:
    """Explicit `boxes` win; else insightface from `model_dir` when given; else the OpenCV Haar cascade."""
    if boxes is not None:
        return FixedBoxes(boxes)
    if model_dir is not None:
        return InsightFaceDetector(Path(model_dir))
    return HaarFaceDetector()


# ---------------------------------------------------------------------------------------------------------
# FAA masks


def rasterise_box(box: FaceBox, image_hw: tuple[int, int]) -> np.ndarray:
    """Binary pixel mask (H, W) float32 of a box clipped to the image.

    Pixel (r, c) covers [c, c+1) x [r, r+1); it is set when its centre (c + 0.5, r + 0.5) lies inside the box,
    i.e. columns round(x0) .. round(x1) - 1 (round half to even, as numpy does).
    """
    h, w = image_hw
    mask = np.zeros((h, w), np.float32)  # (H, W)
    clipped = box.clipped(image_hw)
    if clipped is not None:
        c0, c1 = int(np.round(clipped.x0)), int(np.round(clipped.x1))
        r0, r1 = int(np.round(clipped.y0)), int(np.round(clipped.y1))
        mask[r0:r1, c0:c1] = 1.0
    return mask


def face_mask_for_grid(box: FaceBox, image_hw: tuple[int, int], grid_hw: tuple[int, int],
                       scale: float = FAA_MASK_SCALE) -> np.ndarray:
    """FAA face mask of one face on a (gh, gw) grid, float32 in {0, 1}.

    1. enlarge the box `scale`x in width and height around its centre;
    2. clip to the image and rasterise at pixel resolution (`rasterise_box`);
    3. area-resize to the grid: each cell gets the fraction of its pixels inside the mask;
    4. binarise with `> 0`: a cell is 1 as soon as any part of it lies in the enlarged box.

    The `> 0` rule errs on the side of a larger mask (the 3x enlargement is there to cover head motion).
    Upstream bilinear-resizes to the latent grid then nearest-samples the token grid; the two differ by at
    most one cell along the mask's border.
    """
    gh, gw = grid_hw
    h, w = image_hw
    if gh <= 0 or gw <= 0 or gh > h or gw > w:
        raise ValueError(f"grid {grid_hw} must be positive and no larger than the image {image_hw}")
    pixels = rasterise_box(box.scaled(scale), image_hw)  # (H, W)
    cells = cv2.resize(pixels, (gw, gh), interpolation=cv2.INTER_AREA)  # (gh, gw) coverage fraction
    return (cells > 0).astype(np.float32)


def face_masks(boxes: Sequence[FaceBox], image_hw: tuple[int, int], grid_hw: tuple[int, int],
               scale: float = FAA_MASK_SCALE) -> np.ndarray:
    """One FAA mask per character, in the order of `boxes`: (N, gh, gw) float32 in {0, 1}.

    Masks are independent: enlarged boxes of nearby faces may overlap, and then both characters' audio
    reaches the overlapping tokens. The DiT takes them batched as (B, N, gh, gw).
    """
    if not boxes:
        raise ValueError("face_masks needs at least one box")
    return np.stack([face_mask_for_grid(b, image_hw, grid_hw, scale) for b in boxes])  # (N, gh, gw)
