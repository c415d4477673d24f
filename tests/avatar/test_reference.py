"""Portrait loading (bad inputs, colour modes, EXIF), cropping, face selection, prepare_avatar and its cache."""

from __future__ import annotations

import io
import shutil
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from avatar.faces import FaceBox, FixedBoxes, HaarFaceDetector
from avatar.reference import (
    ALPHA_BACKGROUND,
    AvatarError,
    CropTransform,
    PreparedAvatar,
    crop_around_face,
    decode_image,
    load_image,
    prepare_avatar,
    select_faces,
)

OUT_HW = (128, 96)  # (H, W): token grid (8, 6), latent grid (16, 12)


def encode(image: np.ndarray, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims width x height (CRC fixed), so only the header is big."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


class CountingEncoder:
    """Fake VAE encoder: (H, W, 3) uint8 -> (1, 16, 1, H/8, W/8), a deterministic function of the pixels."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        self.calls += 1
        h, w = image.shape[:2]
        small = cv2.resize(image, (w // 8, h // 8), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        x = torch.from_numpy(small).permute(2, 0, 1)  # (3, h, w)
        return torch.cat([x, x.mean(0, keepdim=True).expand(13, -1, -1)])[None, :, None]  # (1, 16, 1, h, w)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # (512, 512, 3) uint8 RGB


@pytest.fixture(scope="module")
def astronaut_png(astronaut) -> bytes:
    return encode(astronaut)


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


# ---------------------------------------------------------------------------------------------------------
# load_image: bad input


def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "portrait.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AvatarError, match=r"portrait\.png is not an image"):
        load_image(path)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(AvatarError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(AvatarError, match=r"empty\.png is empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(AvatarError, match="is a directory"):
        load_image(tmp_path)


def test_truncated_png(tmp_path, astronaut_png):
    path = tmp_path / "cut.png"
    path.write_bytes(astronaut_png[: len(astronaut_png) // 2])
    with pytest.raises(AvatarError, match=r"cut\.png is truncated or corrupt"):
        load_image(path)


@pytest.mark.parametrize("hw", [(1, 1), (63, 200), (200, 63)])
def test_too_small(hw):
    with pytest.raises(AvatarError, match="too small"):
        load_image(encode(np.zeros((*hw, 3), np.uint8)))


def test_smallest_accepted_size():
    assert load_image(encode(np.zeros((64, 64, 3), np.uint8))).shape == (64, 64, 3)


@pytest.mark.parametrize("wh", [(30000, 30000), (8000, 6000)])  # over Pillow's own limit; over ours only
def test_decompression_bomb_is_refused_from_the_header(tmp_path, wh):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_size(*wh))
    tracemalloc.start()
    try:
        with pytest.raises(AvatarError, match=r"bomb\.png .*decompression bomb"):
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the full image would be 144 MB (8000x6000x3) or more


def test_bomb_cap_is_below_pillows(tmp_path):
    with pytest.raises(AvatarError, match="over the 40 MP limit"):
        load_image(png_with_size(8000, 6000))
    assert decode_image(encode(np.zeros((64, 80, 3), np.uint8)), max_pixels=64 * 80).shape == (64, 80, 3)


# ---------------------------------------------------------------------------------------------------------
# load_image: colour modes and orientation


def test_grayscale_becomes_rgb():
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # (64, 64)
    rgb = load_image(encode(grey))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, axis=2))


def test_16bit_grayscale_keeps_its_range():
    grey16 = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (64, 1))  # (64, 64), 0 .. 64512
    rgb = load_image(encode(grey16))
    np.testing.assert_array_equal(rgb[..., 0], (grey16 >> 8).astype(np.uint8))


def test_rgba_is_composited_over_the_background():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (200, 10, 10)
    rgba[:, 32:, 3] = 255  # right half opaque, left half fully transparent
    rgb = load_image(encode(rgba))
    assert tuple(rgb[10, 10]) == ALPHA_BACKGROUND
    assert tuple(rgb[10, 50]) == (200, 10, 10)


def test_palette_with_and_without_transparency():
    idx = np.zeros((64, 64), np.uint8)
    idx[:, 32:] = 1
    pal = Image.fromarray(idx, mode="L").convert("P")
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    rgb = load_image(buf.getvalue())
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[0, 40]) == (0, 255, 0)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)  # colour 0 transparent
    rgb = load_image(buf.getvalue())
    assert tuple(rgb[0, 0]) == ALPHA_BACKGROUND and tuple(rgb[0, 40]) == (0, 255, 0)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    rgb = load_image(buf.getvalue())
    assert rgb.shape == (64, 64, 3)
    r, g, b = rgb[32, 32].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied():
    stored = np.zeros((120, 80, 3), np.uint8)  # (H, W) as stored: portrait
    stored[:20, :20] = (255, 0, 0)  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: rotate 90 degrees clockwise to display
    rgb = load_image(encode(stored, exif=exif.tobytes()))
    assert rgb.shape == (80, 120, 3)  # displayed: landscape
    assert tuple(rgb[5, 115]) == (255, 0, 0)  # marker now at the top-right
    assert tuple(rgb[5, 5]) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------------
# crop_around_face


def test_crop_transform_maps_the_box_onto_its_pixels():
    image = np.full((400, 600, 3), 40, np.uint8)
    box = FaceBox(250, 100, 330, 180)
    image[100:180, 250:330] = (250, 200, 0)  # paint the face box
    crop, t = crop_around_face(image, box, OUT_HW)
    assert crop.shape == (*OUT_HW, 3) and crop.dtype == np.uint8
    assert t == CropTransform(t.x0, t.y0, t.sx, t.sy) and t.sx == pytest.approx(t.sy, rel=0.02)
    mapped = t.box(box)
    x0, y0, x1, y1 = (int(round(v)) for v in mapped.as_tuple()[:4])
    inside = crop[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
    assert inside.size and (np.abs(inside.astype(int) - (250, 200, 0)) <= 2).all()
    ring = np.ones(crop.shape[:2], bool)
    ring[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
    assert (np.abs(crop[ring].astype(int) - 40) <= 2).all()
    # margin 1: the face spans a third of the crop along its binding side (here the width), centred horizontally
    assert max(mapped.width / OUT_HW[1], mapped.height / OUT_HW[0]) == pytest.approx(1 / 3, abs=0.01)
    assert mapped.centre[0] == pytest.approx(OUT_HW[1] / 2, abs=1.0)


def test_crop_moves_inside_the_image_instead_of_padding():
    image = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    box = FaceBox(0, 0, 40, 40)  # face in the corner: a centred crop would leave the image
    crop, t = crop_around_face(image, box, (120, 120))
    assert (t.x0, t.y0) == (0, 0)
    np.testing.assert_array_equal(crop, image[:120, :120])  # scale 1: an exact copy, no padding


def test_crop_pads_by_edge_replication_when_the_face_is_larger_than_the_image():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, :, 0] = np.arange(100, dtype=np.uint8)[None, :] * 2  # red encodes the column
    crop, t = crop_around_face(image, FaceBox(0, 0, 100, 100), (64, 128))  # wants 200 px wide
    assert (t.x0, t.sx) == (-50, 128 / 200)
    assert (crop[:, :30, 0] == 0).all() and (crop[:, -30:, 0] == 198).all()  # replicated edge columns
    assert t.point(0, 0) == (32.0, 0.0)


# ---------------------------------------------------------------------------------------------------------
# select_faces


def test_select_faces_rules():
    big_left, big_right = FaceBox(0, 0, 100, 100), FaceBox(300, 0, 390, 90)
    tiny = FaceBox(200, 200, 220, 220)
    assert select_faces([big_left, tiny], 1, "x.png") == [big_left]  # tiny face = background
    assert select_faces([big_left, big_right], 2, "x.png") == [big_left, big_right]
    assert select_faces([big_right, big_left], None, "x.png") == [big_left, big_right]  # left to right
    with pytest.raises(AvatarError, match=r"x\.png: found 2 faces of similar size, expected 1"):
        select_faces([big_left, big_right], 1, "x.png")
    with pytest.raises(AvatarError, match=r"x\.png: found 1 face\(s\), expected 2"):
        select_faces([big_left], 2, "x.png")
    with pytest.raises(AvatarError, match=r"no face found in x\.png; pass explicit boxes"):
        select_faces([], 1, "x.png")


# ---------------------------------------------------------------------------------------------------------
# prepare_avatar


def test_prepare_astronaut_with_haar(tmp_path, astronaut_png, haar):
    path = tmp_path / "astronaut.png"
    path.write_bytes(astronaut_png)
    enc = CountingEncoder()
    av = prepare_avatar(path, (256, 192), haar, enc)
    assert isinstance(av, PreparedAvatar) and av.num_characters == 1 and av.source_name == str(path)
    assert av.image.shape == (256, 192, 3) and av.image.dtype == np.uint8
    assert av.masks.shape == (1, 16, 12) and av.masks.dtype == np.float32
    assert av.reference_latent.shape == (1, 16, 1, 32, 24) and enc.calls == 1
    (face,) = av.boxes
    assert max(face.width / 192, face.height / 256) == pytest.approx(1 / 3, abs=0.01)  # margin 1: 3x the face
    gy, gx = np.nonzero(av.masks[0])
    cx, cy = face.centre
    assert gx.min() * 16 <= cx <= (gx.max() + 1) * 16 and gy.min() * 16 <= cy <= (gy.max() + 1) * 16
    with pytest.raises(ValueError):
        av.image[0, 0, 0] = 1  # read-only


def test_no_face_names_the_file(tmp_path, haar):
    path = tmp_path / "wall.png"
    path.write_bytes(encode(np.full((200, 200, 3), 128, np.uint8)))
    with pytest.raises(AvatarError, match=r"no face found in .*wall\.png; pass explicit boxes"):
        prepare_avatar(path, OUT_HW, haar)


def test_two_faces_when_one_expected(tmp_path, astronaut, haar):
    path = tmp_path / "pair.png"
    path.write_bytes(encode(np.hstack([astronaut, astronaut[:, ::-1]])))  # Haar finds both faces
    with pytest.raises(AvatarError, match=r"pair\.png: found 2 faces of similar size, expected 1"):
        prepare_avatar(path, OUT_HW, haar)
    av = prepare_avatar(path, (128, 256), haar, expected_faces=2)
    assert av.num_characters == 2 and av.masks.shape == (2, 8, 16)
    assert av.boxes[0].centre[0] < av.boxes[1].centre[0]  # left to right
    assert (av.masks[0] * av.masks[1]).sum() == 0 and av.masks[0].sum() > 0 and av.masks[1].sum() > 0


def test_explicit_box_outside_the_image_names_the_file(tmp_path, astronaut_png):
    path = tmp_path / "me.png"
    path.write_bytes(astronaut_png)
    with pytest.raises(AvatarError, match=r"me\.png: explicit face box .* outside the 512x512 image"):
        prepare_avatar(path, OUT_HW, FixedBoxes([(600, 0, 700, 100)]))


def test_fixed_boxes_characters_left_to_right(astronaut_png):
    det = FixedBoxes([(300, 100, 380, 180), (60, 90, 160, 190)])  # larger face on the left
    av = prepare_avatar(astronaut_png, OUT_HW, det, expected_faces=2)
    assert av.boxes[0].x0 < av.boxes[1].x0
    assert av.source_name == "<image bytes>" and av.reference_latent is None and dict(av.emotion_latents) == {}


def test_argument_checks(astronaut_png, haar, tmp_path):
    det = FixedBoxes([(180, 65, 270, 165)])
    with pytest.raises(ValueError, match="multiples of 16"):
        prepare_avatar(astronaut_png, (100, 96), det)
    with pytest.raises(ValueError, match="encoder_id"):
        prepare_avatar(astronaut_png, OUT_HW, det, CountingEncoder(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="pass encode_image"):
        prepare_avatar(astronaut_png, OUT_HW, det, emotion_images={"happy": astronaut_png})
    with pytest.raises(ValueError, match=r"encode_image returned \(1, 16, 1, 8, 8\)"):
        prepare_avatar(astronaut_png, OUT_HW, det, lambda im: torch.zeros(1, 16, 1, 8, 8))


def test_emotion_latents(astronaut, astronaut_png):
    det = FixedBoxes([(180, 65, 270, 165)])
    enc = CountingEncoder()
    happy = encode(np.ascontiguousarray(astronaut[:, :, ::-1]))  # same framing, other colours
    av = prepare_avatar(astronaut_png, OUT_HW, det, enc, emotion_images={"happy": happy, "calm": astronaut_png})
    assert sorted(av.emotion_latents) == ["calm", "happy"] and enc.calls == 3
    assert torch.equal(av.emotion_latents["calm"], av.reference_latent)
    assert not torch.equal(av.emotion_latents["happy"], av.reference_latent)


# ---------------------------------------------------------------------------------------------------------
# cache


def assert_same(a: PreparedAvatar, b: PreparedAvatar) -> None:
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.boxes == b.boxes and a.content_hash == b.content_hash and a.source_name == b.source_name
    assert torch.equal(a.reference_latent, b.reference_latent)
    assert sorted(a.emotion_latents) == sorted(b.emotion_latents)
    for k in a.emotion_latents:
        assert torch.equal(a.emotion_latents[k], b.emotion_latents[k])


class CountingDetector:
    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def detect(self, image_rgb):
        self.calls += 1
        return self.inner.detect(image_rgb)


def test_cache_hit_skips_the_encoder(tmp_path, astronaut_png, haar):
    src = tmp_path / "me.png"
    src.write_bytes(astronaut_png)
    cache = tmp_path / "cache"
    enc, det = CountingEncoder(), CountingDetector(haar)
    kwargs = dict(encoder_id="fake-vae@1", emotion_images={"calm": src})
    first = prepare_avatar(src, OUT_HW, det, enc, cache_dir=cache, **kwargs)
    assert enc.calls == 2 and det.calls == 2
    second = prepare_avatar(src, OUT_HW, det, enc, cache_dir=cache, **kwargs)
    assert enc.calls == 2 and det.calls == 2  # loaded, not detected or encoded
    assert_same(first, second)
    copy = tmp_path / "copy.png"
    copy.write_bytes(astronaut_png)
    third = prepare_avatar(copy, OUT_HW, det, enc, cache_dir=cache, **kwargs)
    assert enc.calls == 2 and third.source_name == str(copy)  # same bytes: a hit, reported under its own name
    assert [p.name for p in cache.iterdir()] == [first.content_hash]  # no temporary directory left behind
    # anything in the key changes the entry
    prepare_avatar(src, OUT_HW, haar, enc, cache_dir=cache, encoder_id="fake-vae@2", emotion_images={"calm": src})
    prepare_avatar(src, (128, 128), haar, enc, cache_dir=cache, **kwargs)
    assert enc.calls == 6 and len(list(cache.iterdir())) == 3


@pytest.mark.parametrize(
    "damage", ["garbage latents", "missing meta", "garbage meta", "garbage png", "wrong shape", "file"])
def test_corrupted_cache_entry_is_rebuilt(tmp_path, astronaut_png, damage):
    det = FixedBoxes([(180, 65, 270, 165)])
    enc = CountingEncoder()
    first = prepare_avatar(astronaut_png, OUT_HW, det, enc, cache_dir=tmp_path, encoder_id="fake")
    entry = tmp_path / first.content_hash
    if damage == "garbage latents":
        (entry / "latents.safetensors").write_bytes(b"\x00" * 64)
    elif damage == "missing meta":
        (entry / "meta.json").unlink()
    elif damage == "garbage meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "garbage png":
        (entry / "crop.png").write_bytes(b"\x89PNG nope")
    elif damage == "wrong shape":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(entry / "crop.png")
    else:  # the entry's name taken by a plain file
        shutil.rmtree(entry)
        entry.write_bytes(b"junk")
    rebuilt = prepare_avatar(astronaut_png, OUT_HW, det, enc, cache_dir=tmp_path, encoder_id="fake")
    assert enc.calls == 2
    assert_same(first, rebuilt)
    again = prepare_avatar(astronaut_png, OUT_HW, det, enc, cache_dir=tmp_path, encoder_id="fake")
    assert enc.calls == 2  # the rebuilt entry is good again
    assert_same(first, again)


def test_cache_without_encoder(tmp_path, astronaut_png):
    det = FixedBoxes([(180, 65, 270, 165)])
    first = prepare_avatar(astronaut_png, OUT_HW, det, cache_dir=tmp_path)
    second = prepare_avatar(astronaut_png, OUT_HW, det, cache_dir=tmp_path)
    assert first.reference_latent is None and second.reference_latent is None
    np.testing.assert_array_equal(first.image, second.image)
    assert first.boxes == second.boxes
