"""The model-domain check (avatar/domain.py): the shipped demo VAE tells photos from the drawn faces it was
trained on, at one decode per prepared avatar; a model without a declared domain is never checked."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from skimage import data as skdata

from app.avatars import EMOTIONS, png_bytes, prepare_stylised, stylised_avatar
from app.render_worker import demo_model_available
from avatar.domain import DEMO_DOMAIN, ModelDomain, roundtrip_psnr
from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
from avatar.faces import FixedBoxes

needs_demo = pytest.mark.skipif(not demo_model_available(), reason="app/demo_model weights are not in the tree")
HELD_OUT = (1_000_003, 1_000_040, 1_000_077)  # identities no training clip used (seeds >= 1,000,000)
PAIR = 1_000_212  # a held-out two-face scene


@pytest.fixture(scope="module")
def demo():
    """The demo model's engines at its one-face and two-face sizes (never started: preparation only)."""
    from app.render_worker import load_demo_models

    models = load_demo_models(device="cpu")
    h, w = models.frame_hw
    options = EngineOptions(decoder="torch", warmup=False)
    return AvatarEngine(models, options), AvatarEngine(replace(models, frame_hw=(h, 2 * w)), options)


def astronaut_png() -> bytes:
    return png_bytes(np.ascontiguousarray(skdata.astronaut()))  # a photo of a person (NASA, public domain)


@needs_demo
def test_the_demo_vae_flags_a_photo_and_passes_held_out_drawn_faces(demo):
    one, two = demo
    photo = one.prepare_avatar(astronaut_png())  # the Haar detector finds her face
    drawn = [prepare_stylised(one, stylised_avatar(seed)) for seed in HELD_OUT]
    pair = prepare_stylised(two, stylised_avatar(PAIR, faces=2))
    vae = one.models.vae
    psnr = {"astronaut": roundtrip_psnr(vae, photo.image, photo.reference_latent),
            **{f"drawn {a.content_hash[:6]}": roundtrip_psnr(vae, a.image, a.reference_latent) for a in drawn},
            "pair": roundtrip_psnr(vae, pair.image, pair.reference_latent)}
    print({k: round(v, 2) for k, v in psnr.items()}, "threshold", DEMO_DOMAIN.min_psnr_db)
    assert psnr["astronaut"] < DEMO_DOMAIN.min_psnr_db - 1.0, psnr  # measured 21.6 dB
    assert min(v for k, v in psnr.items() if k != "astronaut") > DEMO_DOMAIN.min_psnr_db, psnr
    assert photo.warning is not None and "drawn faces" in photo.warning and "Using real weights" in photo.warning
    assert f"{psnr['astronaut']:.1f} dB < {DEMO_DOMAIN.min_psnr_db:g} dB" in photo.warning
    assert all(a.warning is None for a in (*drawn, pair))


@needs_demo
def test_every_emotion_of_a_held_out_face_passes(demo):
    one, _ = demo
    av = stylised_avatar(HELD_OUT[0])
    for emotion in EMOTIONS:  # each emotion's portrait as the avatar's own face
        prepared = one.prepare_avatar(av.images[emotion], detector=FixedBoxes(av.face_boxes))
        assert prepared.warning is None, (emotion, prepared.warning)


@needs_demo
def test_real_weights_declare_no_domain_and_never_warn(demo):
    one, _ = demo
    unchecked = AvatarEngine(replace(one.models, domain=None), one.options)  # same VAE, no declared domain
    assert unchecked.prepare_avatar(astronaut_png()).warning is None
    assert ModelBundle.random("tiny", "tiny").domain is None


def test_a_domain_warns_below_its_threshold_only():
    domain = ModelDomain("drawn faces", min_psnr_db=24.0)
    assert domain.warning(24.0) is None and domain.warning(31.5) is None
    message = domain.warning(17.24, "me.jpg")
    assert message.startswith("me.jpg looks unlike the drawn faces") and "17.2 dB < 24 dB" in message
    assert "README" in message and "real weights" in message

