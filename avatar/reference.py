"""Portrait preparation: an image file -> the model-resolution crop, face boxes, FAA masks and latents.

    image bytes --load_image--> RGB (H0, W0, 3) --detector--> face boxes --select--> N characters
        --crop_around_face--> crop (H, W, 3) + boxes in crop coordinates --face_masks--> (N, H/16, W/16)
        --encode_image--> reference latent (1, C, 1, H/8, W/8); emotion images likewise -> latents

`prepare_avatar` does all of it and caches the result on disk, keyed by a hash of everything that can change
it. Bad input raises `AvatarError` (a `ValueError`) whose message names the file and the cause; nothing here
touches process-wide state, so a caller (the engine) can report the error and keep running.

The VAE encoder is passed in as a function, so this module does not depend on `models/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from avatar.faces import FAA_MASK_SCALE, FaceBox, FaceDetector, face_masks, union_box

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # decompression-bomb cap, checked on the header before any pixel is decoded
MAX_FILE_BYTES = 256 * 1024 * 1024  # a portrait file larger than this is refused unread
MIN_SIDE = 64  # px; smaller images carry too little face to animate
LATENT_STRIDE = 8  # Wan VAE: 8x8 pixels per latent cell
TOKEN_STRIDE = 16  # ... times the DiT's (1, 2, 2) patch: 16x16 pixels per token
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
BACKGROUND_FACE_RATIO = 0.25  # an extra face smaller than this x the smallest kept face is background
CACHE_FORMAT = 1  # bump when the cached layout or the preparation math changes

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview
EncodeImage = Callable[[np.ndarray], torch.Tensor]  # (H, W, 3) uint8 RGB -> (1, C, 1, H/8, W/8)


class AvatarError(ValueError):
    """A portrait (or emotion reference) that cannot be used; the message names the file and the cause."""


# ---------------------------------------------------------------------------------------------------------
# 1. Loading


def _read_source(source: ImageSource) -> tuple[bytes, str]:
    """(bytes, name for messages) of a path or of in-memory image bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<image bytes>"
    path = Path(source)
    try:
        if path.is_dir():
            raise AvatarError(f"{path} is a directory, not an image file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AvatarError(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for a portrait")
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise AvatarError(f"{path}: no such file") from None
    except OSError as e:
        raise AvatarError(f"{path}: cannot read it ({e.strerror or e})") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Alpha is composited over ALPHA_BACKGROUND; 16-bit grey keeps its top 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I: 16-bit grey (Pillow's own convert would clip at 255)
        grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, F


def decode_image(data: bytes, name: str = "<image bytes>", *, max_pixels: int = MAX_PIXELS,
                 min_side: int = MIN_SIDE) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied. Raises AvatarError naming `name`."""
    if not data:
        raise AvatarError(f"{name} is empty")
    # 1. header only: Image.open reads the size without decoding pixels
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise AvatarError(f"{name} looks like a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise AvatarError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, ...): {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise AvatarError(f"{name} is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit "
                          "(decompression bomb guard); downscale it first")
    if min(w, h) < min_side:
        raise AvatarError(f"{name} is {w}x{h}, too small: the shorter side must be at least {min_side} px")
    # 2. pixels
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:  # "image file is truncated", broken chunks, bad CRCs
        raise AvatarError(f"{name} is truncated or corrupt ({img.format or 'unknown format'}): {e}") from None
    # 3. orientation, then colour
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError) as e:  # malformed EXIF: keep pixels as stored
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
    try:
        rgb = np.asarray(_to_rgb(img), dtype=np.uint8)  # (H, W, 3)
    except (ValueError, OSError) as e:
        raise AvatarError(f"{name} has colour mode {img.mode}, which cannot be converted to RGB: {e}") from None
    return np.ascontiguousarray(rgb)


def load_image(source: ImageSource) -> np.ndarray:
    """A portrait file (path) or its bytes -> (H, W, 3) uint8 RGB. Raises AvatarError with the file and cause."""
    data, name = _read_source(source)
    return decode_image(data, name)


# ---------------------------------------------------------------------------------------------------------
# 2. Cropping


@dataclass(frozen=True)
class CropTransform:
    """Maps source-image pixel coordinates to crop coordinates: x' = (x - x0) * sx, y' = (y - y0) * sy.

    (x0, y0) is the crop's top-left corner in the source image (negative where the crop was padded);
    sx, sy are output pixels per source pixel.
    """

    x0: float
    y0: float
    sx: float
    sy: float

    def point(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.x0) * self.sx, (y - self.y0) * self.sy

    def box(self, box: FaceBox) -> FaceBox:
        x0, y0 = self.point(box.x0, box.y0)
        x1, y1 = self.point(box.x1, box.y1)
        return FaceBox(x0, y0, x1, y1, box.score)


def _place(start: float, size: int, limit: int) -> int:
    """Integer start of a crop interval of `size` px near `start`, moved inside [0, limit) when it fits."""
    s = int(round(start))
    if size <= limit:
        s = min(max(s, 0), limit - size)
    return s


def crop_around_face(image: np.ndarray, box: FaceBox, out_hw: tuple[int, int], margin: float = 1.0,
                     head_room: float = 0.05) -> tuple[np.ndarray, CropTransform]:
    """A crop of the output aspect ratio around `box`, resized to out_hw.

    image: (H0, W0, 3) uint8. Returns the crop (H, W, 3) uint8 and the transform of source -> crop coordinates.

    Framing: the crop wants `margin` x the face size of room on every side (margin 1 -> 3x the face, the
    region the FAA mask covers), with the face centre `head_room` x the crop height above the crop centre.
    If the image has less room, the crop shrinks toward the face and is moved inside the image; only when
    even the bare face at the output aspect is larger than the image does it leave the image, and the
    outside is filled by edge replication. Downscaling uses cv2.INTER_AREA, upscaling INTER_CUBIC.
    """
    h0, w0 = image.shape[:2]
    out_h, out_w = out_hw
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"out_hw must be positive, got {out_hw}")
    aspect = out_w / out_h
    # 1. crop size, in source pixels
    face_h = max(box.height, box.width / aspect)  # the bare face at the output aspect
    want_h = face_h * (1 + 2 * margin)
    fit_h = min(h0, w0 / aspect)  # largest output-aspect rectangle inside the image
    crop_h = max(face_h, min(want_h, fit_h))
    ch, cw = max(1, int(round(crop_h))), max(1, int(round(crop_h * aspect)))
    if crop_h <= fit_h:  # rounding must not push a crop that fits one pixel past the image
        ch, cw = min(ch, h0), min(cw, w0)
    # 2. crop position: centred on the face (plus head room), moved inside the image when it fits
    cx, cy = box.centre
    x0 = _place(cx - cw / 2, cw, w0)
    y0 = _place(cy + head_room * ch - ch / 2, ch, h0)
    # 3. cut, replicating edges where the crop leaves the image
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + cw - w0), max(0, y0 + ch - h0)
    region = image[max(0, y0):min(h0, y0 + ch), max(0, x0):min(w0, x0 + cw)]  # (<=ch, <=cw, 3)
    if pad_l or pad_t or pad_r or pad_b:
        region = cv2.copyMakeBorder(region, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)  # (ch, cw, 3)
    # 4. resize to the output
    interp = cv2.INTER_AREA if ch >= out_h else cv2.INTER_CUBIC
    crop = cv2.resize(np.ascontiguousarray(region), (out_w, out_h), interpolation=interp)  # (H, W, 3)
    return crop, CropTransform(float(x0), float(y0), out_w / cw, out_h / ch)


# ---------------------------------------------------------------------------------------------------------
# 3. Faces -> characters


def select_faces(found: list[FaceBox], expected: int | None, name: str) -> list[FaceBox]:
    """The characters among detected boxes (largest first), ordered left to right: speaker k is box k.

    expected=None keeps every face. expected=N keeps the N largest; further faces are dropped as background
    when smaller than BACKGROUND_FACE_RATIO x the smallest kept face, and are an error otherwise (which face
    is meant would be a guess).
    """
    if not found:
        raise AvatarError(f"no face found in {name}; pass explicit boxes")
    if expected is not None:
        if expected < 1:
            raise ValueError(f"expected_faces must be >= 1 or None, got {expected}")
        if len(found) < expected:
            raise AvatarError(f"{name}: found {len(found)} face(s), expected {expected}; pass explicit boxes")
        kept, rest = found[:expected], found[expected:]
        rivals = [b for b in rest if b.area >= BACKGROUND_FACE_RATIO * kept[-1].area]
        if rivals:
            raise AvatarError(
                f"{name}: found {expected + len(rivals)} faces of similar size, expected {expected}; "
                f"pass explicit boxes or set expected_faces={expected + len(rivals)}"
            )
        found = kept
    return sorted(found, key=lambda b: (b.centre[0], b.centre[1]))


# ---------------------------------------------------------------------------------------------------------
# 4. The prepared avatar and its cache


@dataclass(frozen=True, eq=False)
class PreparedAvatar:
    """A portrait ready for a session. Arrays are read-only; tensors live on the CPU."""

    image: np.ndarray  # (H, W, 3) uint8 RGB: the crop at model resolution
    boxes: tuple[FaceBox, ...]  # one per character, crop coordinates, left to right; speaker k <-> boxes[k]
    masks: np.ndarray  # (chars, H/16, W/16) float32 in {0, 1}: FAA token-grid masks, same order as boxes
    reference_latent: torch.Tensor | None  # (1, C, 1, H/8, W/8); None when prepared without an encoder
    emotion_latents: Mapping[str, torch.Tensor]  # emotion name -> (1, C, 1, H/8, W/8)
    content_hash: str  # hex digest of every input; also the cache entry's name
    source_name: str  # the file it came from, for messages
    warning: str | None = None  # why the model will draw it badly (out of its domain: avatar/domain.py)

    @property
    def num_characters(self) -> int:
        return len(self.boxes)

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_key(parts: dict[str, object]) -> str:
    return _sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode())


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _save_cache(entry: Path, avatar: PreparedAvatar, replace: bool) -> None:
    """Write the entry into a temporary directory, then rename it into place (atomic on one filesystem)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        tensors = {"masks": torch.from_numpy(np.array(avatar.masks))}
        if avatar.reference_latent is not None:
            tensors["reference"] = avatar.reference_latent.contiguous()
        for k, v in avatar.emotion_latents.items():
            tensors[f"emotion/{k}"] = v.contiguous()
        save_file(tensors, str(tmp / "latents.safetensors"))
        Image.fromarray(avatar.image).save(tmp / "crop.png")
        meta = {
            "format": CACHE_FORMAT, "key": avatar.content_hash, "source": avatar.source_name,
            "size_hw": list(avatar.size_hw), "boxes": [list(b.as_tuple()) for b in avatar.boxes],
            "has_reference": avatar.reference_latent is not None, "emotions": sorted(avatar.emotion_latents),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            if not replace:  # another writer got there first: theirs is as good as ours
                return
            if entry.is_dir() and not entry.is_symlink():  # the unusable entry we are rebuilding
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        os.rename(tmp, entry)
    except OSError as e:
        log.warning("could not write the avatar cache entry %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(entry: Path, key: str, out_hw: tuple[int, int]) -> PreparedAvatar | None:
    """The cached avatar, or None when the entry is missing or unusable (it will be rebuilt)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["format"] != CACHE_FORMAT or meta["key"] != key or tuple(meta["size_hw"]) != tuple(out_hw):
            raise ValueError("format, key or size does not match")
        boxes = tuple(FaceBox(*map(float, b)) for b in meta["boxes"])
        with Image.open(entry / "crop.png") as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)
        tensors = load_file(str(entry / "latents.safetensors"))
        masks = tensors["masks"].numpy().astype(np.float32)  # (chars, H/16, W/16)
        h, w = out_hw
        if image.shape != (h, w, 3) or masks.shape != (len(boxes), h // TOKEN_STRIDE, w // TOKEN_STRIDE):
            raise ValueError(f"shapes {image.shape} / {masks.shape} do not match {out_hw} and {len(boxes)} faces")
        reference = tensors["reference"] if meta["has_reference"] else None
        emotions = {name: tensors[f"emotion/{name}"] for name in meta["emotions"]}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        log.warning("avatar cache entry %s is unusable (%s: %s); rebuilding it", entry, type(e).__name__, e)
        return None
    return PreparedAvatar(_readonly(image), boxes, _readonly(masks), reference, MappingProxyType(emotions), key,
                          meta["source"])


# ---------------------------------------------------------------------------------------------------------
# 5. prepare_avatar


def _detect(detector: FaceDetector, image: np.ndarray, name: str) -> list[FaceBox]:
    """detector.detect, with input errors (explicit boxes outside this image) reported against the file."""
    try:
        return detector.detect(image)
    except ValueError as e:
        raise AvatarError(f"{name}: {e}") from e


def _encode(encode_image: EncodeImage, image: np.ndarray, what: str) -> torch.Tensor:
    """Run the caller's encoder on a crop and check the latent's shape: (1, C, 1, H/8, W/8), on the CPU."""
    h, w = image.shape[:2]
    latent = encode_image(image)
    want = (h // LATENT_STRIDE, w // LATENT_STRIDE)
    if not isinstance(latent, torch.Tensor) or latent.ndim != 5 or latent.shape[0] != 1 or latent.shape[2] != 1 \
            or tuple(latent.shape[3:]) != want:
        got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"encode_image returned {got} for {what}; expected (1, C, 1, {want[0]}, {want[1]})")
    return latent.detach().to("cpu").contiguous()


def prepare_avatar(
    source: ImageSource,
    out_hw: tuple[int, int],
    detector: FaceDetector,
    encode_image: EncodeImage | None = None,
    expected_faces: int | None = 1,
    emotion_images: Mapping[str, ImageSource] | None = None,
    cache_dir: Path | str | None = None,
    *,
    encoder_id: str = "",
    margin: float = 1.0,
    mask_scale: float = FAA_MASK_SCALE,
) -> PreparedAvatar:
    """A portrait -> PreparedAvatar at out_hw = (H, W) (both multiples of 16).

    detector finds faces; `expected_faces` characters are kept (see `select_faces`) and the crop frames
    them all. encode_image (the VAE encoder, (H, W, 3) uint8 -> (1, C, 1, H/8, W/8)) makes the reference
    latent and one latent per emotion image; each emotion image is cropped around its own largest face.
    With `cache_dir`, results are cached under a hash of the image bytes, out_hw, detector.name,
    expected_faces, the emotion images' bytes, `encoder_id` (which must name the encoder and its weights)
    and the framing settings; a hit does not call the detector or the encoder.
    """
    h, w = out_hw
    if h <= 0 or w <= 0 or h % TOKEN_STRIDE or w % TOKEN_STRIDE:
        raise ValueError(f"out_hw must be positive multiples of {TOKEN_STRIDE}, got {out_hw}")
    if emotion_images and encode_image is None:
        raise ValueError("emotion_images are only used as latents: pass encode_image too")
    if cache_dir is not None and encode_image is not None and not encoder_id:
        raise ValueError("caching latents needs encoder_id naming the encoder and its weights")

    # 1. read the inputs and hash them
    data, name = _read_source(source)
    emotion_data = {k: _read_source(v) for k, v in sorted((emotion_images or {}).items())}
    key = _cache_key({
        "format": CACHE_FORMAT, "image": _sha256(data), "out_hw": [h, w], "detector": detector.name,
        "expected_faces": expected_faces, "margin": margin, "mask_scale": mask_scale,
        "emotions": {k: _sha256(d) for k, (d, _) in emotion_data.items()},
        "encoder": encoder_id if encode_image is not None else None,
    })
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None:
        cached = _load_cache(entry, key, out_hw)
        if cached is not None:
            return dataclasses.replace(cached, source_name=name)  # same bytes may come from another path

    # 2. faces -> characters -> crop framing all of them
    image = decode_image(data, name)  # (H0, W0, 3)
    faces = select_faces(_detect(detector, image, name), expected_faces, name)
    crop, to_crop = crop_around_face(image, union_box(faces), out_hw, margin=margin)  # (H, W, 3)
    boxes = tuple(to_crop.box(b) for b in faces)
    masks = face_masks(boxes, (h, w), (h // TOKEN_STRIDE, w // TOKEN_STRIDE), mask_scale)  # (chars, H/16, W/16)

    # 3. latents
    reference = _encode(encode_image, crop, name) if encode_image is not None else None
    emotions: dict[str, torch.Tensor] = {}
    for emotion, (e_data, e_name) in emotion_data.items():
        assert encode_image is not None  # checked above
        e_image = decode_image(e_data, e_name)
        e_faces = _detect(detector, e_image, e_name)
        if not e_faces:
            raise AvatarError(f"no face found in {e_name} (emotion reference {emotion!r}); pass explicit boxes")
        e_crop, _ = crop_around_face(e_image, e_faces[0], out_hw, margin=margin)
        emotions[emotion] = _encode(encode_image, e_crop, f"{e_name} (emotion {emotion!r})")

    avatar = PreparedAvatar(_readonly(crop), boxes, _readonly(masks), reference, MappingProxyType(emotions), key,
                            name)
    if entry is not None:
        _save_cache(entry, avatar, replace=entry.exists())
    return avatar
