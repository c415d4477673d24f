"""Decoder adaptation: its pairs hold what a live stream decoded, its windows decode as a stream does, and
its loop trains the decoder alone, resumably."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from avatar.decoder import OPENING_LATENTS, SETTLED_OPENING_LATENTS, FrameDecoder, to_uint8
from models.config import VAE_TINY
from models.vae import WanVAE
from training.adapt_decoder import (AdaptConfig, DecodePair, PairStore, adaptation_loss, adapt_decoder,
                                    decoder_parameters, generate_pairs, sample_window)

from helpers import noise, randomize_parameters


def _vae(seed=0) -> WanVAE:
    torch.manual_seed(seed)
    return randomize_parameters(WanVAE(VAE_TINY), seed=seed + 1).eval()


def _pair(latents: int, seed=0, hw=(32, 32)) -> DecodePair:
    rng = np.random.default_rng(seed)
    n = 4 * latents
    ramp = np.linspace(0, 255, hw[1], dtype=np.float32)[None, None, :, None]
    frames = np.clip(ramp + rng.normal(0, 20, (n, *hw, 3)), 0, 255).astype(np.uint8)
    return DecodePair(latents=rng.standard_normal((16, latents, hw[0] // 8, hw[1] // 8)).astype(np.float32),
                      frames=frames, mouths=np.tile(np.array([[10, 20, 22, 26]], np.int32), (n, 1)),
                      generated=frames.copy(), emotion="neutral")


@pytest.mark.parametrize("settled, moving", [(False, False), (True, False), (True, True)],
                         ids=["cold", "settled", "settled-moving"])
def test_a_window_at_the_first_latent_decodes_as_a_stream_opens(settled, moving):
    """Warm latents of a window at latent 1 are the stream's opening (the reference it settled on, if the
    pair keeps it, then latent 1 held), so the window's frames are exactly what FrameDecoder shows."""
    vae = _vae()
    pair = _pair(latents=4)
    if settled:
        pair = replace(pair, reference=np.random.default_rng(9).standard_normal((16, 1, 4, 4)).astype(np.float32),
                       moving=moving)
    cfg = AdaptConfig(window_latents=4)
    warm, window, frames, masks = sample_window(pair, np.random.default_rng(0), cfg)
    held = 0 if moving else SETTLED_OPENING_LATENTS if settled else OPENING_LATENTS
    assert warm.shape[1] == (OPENING_LATENTS if settled else 0) + held
    assert all(torch.equal(warm[:, -1 - i], window[:, 0]) for i in range(held))
    np.testing.assert_array_equal(frames, pair.frames)  # latents 1..4 cover pair frames 0..15
    assert masks[:, 20:26, 10:22].all() and masks.mean() < 0.3  # the mouth box, with its margin
    stream = FrameDecoder(vae, 4, 4)
    z = torch.from_numpy(pair.latents)[None]
    if settled:
        stream.settle(torch.from_numpy(pair.reference)[None])
    if not moving:
        stream.open_at(z[:, :, :1])
    live = stream.decode(z)
    from training.train_vae import decode_raw

    with torch.no_grad():
        _, caches = decode_raw(vae, vae.unnormalise(warm[None]))
        recon, _ = decode_raw(vae, vae.unnormalise(window[None]), caches)
    np.testing.assert_array_equal(to_uint8(recon), live)


def test_later_windows_are_led_by_the_latents_before_them():
    pair = _pair(latents=12)
    cfg = AdaptConfig(window_latents=4, warm_latents=3)
    for seed in range(20):
        warm, window, frames, _ = sample_window(pair, np.random.default_rng(seed), cfg)
        z = torch.from_numpy(pair.latents)
        s = next(i for i in range(12) if torch.equal(z[:, i], window[:, 0])) + 1  # 1-based
        np.testing.assert_array_equal(frames, pair.frames[4 * (s - 1):4 * (s + 3)])
        if s > cfg.warm_latents:
            torch.testing.assert_close(warm, z[:, s - 1 - cfg.warm_latents:s - 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="shorter than a 4-latent window"):
        sample_window(_pair(latents=3), np.random.default_rng(0), cfg)


def test_adaptation_trains_the_decoder_alone_lowers_its_error_and_resumes(tmp_path):
    from models.vae_loading import load_vae, save_vae

    vae = _vae()
    src = save_vae(vae, tmp_path / "vae.safetensors")
    store = PairStore(tmp_path / "pairs")
    for i in range(2):
        store.write(f"clip_{i}", _pair(latents=4, seed=i))
    cfg = AdaptConfig(steps=12, lr=3e-3, batch=1, window_latents=2, warm_latents=1, log_every=1, checkpoint_every=100)
    probe = sample_window(store.read("clip_0"), np.random.default_rng(123), cfg)
    with torch.no_grad():
        before = float(adaptation_loss(vae, *probe, cfg)["loss"])
    assert adapt_decoder(src, store, tmp_path / "a", cfg, stop_after=0.0) is None  # stops after one step
    assert torch.load(tmp_path / "a" / "adapt_train.pt", weights_only=True)["step"] == 1
    resumed = load_vae(adapt_decoder(src, store, tmp_path / "a", cfg))
    straight = load_vae(adapt_decoder(src, store, tmp_path / "b", cfg))
    for (name, p), q in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)  # the resumed run is the same run
    with torch.no_grad():
        after = float(adaptation_loss(resumed, *probe, cfg)["loss"])
    assert after < 0.8 * before
    trained = {id(p) for p in decoder_parameters(vae)}
    for (name, p), q in zip(vae.named_parameters(), resumed.parameters()):
        if id(p) in trained and name.startswith("decoder."):
            continue
        if id(p) not in trained:
            torch.testing.assert_close(p, q, msg=name)  # the encoder side does not move
    assert any(not torch.equal(p, q) for p, q in zip(vae.decoder.parameters(), resumed.decoder.parameters()))


def test_pairs_hold_what_the_live_stream_decoded(tmp_path):
    """Through the real engine (TINY, random weights): the recorded latents, decoded as a stream opens,
    give exactly the frames the session showed; training clips only, single-face only; resumable."""
    from avatar.engine import ModelBundle
    from training.dataset import ClipStore, make_clip
    from training.latents import LatentClip, LatentStore

    models = ModelBundle.random("tiny", "tiny", seed=0)
    clips, latents = ClipStore(tmp_path / "clips"), LatentStore(tmp_path / "latents")
    for key, split in (("clip_a", "held_out"), ("clip_b", "train"), ("clip_c", "train")):
        clip = make_clip(noise(16_000, seed=len(key) + ord(key[-1])), 7 + ord(key[-1]), size=(32, 32), blinks=False)
        clips.write(key, clip)
        latents.write(key, LatentClip(latents=np.zeros((16, 3, 4, 4), np.float16),
                                      emotion=np.zeros((16, 1, 4, 4), np.float16),
                                      features=np.zeros((1, 9, 80), np.float32), masks=np.ones((1, 2, 2), np.float32),
                                      motion=0.0, emotions=("neutral",), split=split))
    out = PairStore(tmp_path / "pairs")
    assert generate_pairs(models, clips, latents, out, limit=1) == 1
    assert out.keys() == ["clip_b"]  # the first training clip; the held-out one is never a pair
    pair = out.read("clip_b")
    assert pair.frames.shape == pair.generated.shape and pair.frames.shape[0] >= 16
    assert pair.latents.shape[1] * 4 >= pair.frames.shape[0]
    assert pair.reference is not None and pair.reference.shape == (16, 1, 4, 4)
    stream = FrameDecoder(models.vae, 4, 4)
    z = torch.from_numpy(pair.latents)[None]
    stream.settle(torch.from_numpy(pair.reference)[None])  # as the session's decoder did
    if not pair.moving:  # noise from the first sample: the session opened moving, latent 1 not held
        stream.open_at(z[:, :, :1])
    np.testing.assert_array_equal(stream.decode(z)[:len(pair.generated)], pair.generated)
    teacher = make_clip(clips.read("clip_b").audio[0], clips.read("clip_b").identity_seeds[0], size=(32, 32),
                        blinks=False)
    np.testing.assert_array_equal(pair.frames, teacher.frames[1:1 + len(pair.frames)])
    written = out.path("clip_b").stat().st_mtime_ns
    assert generate_pairs(models, clips, latents, out, limit=2) == 2  # resumes: clip_b kept, clip_c added
    assert out.keys() == ["clip_b", "clip_c"] and out.path("clip_b").stat().st_mtime_ns == written


def test_the_boundary_weight_counts_only_the_steps_into_a_latent():
    """A target that moves only on the first frame of latents 2..4 (window frames 4, 8, 12): the steps into
    those frames are what boundary_weight weighs, the steps out of them are not."""
    vae = _vae()
    warm, window, frames, masks = sample_window(_pair(latents=4), np.random.default_rng(0), AdaptConfig())
    moved = frames.copy()
    moved[4::4] = np.clip(moved[4::4].astype(int) + 60, 0, 255).astype(np.uint8)
    masks = np.zeros_like(masks)  # no mouth weighting: every pixel weighs 1

    def motion(b, target):
        with torch.no_grad():
            return float(adaptation_loss(vae, warm, window, target, masks,
                                         AdaptConfig(boundary_weight=b, mouth_weight=1.0))["motion"])

    gain_1, gain_5 = motion(1.0, moved) - motion(1.0, frames), motion(5.0, moved) - motion(5.0, frames)
    assert 2.5 < gain_5 / gain_1 < 3.5  # (5 + 1) / (1 + 1): the step in weighs 5, the step out 1


def test_boundary_weight_on_still_pixels_leaves_the_teachers_own_motion_alone():
    """`boundary_where="still"`: a still target weighs as with "all"; a patch the teacher moves on the first
    frame of latents 2..4 costs the same whatever the boundary weight, as a step inside a latent would."""
    vae = _vae()
    warm, window, frames, masks = sample_window(_pair(latents=4), np.random.default_rng(0), AdaptConfig())
    still = np.repeat(frames[:1], len(frames), axis=0)

    def moving(by):  # the patch jumps on latents' first frames: teacher motion at those steps either way
        out = still.copy()
        out[4::4, 8:16, 8:16] = np.clip(out[4::4, 8:16, 8:16].astype(int) + by, 0, 255).astype(np.uint8)
        return out

    masks = np.zeros_like(masks)

    def motion(b, target, where):
        cfg = AdaptConfig(boundary_weight=b, mouth_weight=1.0, boundary_where=where)
        with torch.no_grad():
            return float(adaptation_loss(vae, warm, window, target, masks, cfg)["motion"])

    assert motion(5.0, still, "still") == pytest.approx(motion(5.0, still, "all"), rel=1e-6)
    assert motion(5.0, still, "still") > motion(1.0, still, "still") * 1.5  # still pixels' steps in weigh 5
    gain = {(w, b): motion(b, moving(80), w) - motion(b, moving(40), w) for w in ("all", "still") for b in (1.0, 5.0)}
    assert 2.5 < gain["all", 5.0] / gain["all", 1.0] < 3.5
    assert 0.9 < gain["still", 5.0] / gain["still", 1.0] < 1.1
    with pytest.raises(ValueError, match="boundary_where"):
        motion(5.0, still, "mouth")


def test_pairs_parse_a_stream_that_settled_or_found_its_reference_settled():
    """The recording is the settling (the reference OPENING_LATENTS times; absent when another stream had
    settled on it), latent 1 SETTLED_OPENING_LATENTS + 1 times (once where the stream opened moving),
    then the later latents."""
    from types import SimpleNamespace

    from training.adapt_decoder import pair_from_stream

    ref, l1, l2 = (torch.full((1, 16, 1, 2, 2), float(v)) for v in (7, 1, 2))
    teacher = SimpleNamespace(frames=np.zeros((20, 16, 16, 3), np.uint8), num_frames=20,
                              mouth_boxes=np.zeros((1, 20, 4), np.int32))
    shown = np.zeros((20, 16, 16, 3), np.uint8)
    held, moving = [l1] * (SETTLED_OPENING_LATENTS + 1) + [l2], [l1, l2]
    for decoded, opened_moving in (([ref] * OPENING_LATENTS + held, False), (held, False),
                                   ([ref] * OPENING_LATENTS + moving, True), (moving, True)):
        pair = pair_from_stream(decoded, teacher, shown, "neutral", ref)
        assert pair.latents.shape == (16, 2, 2, 2) and (pair.latents[:, 0] == 1).all() and (pair.latents[:, 1] == 2).all()
        assert (pair.reference == 7).all() and pair.frames.shape[0] == 8 and pair.moving == opened_moving
    with pytest.raises(RuntimeError, match="opened on its first latent"):
        pair_from_stream([l1] * (OPENING_LATENTS + 1) + [l2], teacher, shown, "neutral")  # a cold opening


def test_rounds_continue_from_each_other_and_resume(tmp_path):
    from models.vae_loading import load_vae, save_vae
    from training.adapt_decoder import adapt_in_rounds

    src = save_vae(_vae(), tmp_path / "vae.safetensors")
    store = PairStore(tmp_path / "pairs")
    store.write("clip_0", _pair(latents=3))
    base = AdaptConfig(steps=2, lr=3e-3, batch=1, window_latents=2, warm_latents=1, log_every=1)
    rounds = [base, AdaptConfig(**{**base.__dict__, "steps": 3, "boundary_weight": 8.0, "name": "vae_adapt_2"})]
    assert adapt_in_rounds(src, store, tmp_path / "r", rounds, stop_after=0.0) is None  # one step of round 1
    assert adapt_in_rounds(src, store, tmp_path / "r", rounds) == tmp_path / "r" / "vae_adapted.safetensors"
    # round 2 started from round 1's decoder: the same as running it by hand on that file
    first = adapt_decoder(src, store, tmp_path / "h1", rounds[0])
    by_hand = load_vae(adapt_decoder(first, store, tmp_path / "h2", rounds[1]))
    for (name, p), q in zip(load_vae(tmp_path / "r" / "vae_adapted.safetensors").state_dict().items(),
                            by_hand.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    stages = [line.split('"stage": "')[1].split('"')[0]
              for k in (1, 2) for line in (tmp_path / "r" / f"adapt_{k}" / "adapt_log.jsonl").read_text().splitlines()]
    assert stages == ["vae_adapt"] * 2 + ["vae_adapt_2"] * 3
