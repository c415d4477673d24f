"""The demo model's domain check, measured: VAE round-trip PSNR of held-out drawn faces vs offline photos.

Each image goes through the avatar preparation the engine runs (face boxes or the Haar detector, the crop
at the model's size, the VAE encode), then one decode; printed as JSON per group (min, 1st percentile,
median, max) with the margins to the threshold in avatar/domain.py DEMO_DOMAIN. Photos come from what is
installed (scikit-image's sample data, the images scikit-learn and insightface ship); one where the
detector finds no face is cropped around its centre, as a user's explicit box would.

    python -m benchmarks.bench_domain [--identities 100] [--pairs 30]
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "horse", "retina", "brick", "grass",
                  "gravel", "moon", "clock", "coins")  # shipped with scikit-image (no download)
SHIPPED_PHOTOS = ("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg",
                  "insightface/data/images/t1.jpg")  # paths inside site-packages, used when present
FIRST_HELD_OUT = 1_000_000  # the demo model trained on identity seeds below this


def _stats(values: list[float]) -> dict:
    v = np.asarray(values)
    return {"n": int(v.size), "min": round(float(v.min()), 2), "p1": round(float(np.percentile(v, 1)), 2),
            "median": round(float(np.median(v)), 2), "max": round(float(v.max()), 2)}


def _photos() -> dict[str, np.ndarray]:
    import site

    from skimage import data

    out = {}
    for name in SKIMAGE_PHOTOS:
        img = getattr(data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        out[name] = np.ascontiguousarray(img.astype(np.uint8))
    for root in site.getsitepackages():
        for rel in SHIPPED_PHOTOS:
            if (Path(root) / rel).is_file():
                out[Path(rel).name] = np.asarray(Image.open(Path(root) / rel).convert("RGB"))
    return out


def run(identities: int = 100, pairs: int = 30) -> dict:
    from app.avatars import EMOTIONS, prepare_stylised, stylised_avatar
    from app.render_worker import load_demo_models
    from avatar.domain import DEMO_DOMAIN, roundtrip_psnr
    from avatar.engine import AvatarEngine, EngineOptions
    from avatar.faces import FaceBox, FixedBoxes, HaarFaceDetector

    models = load_demo_models(device="cpu")
    h, w = models.frame_hw
    one = AvatarEngine(models, EngineOptions(decoder="torch", warmup=False))
    two = AvatarEngine(replace(models, frame_hw=(h, 2 * w)), EngineOptions(decoder="torch", warmup=False))

    def psnr(prepared) -> float:
        return roundtrip_psnr(models.vae, prepared.image, prepared.reference_latent)

    groups: dict[str, list[float]] = {"drawn": [], "drawn_jpeg": [], "drawn_pairs": []}
    for seed in range(FIRST_HELD_OUT, FIRST_HELD_OUT + identities):
        av = stylised_avatar(seed)
        for emotion in EMOTIONS:  # every emotion's portrait as the avatar's face
            groups["drawn"].append(psnr(one.prepare_avatar(av.images[emotion], detector=FixedBoxes(av.face_boxes))))
        jpeg = io.BytesIO()
        Image.open(io.BytesIO(av.images["neutral"])).save(jpeg, format="JPEG", quality=75)
        groups["drawn_jpeg"].append(psnr(one.prepare_avatar(jpeg.getvalue(), detector=FixedBoxes(av.face_boxes))))
    for seed in range(FIRST_HELD_OUT + 200, FIRST_HELD_OUT + 200 + 2 * pairs, 2):
        groups["drawn_pairs"].append(psnr(prepare_stylised(two, stylised_avatar(seed, faces=2))))
    photos = {}
    for name, img in _photos().items():
        faces = HaarFaceDetector().detect(img)
        if not faces:  # the centre, a third of the shorter side: a user's explicit box
            s = min(img.shape[:2]) / 3
            cy, cx = img.shape[0] / 2, img.shape[1] / 2
            faces = [FaceBox(cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        photos[name] = round(psnr(one.prepare_avatar(buf.getvalue(), detector=FixedBoxes(faces[:1]))), 2)
    drawn = [v for g in groups.values() for v in g]
    threshold = DEMO_DOMAIN.min_psnr_db
    return {"threshold_db": threshold, **{g: _stats(v) for g, v in groups.items()}, "photos_db": photos,
            "drawn_margin_db": round(min(drawn) - threshold, 2),
            "photos_flagged": sorted(k for k, v in photos.items() if v < threshold),
            "photos_passed": sorted(k for k, v in photos.items() if v >= threshold)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100, help="held-out drawn identities (4 emotions each)")
    parser.add_argument("--pairs", type=int, default=30, help="held-out two-face scenes")
    args = parser.parse_args()
    print(json.dumps(run(args.identities, args.pairs), indent=2))


if __name__ == "__main__":
    main()
