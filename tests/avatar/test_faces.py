"""Face detectors (Haar on the astronaut photo, explicit boxes, insightface without a pack) and FAA masks."""

from __future__ import annotations

import socket

import cv2
import numpy as np
import pytest
import skimage.data

from avatar.faces import (
    FaceBox,
    FaceDetector,
    FixedBoxes,
    HaarFaceDetector,
    InsightFaceDetector,
    face_mask_for_grid,
    face_masks,
    make_detector,
    rasterise_box,
    union_box,
)

ASTRONAUT_FACE = FaceBox(180, 65, 270, 165)  # hand-labelled: ear to ear, hairline to chin, in the 512x512 photo


def iou(a: FaceBox, b: FaceBox) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    return inter / (a.area + b.area - inter)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # (512, 512, 3) uint8 RGB


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------------------
# FaceBox


def test_facebox_geometry():
    b = FaceBox(10, 20, 30, 60, 0.9)
    assert (b.width, b.height, b.area, b.centre) == (20, 40, 800, (20, 40))
    assert b.scaled(3.0).as_tuple() == (-10, -20, 50, 100, 0.9)
    assert b.scaled(3.0).clipped((80, 40)).as_tuple() == (0, 0, 40, 80, 0.9)
    assert FaceBox(100, 100, 120, 120).clipped((50, 50)) is None
    assert union_box([b, FaceBox(0, 50, 5, 70, 0.5)]).as_tuple() == (0, 20, 30, 70, 0.5)
    assert type(FaceBox(np.int32(1), np.float64(2), 3, 4).x0) is float  # JSON-safe


@pytest.mark.parametrize("coords", [(10, 10, 10, 20), (10, 30, 20, 20), (0, 0, float("nan"), 5)])
def test_facebox_rejects_degenerate(coords):
    with pytest.raises(ValueError):
        FaceBox(*coords)


# ---------------------------------------------------------------------------------------------------------
# Detectors


def test_haar_finds_the_astronaut(haar, astronaut):
    boxes = haar.detect(astronaut)
    assert len(boxes) == 1
    (face,) = boxes
    assert iou(face, ASTRONAUT_FACE) > 0.6, face
    cx, cy = face.centre
    assert 200 < cx < 250 and 95 < cy < 135
    assert isinstance(haar, FaceDetector)


def test_haar_sorts_largest_first(haar, astronaut):
    small = cv2.resize(astronaut, (384, 384), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((512, 512 + 384, 3), np.uint8)
    canvas[:, :512] = astronaut
    canvas[64:448, 512:] = small  # a second, smaller astronaut on the right
    boxes = haar.detect(canvas)
    assert len(boxes) == 2
    assert boxes[0].area > boxes[1].area
    assert boxes[0].centre[0] < 512 < boxes[1].centre[0]


def test_haar_downscales_large_images(astronaut):
    big = cv2.resize(astronaut, (1280, 1280), interpolation=cv2.INTER_CUBIC)  # 2.5x
    (face,) = HaarFaceDetector(max_side=512).detect(big)
    scaled_truth = FaceBox(*(2.5 * v for v in ASTRONAUT_FACE.as_tuple()[:4]))
    assert iou(face, scaled_truth) > 0.6, face


def test_haar_finds_nothing_on_a_blank_image(haar):
    assert haar.detect(np.full((256, 256, 3), 128, np.uint8)) == []


def test_detectors_reject_non_rgb(haar):
    with pytest.raises(ValueError, match="RGB uint8"):
        haar.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        FixedBoxes([(0, 0, 10, 10)]).detect(np.zeros((64, 64, 3), np.float32))


def test_fixed_boxes_sorted_and_checked(astronaut):
    det = FixedBoxes([(0, 0, 10, 10), FaceBox(100, 100, 200, 220, 0.7), (300, 300, 340, 340)])
    boxes = det.detect(astronaut)
    assert [b.area for b in boxes] == [12000, 1600, 100]
    assert boxes[0].score == 0.7 and boxes[1].score == 1.0
    assert det.name == FixedBoxes([(300, 300, 340, 340), (0, 0, 10, 10), (100, 100, 200, 220, 0.7)]).name
    with pytest.raises(ValueError, match="outside the 512x512 image"):
        FixedBoxes([(600, 10, 700, 100)]).detect(astronaut)
    with pytest.raises(ValueError, match="at least one box"):
        FixedBoxes([])


def test_insightface_without_a_pack_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(FileNotFoundError) as info:
        InsightFaceDetector(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "det_10g.onnx" in message and "never downloads" in message


def test_insightface_pack_without_a_detector_is_a_clear_error(tmp_path, no_network):
    from onnx import TensorProto, helper, save

    pack = tmp_path / "models" / "buffalo_l"  # insightface's own root layout
    pack.mkdir(parents=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    save(model, str(pack / "identity.onnx"))  # a valid .onnx that is no face detector
    with pytest.raises(FileNotFoundError, match=r"buffalo_l has no face-detection model"):
        InsightFaceDetector(tmp_path)


def test_make_detector_chooses(tmp_path, no_network):
    assert isinstance(make_detector(), HaarFaceDetector)
    assert isinstance(make_detector(boxes=[(0, 0, 10, 10)]), FixedBoxes)
    assert isinstance(make_detector(model_dir=tmp_path, boxes=[(0, 0, 10, 10)]), FixedBoxes)  # boxes win
    with pytest.raises(FileNotFoundError):
        make_detector(model_dir=tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# Masks


def exact_grid_mask(pixels: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Reference for the area rule: a cell is 1 when any mask pixel overlaps it by a positive area."""
    h, w = pixels.shape
    gh, gw = grid_hw
    out = np.zeros(grid_hw, np.float32)
    rows, cols = np.nonzero(pixels)
    for r in range(gh):
        y0, y1 = r * h / gh, (r + 1) * h / gh
        for c in range(gw):
            x0, x1 = c * w / gw, (c + 1) * w / gw
            hit = (rows + 1 > y0) & (rows < y1) & (cols + 1 > x0) & (cols < x1)
            out[r, c] = float(hit.any())
    return out


def test_scale_3_box_covers_expected_cells():
    box = FaceBox(112, 112, 144, 144)  # 32 px, centred at 128 -> enlarged (80, 80)-(176, 176)
    mask = face_mask_for_grid(box, (256, 256), (16, 16))
    expected = np.zeros((16, 16), np.float32)
    expected[5:11, 5:11] = 1  # pixels 80..175 -> cells 5..10 of 16 px
    assert mask.dtype == np.float32 and mask.shape == (16, 16)
    np.testing.assert_array_equal(mask, expected)


def test_area_rule_one_pixel_turns_a_cell_on():
    # scale 1: columns round(16)..round(x1)-1; the pixel-centre rule decides whether column 32 is in
    inside = face_mask_for_grid(FaceBox(16, 16, 32.4, 32), (64, 64), (4, 4), scale=1.0)
    spill = face_mask_for_grid(FaceBox(16, 16, 32.6, 32), (64, 64), (4, 4), scale=1.0)
    assert inside.sum() == 1 and inside[1, 1] == 1
    assert spill.sum() == 2 and spill[1, 1] == spill[1, 2] == 1  # 1 of 256 pixels of cell (1, 2) is enough


def test_masks_clip_at_the_borders():
    top_left = face_mask_for_grid(FaceBox(0, 0, 20, 20), (256, 256), (16, 16))  # enlarged (-20,-20)-(40,40)
    expected = np.zeros((16, 16), np.float32)
    expected[0:3, 0:3] = 1
    np.testing.assert_array_equal(top_left, expected)
    bottom_right = face_mask_for_grid(FaceBox(236, 236, 256, 256), (256, 256), (16, 16))
    np.testing.assert_array_equal(bottom_right, expected[::-1, ::-1])
    outside = FaceBox(300, 300, 320, 320)
    assert face_mask_for_grid(outside, (256, 256), (16, 16)).sum() == 0


@pytest.mark.parametrize("seed", range(6))
def test_area_resize_matches_exact_overlap_on_uneven_grids(seed):
    rng = np.random.default_rng(seed)
    h, w = 100, 90
    grid = (7, 11)  # cells of 14.3 x 8.2 px: boundaries fall inside pixels
    x0, y0 = rng.uniform(0, 80), rng.uniform(0, 90)
    box = FaceBox(x0, y0, x0 + rng.uniform(2, 20), y0 + rng.uniform(2, 20))
    pixels = rasterise_box(box.scaled(3.0), (h, w))
    np.testing.assert_array_equal(face_mask_for_grid(box, (h, w), grid), exact_grid_mask(pixels, grid))


def test_multi_character_masks_disjoint_when_faces_apart():
    image_hw = (512, 1024)
    boxes = [FaceBox(150, 200, 250, 300), FaceBox(774, 200, 874, 300)]  # enlarged: x 50..350 and 674..974
    masks = face_masks(boxes, image_hw, (32, 64))
    assert masks.shape == (2, 32, 64) and masks.dtype == np.float32
    assert masks[0].sum() > 0 and masks[1].sum() > 0
    assert (masks[0] * masks[1]).sum() == 0
    assert masks[0][:, :32].sum() == masks[0].sum() and masks[1][:, 32:].sum() == masks[1].sum()
    close = face_masks([FaceBox(400, 200, 500, 300), FaceBox(524, 200, 624, 300)], image_hw, (32, 64))
    assert (close[0] * close[1]).sum() > 0  # independent masks: enlarged boxes of close faces may overlap


def test_mask_grid_checks():
    with pytest.raises(ValueError, match="grid"):
        face_mask_for_grid(FaceBox(0, 0, 10, 10), (64, 64), (0, 4))
    with pytest.raises(ValueError, match="at least one box"):
        face_masks([], (64, 64), (4, 4))
