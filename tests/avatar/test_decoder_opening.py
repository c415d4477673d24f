"""A decode stream opens on a settled decoder (`FrameDecoder.open_at`): a still face stays still from frame 0;
settled on the reference first (`FrameDecoder.settle`, shared per reference), it opens in fewer decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.decoder import OPENING_LATENTS, SETTLED_OPENING_LATENTS, Deflicker, FrameDecoder, SettledReferences
from models.vae import WanVAE
from training.probes import psnr


def _frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute change between consecutive frames, in grey levels."""
    return np.abs(np.diff(frames.astype(np.float32), axis=0)).mean((1, 2, 3))


def test_a_still_face_shimmers_when_decoded_from_cold_and_not_once_the_decoder_is_opened():
    """The demo VAE (the one users get): a drawn face's latent held still. Decoded from cold, the frames of
    the first latents change by grey levels; opened at that latent, frame 0 and the 12 frames after it
    change by under a tenth of a grey level."""
    from app.render_worker import demo_model_available, load_demo_models
    from avatar.drawn.face import Identity, render

    if not demo_model_available():
        pytest.skip("app/demo_model weights are not in the tree")
    models = load_demo_models(device="cpu")
    face = np.asarray(render(Identity.from_seed(1000011), size=(128, 128))[0])
    x = torch.from_numpy(face.copy()).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        still = models.vae.encode(x.expand(-1, -1, 13, -1, -1).contiguous())[:, :, 2:3]  # a latent of 4 frames

    cold = FrameDecoder(models.vae, 16, 16).decode(still.expand(-1, -1, 4, -1, -1).contiguous())  # 13 frames
    opened = FrameDecoder(models.vae, 16, 16)
    frames = np.concatenate([opened.open_at(still), opened.decode(still.expand(-1, -1, 3, -1, -1).contiguous())])
    print(f"\nframe-to-frame change, cold: {_frame_changes(cold).round(2)}; opened: {_frame_changes(frames).round(3)}")
    assert _frame_changes(cold)[:4].min() > 0.5
    assert _frame_changes(frames).max() < 0.1
    assert opened.latents_decoded == OPENING_LATENTS + 3


def test_a_stream_opens_once_before_its_first_latent():
    from models.config import vae_preset

    dec = FrameDecoder(WanVAE(vae_preset("tiny")).eval(), 4, 4)
    z = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        assert dec.open_at(z).shape == (1, 32, 32, 3)
        with pytest.raises(RuntimeError, match="opens once"):
            dec.open_at(z)


def test_a_stream_settled_on_the_reference_opens_in_fewer_decodes_as_the_cold_opening_does():
    """The demo VAE: the portrait's latent as the reference, a latent of the face speaking as latent 1.
    Settled on the reference, latent 1 decoded SETTLED_OPENING_LATENTS times gives the frames a cold
    OPENING_LATENTS opening gives, to within 40 dB, and the face stays still."""
    from app.render_worker import demo_model_available, load_demo_models
    from avatar.drawn.emotions import rest_state
    from avatar.drawn.face import Identity, render

    if not demo_model_available():
        pytest.skip("app/demo_model weights are not in the tree")
    models = load_demo_models(device="cpu")
    ident = Identity.from_seed(1000023)

    def latent(state):
        face = np.asarray(render(ident, state, (128, 128))[0]) if state else np.asarray(render(ident, size=(128, 128))[0])
        x = torch.from_numpy(face.copy()).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
        with torch.no_grad():
            return models.vae.encode(x.expand(-1, -1, 5, -1, -1).contiguous())

    reference = latent(None)[:, :, :1]  # a portrait's encoding, as prepare_avatar makes it
    first = latent(rest_state("happy"))[:, :, 1:2]  # another drawing of the face: the stream's latent 1
    with torch.no_grad():
        cold = FrameDecoder(models.vae, 16, 16)
        a = np.concatenate([cold.open_at(first), cold.decode(first.expand(-1, -1, 2, -1, -1).contiguous())])
        settled = FrameDecoder(models.vae, 16, 16, SettledReferences())
        settled.settle(reference)
        b = np.concatenate([settled.open_at(first), settled.decode(first.expand(-1, -1, 2, -1, -1).contiguous())])
    assert settled.latents_decoded == SETTLED_OPENING_LATENTS + 2
    gap = [psnr(x, y) for x, y in zip(a, b)]
    print(f"\nsettled vs cold opening, PSNR per frame: {np.round(gap, 1)}; changes: {_frame_changes(b).round(3)}")
    assert min(gap) > 40
    assert _frame_changes(b).max() < 0.3


class _Counting:
    """A decoder backend that counts its decodes."""

    def __init__(self, backend) -> None:
        self.backend, self.steps = backend, 0

    def init_state(self, *shape):
        return self.backend.init_state(*shape)

    def decode_step(self, state, z):
        self.steps += 1
        return self.backend.decode_step(state, z)


def test_sessions_share_the_settled_reference_and_the_cache_is_bounded():
    from models.config import vae_preset

    backend = _Counting(WanVAE(vae_preset("tiny")).eval())
    cache = SettledReferences(capacity=2)
    refs = [torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        streams = []
        for ref in (refs[0], refs[0]):
            dec = FrameDecoder(backend, 4, 4, cache)
            dec.settle(ref)
            streams.append(np.concatenate([dec.open_at(z[:, :, :1]), dec.decode(z)]))
        assert backend.steps == OPENING_LATENTS + 2 * (SETTLED_OPENING_LATENTS + 2)  # the second settled free
        np.testing.assert_array_equal(streams[0], streams[1])  # shared read-only: both streams the same
        assert (cache.hits, cache.misses) == (1, 1)
        for ref in (refs[1], refs[2], refs[0]):  # capacity 2: refs[0] was the least recently used
            FrameDecoder(backend, 4, 4, cache).settle(ref)
        assert (cache.hits, cache.misses) == (1, 4)


def test_a_stream_settles_once_before_it_opens_and_a_held_start_shows_the_settled_reference():
    from models.config import vae_preset

    vae = WanVAE(vae_preset("tiny")).eval()
    ref = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        dec = FrameDecoder(vae, 4, 4)
        with pytest.raises(RuntimeError, match="settled stream"):
            dec.open_still()
        dec.settle(ref)
        with pytest.raises(RuntimeError, match="settles once"):
            dec.settle(ref)
        still = dec.open_still()  # nothing generated yet: frame 0 is the reference, settled
        reference_held = FrameDecoder(vae, 4, 4).decode(ref.expand(-1, -1, OPENING_LATENTS, -1, -1).contiguous())
        np.testing.assert_array_equal(still[0], reference_held[-1])
        assert dec.decode(torch.randn(1, 16, 1, 4, 4)).shape[0] == 4  # the stream goes on from there
        with pytest.raises(RuntimeError, match="opens once"):
            dec.open_at(ref)


def test_deflicker_takes_back_part_of_a_small_step_and_passes_motion_untouched():
    before = np.full((4, 4, 3), 100, np.uint8)
    frame = before.copy()
    frame[0, 0] = 104  # a 4-level step: half of the way under 8 levels, so 0.5 x 0.5 of it is taken back
    frame[1, 1] = 130  # a 30-level step: motion
    frame[2, 2, 0] = 97  # the largest channel decides: -3 levels
    out = Deflicker(strength=0.5, still_levels=8.0).apply(frame, before)
    assert out[0, 0].tolist() == [103, 103, 103]
    assert out[1, 1].tolist() == [130, 130, 130]
    assert out[2, 2].tolist() == [98, 100, 100]  # -3 + 0.5 x (1 - 3/8) x 3, rounded
    assert (out[3] == 100).all()
    with pytest.raises(ValueError, match="strength"):
        Deflicker(strength=1.5)


def test_the_decoder_deflickers_only_each_latents_first_frame():
    """Frames 1, 5, 9, ... (a latent's first) change, towards the frame before them; every other frame is
    exactly what the plain decoder gives."""
    from models.config import vae_preset

    vae = WanVAE(vae_preset("tiny")).eval()
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.05
    with torch.no_grad():
        plain, eased = FrameDecoder(vae, 4, 4), FrameDecoder(vae, 4, 4, deflicker=Deflicker(1.0, 255.0))
        a = np.concatenate([plain.open_at(z[:, :, :1]), plain.decode(z)])
        b = np.concatenate([eased.open_at(z[:, :, :1]), eased.decode(z)])
    starts = list(range(1, len(a), 4))
    others = [i for i in range(len(a)) if i not in starts]
    np.testing.assert_array_equal(a[others], b[others])
    for i in starts:
        step_plain = np.abs(a[i].astype(int) - a[i - 1]).mean()
        step_eased = np.abs(b[i].astype(int) - b[i - 1]).mean()
        assert step_eased < step_plain or step_plain == 0
