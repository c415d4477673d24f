"""Demo-model training code: sequence geometry, noise levels, and that each stage actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import TINY, VAE_DEMO
from models.dit import WanDiT
from models.lora import inject_lora
from models.vae import WanVAE
from training.latents import LatentClip, LatentStore
from training.train_dit import Batches, DiTTrainConfig, dit_loss, frame_sigmas, trainable_parameters
from training.train_vae import VaeTrainConfig, to_video_tensor, vae_loss


def _latent_clip(seed, faces=1, k=14, d=48):
    rng = np.random.default_rng(seed)
    return LatentClip(latents=rng.standard_normal((16, 1 + k, 4, 4)).astype(np.float16),
                      emotion=rng.standard_normal((16, 1, 4, 4)).astype(np.float16),
                      features=np.arange(faces * (1 + 4 * k) * d, dtype=np.float32).reshape(faces, 1 + 4 * k, d),
                      masks=np.ones((faces, 2, 2), np.float32), motion=0.5, emotions=("happy",) * faces)


def test_training_window_keeps_the_reference_first_and_audio_aligned(tmp_path):
    c = _latent_clip(0)
    w = Batches._window(c, s=3, n=6)
    assert np.array_equal(w["latents"][:, 0], c.latents[:, 0].astype(np.float32))  # the reference
    assert np.array_equal(w["latents"][:, 1:], c.latents[:, 3:9].astype(np.float32))
    # latent 3 covers video frames 9..12; the reference hears silence
    assert not w["audio"][0].any()
    assert np.array_equal(w["audio"][1, :, 0], c.features[0, 9:13, 0])


def test_a_model_with_an_audio_lead_trains_on_what_its_front_end_will_compute(tmp_path):
    from audio.features.mel import MEL_SILENCE, MelConfig, MelFeatures
    from training.train_dit import lead

    rate = 16_000
    t = np.arange(2 * rate) / rate
    speech = (0.2 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 4 * t) > 0)).astype(np.float32)
    plain = MelFeatures(MelConfig(n_mels=48))(speech)
    heard = MelFeatures(MelConfig(n_mels=48, lead_samples=640))(speech)  # what the engine gives a lead-1 model
    np.testing.assert_array_equal(lead(plain[None], 1)[0, :-1], heard[:-1])
    assert (lead(plain[None], 1)[0, -1] == MEL_SILENCE).all()  # past the end: silence, as the stream zero-fills
    assert lead(plain, 0) is plain
    store = LatentStore(tmp_path / "latents")
    c = _latent_clip(2)
    store.write("clip_000002", c)
    w = Batches(store, lead_frames=2).sample(np.random.default_rng(0), DiTTrainConfig(batch=1, window_latents=4), False)
    own = Batches(store).sample(np.random.default_rng(0), DiTTrainConfig(batch=1, window_latents=4), False)
    first = int(own["audio"][0, 1, 0, 0]) // 48  # the window's first video frame (features count up by 48 a frame)
    assert first > 0 and w["audio"][0, 1, 0, 0] == c.features[0, first + 2, 0]  # two frames early


def test_augmented_variants_change_what_the_audio_path_hears_and_nothing_else(tmp_path):
    from audio.features.mel import MelConfig, MelFeatures
    from training.augment import _FUNCS, AUGMENTATIONS, AugmentedFeatures, augment, augmented_features

    rate, rng = 16_000, np.random.default_rng(0)
    t = np.arange(rate) / rate
    speech = (0.2 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    for name in AUGMENTATIONS:  # each one alone: same length, finite, audibly different
        y = _FUNCS[name](speech, np.random.default_rng(1))
        assert y.shape == speech.shape and np.isfinite(y).all() and np.abs(y - speech).mean() > 1e-3, name
    y, names = augment(speech, rng)
    assert len(set(names)) == 2 and set(names) <= set(AUGMENTATIONS)
    feats = MelFeatures(MelConfig(n_mels=48))
    clean = feats(speech, 26)
    variants = augmented_features(feats, np.stack([speech, speech]), 26, variants=3, seed=5)
    assert variants.shape == (3, 2, 26, 48) and not np.allclose(variants[0, 0], clean, atol=1e-3)
    np.testing.assert_array_equal(variants, augmented_features(feats, np.stack([speech, speech]), 26, 3, seed=5))
    store = AugmentedFeatures(tmp_path / "aug")
    store.write("clip_000001", variants)
    assert "clip_000001" in store and np.array_equal(store.read("clip_000001"), variants)

    # training windows hear a variant as often as audio_augment says; the pictures stay the clip's
    latents = LatentStore(tmp_path / "latents")
    c = _latent_clip(1)
    latents.write("clip_000001", c)
    store.write("clip_000001", np.stack([np.full_like(c.features, -1.0), np.full_like(c.features, -2.0)]))
    data = Batches(latents, augmented=store)
    cfg = DiTTrainConfig(batch=1, window_latents=4)
    heard = []
    for i in range(40):
        w = data.sample(np.random.default_rng(i), DiTTrainConfig(batch=1, window_latents=4, audio_augment=0.5), False)
        heard.append(max(0, -int(w["audio"][0, 1:].min())))  # 0: the clip's own (>= 0), 1 or 2: a variant
    assert set(heard) == {0, 1, 2} and 10 <= heard.count(0) <= 30
    plain = [data.sample(np.random.default_rng(i), cfg, False)["audio"][0, 1:].min() for i in range(10)]
    assert min(plain) >= 0  # audio_augment 0 (the default): always the clip's own


def test_noise_levels_per_block_with_clean_context():
    cfg = DiTTrainConfig(window_latents=9, block_latents=3, clean_context=1.0)
    sig = frame_sigmas(256, 10, cfg, torch.Generator().manual_seed(0))
    assert sig.shape == (256, 10) and torch.all(sig[:, 0] == 0)
    blocks = sig[:, 1:].view(256, 3, 3)
    assert torch.all(blocks == blocks[:, :, :1])  # one level per block
    first = blocks[:, :, 0]
    # some block is noisy and every block before it is nearly clean
    target = (first > cfg.context_sigma).float().argmax(1)
    for row, j in zip(first, target):
        assert torch.all(row[:j] <= cfg.context_sigma)


def _overfit(loss_fn, params, steps, lr):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


@pytest.mark.slow  # ~2 min a stage on a busy 2-core CPU: 60 optimiser steps of the TINY DiT
@pytest.mark.parametrize("stage", ["base", "audio"])
def test_dit_stage_learns_a_fixed_batch(tmp_path, stage):
    store = LatentStore(tmp_path)
    for i in range(2):
        store.write(f"c{i}", _latent_clip(i))
    store.write("pair", _latent_clip(5, faces=2))
    cfg = DiTTrainConfig(stage=stage, batch=2, window_latents=6, block_latents=3)
    torch.manual_seed(0)
    dit = WanDiT(TINY)
    if stage == "audio":  # on top of a "trained" base: a fresh Wan head is zero and passes no gradient
        torch.nn.init.normal_(dit.head.head.weight, std=0.05)
        inject_lora(dit, 4, 4.0)
    params = trainable_parameters(dit, stage)
    names = {n for n, p in dit.named_parameters() if p.requires_grad}
    if stage == "audio":
        assert names and all(".lora_" in n or n.startswith(("audio", "face_", "emotion_")) for n in names)
    else:
        assert "patch_embedding.weight" in names and not any(".lora_" in n or "audio" in n for n in names)
    batch = Batches(store).sample(np.random.default_rng(0), cfg, pairs=False)
    losses = _overfit(lambda: dit_loss(dit, batch, cfg, torch.Generator().manual_seed(1)), params, 60, 3e-3)
    assert losses[-1] < (0.7 if stage == "base" else 0.85) * losses[0]  # the audio stage moves fewer weights


@pytest.mark.slow  # ~3 min on a busy 2-core CPU: 25 optimiser steps of the demo VAE
def test_vae_loss_decreases_on_a_fixed_clip():
    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO)
    from training.train_vae import teacher_clip

    clip = teacher_clip(np.random.default_rng(0), 5, (32, 32), 100)
    video = to_video_tensor(clip[None])
    cfg = VaeTrainConfig()
    losses = _overfit(lambda: vae_loss(vae, video, cfg, torch.Generator().manual_seed(0))["loss"],
                      list(vae.parameters()), 25, 2e-3)
    assert losses[-1] < 0.6 * losses[0]


def _trained_tiny_dit() -> WanDiT:
    """TINY weights with nothing left at a zero init (a zero head or adapter would hide everything)."""
    torch.manual_seed(0)
    dit = WanDiT(TINY)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return dit


def _tiny_dit_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    """(x, y, audio, t) for a 3-latent, 4x4 TINY forward pass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TINY.out_dim, 3, 4, 4, generator=g)
    y = torch.randn(1, TINY.in_dim - TINY.out_dim, 3, 4, 4, generator=g)
    audio = torch.randn(1, 3, 4, TINY.audio_dim, generator=g)
    return x, y, audio, torch.full((1, 3), 500.0)


def test_audio_stage_starts_as_the_trained_base(tmp_path):
    """Zeroed audio projections, zero FAA/AEM outputs and zero LoRA B: hearing audio changes nothing yet."""
    from models.loading import save_dit
    from training.train_dit import build_model

    base = _trained_tiny_dit()
    folder = save_dit(base, tmp_path / "base")
    dit = build_model(DiTTrainConfig(stage="audio"), TINY.replace(lora_rank=4, lora_alpha=4.0), folder).eval()
    x, y, audio, t = _tiny_dit_inputs(2)
    with torch.no_grad():
        silent = dit(x, t, None, y=y)
        heard = dit(x, t, None, y=y, audio=audio)
        reference = base(x, t, None, y=y)
    torch.testing.assert_close(heard, silent)
    torch.testing.assert_close(silent, reference, atol=1e-5, rtol=1e-5)


def test_a_base_model_is_deaf_so_it_runs_alone_in_the_engine(tmp_path):
    """The base stage never trains the audio side: it must not turn audio into noise on its own either."""
    from models.loading import save_dit
    from training.train_dit import build_model

    dit = build_model(DiTTrainConfig(stage="base"), TINY, save_dit(_trained_tiny_dit(), tmp_path / "w")).eval()
    x, y, audio, t = _tiny_dit_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, None, y=y, audio=audio), dit(x, t, None, y=y))


def test_a_stage_refuses_an_init_whose_lora_wrapped_weights_it_would_skip(tmp_path):
    """A finished model's folder (core + LoRA file) loads with q, k, v... wrapped as `.base_layer.`: a fresh
    base or audio model has no place for them and would train those layers from random weights."""
    from models.loading import save_dit
    from training.train_dit import build_model

    cfg = TINY.replace(lora_rank=4, lora_alpha=4.0)
    finished = _trained_tiny_dit()
    inject_lora(finished, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    folder = save_dit(finished, tmp_path / "finished")
    assert (folder / "lora.safetensors").exists()
    with pytest.raises(ValueError, match="no place in a fresh base model.*base_layer"):
        build_model(DiTTrainConfig(stage="base"), cfg, folder)
    core = tmp_path / "core"
    core.mkdir()
    (core / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    build_model(DiTTrainConfig(stage="base"), cfg, core)  # its core alone loads


def test_mouth_mask_covers_the_mouth_boxes_on_the_latent_grid():
    from training.dataset import make_clip
    from training.latents import mouth_latent_mask

    t = np.arange(16_000) / 16_000
    clip = make_clip((0.3 * np.sin(2 * np.pi * 220 * t) * (t % 0.5 < 0.3)).astype(np.float32), 7, size=(64, 64))
    m = mouth_latent_mask(clip, (8, 8))
    assert m.shape == (8, 8) and m.max() > 0.5 and 0 < (m > 0).sum() <= 8  # a few cells, not the face
    ys, xs = np.nonzero(m)
    boxes = clip.mouth_boxes[0]
    assert ys.min() * 8 <= boxes[:, 3].max() and (ys.max() + 1) * 8 >= boxes[:, 1].min()  # the rows of the mouth
    assert xs.min() * 8 <= boxes[:, 2].max() and (xs.max() + 1) * 8 >= boxes[:, 0].min()


def test_mouth_weight_scales_only_the_mouth_cells_of_the_loss():
    batch = Batches._window(_latent_clip(0), s=1, n=6)
    batch = {k: torch.as_tensor(v)[None] for k, v in batch.items()}
    batch["mouth"] = torch.zeros(1, 4, 4)
    batch["mouth"][0, 2, 1] = 1.0

    class Echo(torch.nn.Module):  # predicts a fixed velocity: the loss only sees the weighting
        def forward(self, xt, *a, **k):
            out = torch.zeros_like(xt)
            out[..., 2, 1] = 10.0  # a large error in the mouth cell only
            return out

    def loss(weight):
        return float(dit_loss(Echo(), batch, DiTTrainConfig(window_latents=6, mouth_weight=weight),
                              torch.Generator().manual_seed(0)))

    plain, weighted = loss(1.0), loss(4.0)
    without = dict(batch, mouth=torch.zeros(1, 4, 4))
    same = float(dit_loss(Echo(), without, DiTTrainConfig(window_latents=6, mouth_weight=4.0),
                          torch.Generator().manual_seed(0)))
    assert same == pytest.approx(plain, rel=1e-6)  # no mouth: the plain mean
    assert weighted > 2.0 * plain  # the one cell holding all the error now counts 4x (over a 19/16 larger total)


def test_latent_store_keeps_the_mouth_mask(tmp_path):
    store = LatentStore(tmp_path)
    c = _latent_clip(3)
    store.write("old", c)  # written without one: read back as None, trained as "no mouth"
    assert store.read("old").mouth is None
    import dataclasses

    store.write("new", dataclasses.replace(c, mouth=np.eye(4, dtype=np.float32)))
    assert np.array_equal(store.read("new").mouth, np.eye(4, dtype=np.float32))


def test_the_emotion_stage_trains_the_emotion_module_alone_on_the_audio_stage(tmp_path):
    from models.loading import save_dit
    from training.train_dit import build_model

    cfg = TINY.replace(lora_rank=4, lora_alpha=4.0)
    torch.manual_seed(0)
    audio = WanDiT(cfg)
    inject_lora(audio, 4, 4.0)
    with torch.no_grad():
        for p in audio.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a "trained" audio stage, LoRA included
    folder = save_dit(audio, tmp_path / "dit_audio")
    dit = build_model(DiTTrainConfig(stage="emotion"), cfg, folder)
    names = {n for n, p in dit.named_parameters() if p in set(trainable_parameters(dit, "emotion"))}
    assert names and all(n.startswith(("emotion_embedding.", "emotion_adapters.")) for n in names)
    assert any(".lora_" in n for n, _ in dit.named_parameters())  # the LoRA stays apart, to be saved on its own
    start = {n: p.detach().clone() for n, p in audio.state_dict().items()}
    assert all(torch.equal(start[n], v) for n, v in dit.state_dict().items())  # it starts as the audio stage
    with pytest.raises(ValueError, match="audio stage"):
        build_model(DiTTrainConfig(stage="emotion"), cfg, None)


def test_emotion_dropout_shows_the_reference_and_the_emotion_weight_counts_only_where_it_differs():
    batch = Batches._window(_latent_clip(0), s=1, n=6)
    batch = {k: torch.as_tensor(v)[None].repeat(2, *([1] * np.ndim(v))) for k, v in batch.items()}
    batch["mouth"] = torch.zeros(2, 4, 4)
    ref = batch["latents"][:, :, :1].clone()
    batch["emotion"] = ref.clone()
    batch["emotion"][1, :, :, 3, 3] += 1.0  # sample 1's emotion image differs from its reference in one cell
    seen = []

    class Echo(torch.nn.Module):  # records the emotion images it is given; errs in cell (3, 3) only
        def forward(self, xt, *a, emotion=None, **k):
            seen.append(emotion)
            out = torch.zeros_like(xt)
            out[..., 3, 3] = 10.0
            return out

    def loss(**kw):
        cfg = DiTTrainConfig(stage="emotion", window_latents=6, audio_dropout=0.0, **kw)
        return float(dit_loss(Echo(), batch, cfg, torch.Generator().manual_seed(0)))

    plain, weighted = loss(), loss(emotion_weight=6.0)
    assert torch.equal(seen[0], batch["emotion"]) and weighted > 1.5 * plain  # sample 1's (3, 3) counts 6x
    dropped = loss(emotion_dropout=1.0, emotion_weight=6.0)
    assert torch.equal(seen[-1], ref)  # every row sees the neutral reference as its emotion image...
    assert dropped == pytest.approx(plain, rel=1e-6)  # ...and, showing no change, weighs nothing extra


def test_reference_from_emotion_puts_the_emotion_image_where_the_reference_goes():
    batch = Batches._window(_latent_clip(0), s=1, n=6)
    batch = {k: torch.as_tensor(v)[None] for k, v in batch.items()}
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, xt, t, ctx, *, y=None, reference=None, **k):
            seen.update(x_ref=xt[:, :, :1].clone(), y_ref=y[:, :16, :1].clone(), reference=reference.clone())
            return torch.zeros_like(xt)

    cfg = DiTTrainConfig(stage="audio", window_latents=6, reference_from_emotion=True)
    dit_loss(Spy(), batch, cfg, torch.Generator().manual_seed(0))
    emotion = batch["emotion"].float()
    assert all(torch.equal(v, emotion) for v in seen.values())  # latent 0 (clean), y's reference, the injection
    assert not torch.equal(emotion, batch["latents"][:, :, :1])  # (the clip's own reference differs)
