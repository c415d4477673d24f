"""The demo VAE's training code: its losses, stages and curriculum, and the checks that measure it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import VAE_DEMO
from models.vae import WanVAE
from training.train_vae import VaeTrainConfig, to_video_tensor, vae_loss


def test_vae_training_resumes_from_its_checkpoint_and_measures_latent_stats(tmp_path):
    import json

    from models.vae_loading import load_vae
    from training.train_vae import train_vae

    cfg = VaeTrainConfig(steps=2, batch=1, crop=32, warmup=1, log_every=1, checkpoint_every=1, stat_clips=1)
    train_vae(tmp_path, cfg, stop_after=0.0)  # stops (resumably) after the first step
    assert torch.load(tmp_path / "vae_train.pt", weights_only=True)["step"] == 1
    path = train_vae(tmp_path, cfg)
    steps = [json.loads(line)["step"] for line in (tmp_path / "vae_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the second run continued at step 2, it did not start over
    vae = load_vae(path)
    assert vae.cfg.latents_std != VAE_DEMO.latents_std and all(s > 0 for s in vae.cfg.latents_std)


def test_the_vae_loss_weighs_the_mouth_box_as_told():
    """mouth_weight w: an error inside the mouth box costs w times one outside it (mean weight 1), and the
    masks follow the mouth as the clip moves; a weight of 1 is the unweighted loss."""
    from training.train_vae import teacher_clip, teacher_clip_and_mouths

    clip, masks = teacher_clip_and_mouths(np.random.default_rng(0), 5, (64, 64), 100)
    assert masks.shape == clip.shape[:3] and 0.005 < masks.mean() < 0.2
    np.testing.assert_array_equal(clip, teacher_clip(np.random.default_rng(0), 5, (64, 64), 100))
    mouth_rgb = clip[masks].astype(float).mean(0)
    assert np.abs(mouth_rgb - clip[~masks].astype(float).mean(0)).max() > 10  # the box is on the mouth
    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO).eval()
    video = to_video_tensor(clip[None])
    mouths = torch.from_numpy(masks[None])

    def loss(w, where):
        cfg = VaeTrainConfig(mouth_weight=w, edge_weight=0.0, kl_weight=0.0, motion_weight=0.0)
        with torch.no_grad():  # the same recon every time (seeded); +4 moves every target pixel away from it
            out = vae_loss(vae, video + 4.0 * where, cfg, torch.Generator().manual_seed(0), mouths=mouths)
        return float(out["l1"])

    inside = torch.from_numpy(masks).float()[None, None]
    base = loss(1.0, torch.zeros_like(inside))
    gain_1 = loss(1.0, inside) - base
    gain_8 = loss(8.0, inside) - loss(8.0, torch.zeros_like(inside))
    assert gain_8 > 3 * gain_1 > 0  # a mouth error weighs ~8 / mean weight as much


def test_vae_stream_continuation_equals_one_pass():
    """The warm-up split (no-grad prefix, then a continuation from its caches) is the same computation."""
    from training.train_vae import decode_raw, encode_stats, teacher_clip

    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO).eval()
    video = to_video_tensor(teacher_clip(np.random.default_rng(1), 13, (32, 32), 100)[None])
    with torch.no_grad():
        mu, logvar, _ = encode_stats(vae, video)
        mu_a, _, enc = encode_stats(vae, video[:, :, :5])
        mu_b, logvar_b, _ = encode_stats(vae, video[:, :, 5:], enc)
        torch.testing.assert_close(torch.cat([mu_a, mu_b], 2), mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logvar_b, logvar[:, :, 2:], atol=1e-5, rtol=1e-5)
        frames, _ = decode_raw(vae, mu)
        head, dec = decode_raw(vae, mu[:, :, :2])
        tail, _ = decode_raw(vae, mu[:, :, 2:], dec)
        assert tail.shape[2] == 8 and head.shape[2] == 5
        torch.testing.assert_close(torch.cat([head, tail], 2), frames, atol=1e-5, rtol=1e-5)
    # the training loss accepts such a prefix (whole 4-frame chunks after it)
    loss = vae_loss(vae, video, VaeTrainConfig(), torch.Generator().manual_seed(0), warm_frames=5)
    assert torch.isfinite(loss["loss"])


def test_psnr_by_latent_reports_each_latent_of_the_stream():
    from training.train_vae import drift_check, psnr_by_latent, teacher_clip

    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO).eval()
    clip = teacher_clip(np.random.default_rng(0), 9, (32, 32), 10)
    per = psnr_by_latent(vae, clip)
    assert len(per) == 3 and all(np.isfinite(per))
    # latent 1 is video frames 1..4: the same number from an independent PSNR over those frames
    from skimage.metrics import peak_signal_noise_ratio

    from training.train_vae import decode_raw, encode_stats

    with torch.no_grad():
        video = to_video_tensor(clip[None])
        recon, _ = decode_raw(vae, encode_stats(vae, video)[0])
    recon = ((recon.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0).numpy()
    expected = peak_signal_noise_ratio(clip[1:5] / 255.0, recon[1:5], data_range=1.0)
    assert per[1] == pytest.approx(expected, abs=0.02)
    report = drift_check(vae, latents=6, size=(32, 32))
    per = report["psnr_by_latent"]
    assert len(per) == 6 and report["last_third_db"] == round(np.mean(per[-2:]), 2)



def test_colour_swap_permutes_channels_and_keeps_the_pixels():
    from training.train_vae import swap_colours

    clip = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert swap_colours(clip, np.random.default_rng(0), 0.0) is clip
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(60):
        out = swap_colours(clip, rng, 1.0)
        order = tuple(int(np.flatnonzero([(out[..., i] == clip[..., j]).all() for j in range(3)])[0]) for i in range(3))
        assert sorted(order) == [0, 1, 2] and order != (0, 1, 2)  # a real permutation, never the identity
        seen.add(order)
    assert len(seen) == 5


def test_vae_loss_reports_the_mse_it_adds():
    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO)
    from training.train_vae import teacher_clip

    video = to_video_tensor(teacher_clip(np.random.default_rng(0), 1, (32, 32), 100)[None])
    with_mse = vae_loss(vae, video, VaeTrainConfig(), torch.Generator().manual_seed(0))
    without = vae_loss(vae, video, VaeTrainConfig(mse_weight=0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(with_mse["loss"] - without["loss"], with_mse["mse"])


def test_fan_in_init_zeroes_biases_and_keeps_the_attention_an_identity():
    from training.train_vae import fan_in_init

    torch.manual_seed(0)
    vae = fan_in_init(WanVAE(VAE_DEMO))
    convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert all(not m.bias.any() for m in convs if m.bias is not None)
    proj = vae.decoder.middle[1].proj.weight
    assert not proj.any()  # upstream's zero init: the attention block starts as the identity
    big = max((m for m in convs if m.weight.any()), key=lambda m: m.weight.numel())
    fan_in = big.weight[0].numel()
    assert abs(float(big.weight.std()) - (2 / fan_in) ** 0.5) < 0.1 * (2 / fan_in) ** 0.5


def test_a_first_vae_stage_hands_its_checkpoint_to_the_next(tmp_path):
    from training.train_vae import train_vae

    images = VaeTrainConfig(steps=1, batch=1, crop=32, latents=1, warmup=0, log_every=1, checkpoint_every=1)
    assert train_vae(tmp_path, images, finish=False) == tmp_path / "vae_train.pt"
    assert not (tmp_path / "vae.safetensors").exists()  # no stats measured, nothing final yet
    clips = VaeTrainConfig(steps=2, batch=1, crop=32, latents=2, warmup=1, log_every=1, checkpoint_every=1,
                           stat_clips=1)
    assert train_vae(tmp_path, clips) == tmp_path / "vae.safetensors"
    assert torch.load(tmp_path / "vae_train.pt", weights_only=True)["step"] == 2  # one step each


def test_flat_colour_check_scores_a_grey_decoder_badly():
    from training.train_vae import FLAT_COLOURS, flat_colour_check

    vae = WanVAE(VAE_DEMO).eval()
    for p in vae.decoder.head[2].parameters():  # a decoder that paints everything mid-grey
        torch.nn.init.zeros_(p)
    out = flat_colour_check(vae, size=32)
    grey = np.abs(np.array(FLAT_COLOURS) - 127.5).mean()
    assert out["flat_colour_mae"] == pytest.approx(grey, abs=0.2)
    assert out["decoded"][str(FLAT_COLOURS[0])] == [128, 128, 128]


def test_mouth_check_is_perfect_through_a_lossless_codec(monkeypatch):
    import training.train_vae as tv

    monkeypatch.setattr(tv, "encode_stats", lambda vae, video: (video, None, None))
    monkeypatch.setattr(tv, "decode_raw", lambda vae, z: (z, None))
    out = tv.mouth_check(None, faces=2, openings=5)
    assert out == {"mouth_probe_r": 1.0, "mouth_probe_gain": 1.0}
    monkeypatch.setattr(tv, "decode_raw", lambda vae, z: (z.mean(dim=(3, 4), keepdim=True).expand_as(z), None))
    flat = tv.mouth_check(None, faces=2, openings=5)  # every frame decoded to its mean colour: no mouth
    assert flat["mouth_probe_gain"] == 0.0


def test_a_later_vae_stage_warms_up_and_decays_over_its_own_steps():
    from training.train_vae import stage_lr

    cfg = VaeTrainConfig(steps=9000, first_step=6000, lr=3e-4)
    assert stage_lr(cfg, 6000) == pytest.approx(3e-6)  # warm-up restarts at the stage's first step
    assert stage_lr(cfg, 6099) == pytest.approx(3e-4, rel=1e-2)  # warmed up (the cosine has barely begun)
    assert stage_lr(cfg, 7500) == pytest.approx(3e-4 * 0.55, rel=1e-3)  # half way: the cosine's middle
    assert stage_lr(cfg, 8999) == pytest.approx(3e-5, rel=1e-3)
    assert stage_lr(VaeTrainConfig(steps=100), 0) == stage_lr(cfg, 6000)  # a first stage starts at 0


def test_an_inflated_vae_streams_a_still_clip_at_its_first_frame_quality():
    from training.train_vae import decode_raw, encode_stats, inflate_to_video, teacher_clip

    torch.manual_seed(0)
    vae = inflate_to_video(WanVAE(VAE_DEMO)).eval()
    frame = teacher_clip(np.random.default_rng(2), 1, (32, 32), 100)
    still = to_video_tensor(np.repeat(frame, 9, axis=0)[None])  # 1 + 4 + 4 frames
    with torch.no_grad():
        mu, _, _ = encode_stats(vae, still)
        for j in (1, 2):
            torch.testing.assert_close(mu[:, :, j], mu[:, :, 0], atol=1e-5, rtol=1e-5)
        video, _ = decode_raw(vae, mu)
    assert video.shape[2] == 9
    for t in range(1, 9):
        torch.testing.assert_close(video[:, :, t], video[:, :, 0], atol=1e-5, rtol=1e-5)
    # and a moving clip: each latent codes the last frame of its chunk, shown for all four of its frames
    moving = to_video_tensor(teacher_clip(np.random.default_rng(3), 5, (32, 32), 100)[None])
    with torch.no_grad():
        mu, _, _ = encode_stats(vae, moving)
        last, _, _ = encode_stats(vae, moving[:, :, 4:5])
    torch.testing.assert_close(mu[:, :, 1], last[:, :, 0], atol=1e-5, rtol=1e-5)


def test_moving_check_through_a_lossless_codec_is_at_the_psnr_ceiling(monkeypatch):
    import training.train_vae as tv

    monkeypatch.setattr(tv, "encode_stats", lambda vae, video: (video, None, None))
    monkeypatch.setattr(tv, "decode_raw", lambda vae, z: (z, None))
    assert tv.moving_check(WanVAE(VAE_DEMO), clips=1, latents=3, size=(32, 32)) == {"moving_db": 100.0}
    # a codec that holds the first frame: the clip moves, so the later latents lose
    monkeypatch.setattr(tv, "decode_raw", lambda vae, z: (z[:, :, :1].expand_as(z), None))
    assert tv.moving_check(WanVAE(VAE_DEMO), clips=1, latents=3, size=(32, 32))["moving_db"] < 40


def test_a_decoder_stage_keeps_the_encoder_and_adds_the_frame_difference_loss():
    from training.train_vae import teacher_clip

    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO)
    video = to_video_tensor(teacher_clip(np.random.default_rng(2), 9, (32, 32), 100)[None])
    plain = vae_loss(vae, video, VaeTrainConfig(), torch.Generator().manual_seed(0))
    losses = vae_loss(vae, video, VaeTrainConfig(motion_weight=3.0, decoder_only=True), torch.Generator().manual_seed(0))
    assert float(losses["motion"]) > 0
    torch.testing.assert_close(losses["loss"], plain["loss"] + 3.0 * losses["motion"])
    losses["loss"].backward()
    assert all(p.grad is None for p in vae.encoder.parameters()) and vae.decoder.head[-1].weight.grad is not None


def test_only_a_single_frame_vae_is_inflated_when_a_clip_stage_begins(tmp_path):
    """Inflation resets the time convs: right after single frames, ruinous after a clip stage trained them."""
    from training.train_vae import time_trained, train_vae

    def state():
        ckpt = torch.load(tmp_path / "vae_train.pt", weights_only=True)
        vae = WanVAE(VAE_DEMO)
        vae.load_state_dict(ckpt["vae"])
        opt = torch.optim.AdamW(vae.parameters())
        opt.load_state_dict(ckpt["opt"])
        return vae, opt

    small = dict(batch=1, crop=32, log_every=1, checkpoint_every=1)
    train_vae(tmp_path, VaeTrainConfig(steps=1, latents=1, warmup=0, **small), finish=False)
    assert not time_trained(*state())
    train_vae(tmp_path, VaeTrainConfig(steps=2, latents=2, warmup=0, first_step=1, **small), finish=False)
    vae, opt = state()
    assert time_trained(vae, opt)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    train_vae(tmp_path, VaeTrainConfig(steps=2, latents=2, warmup=0, first_step=2, decoder_only=True, **small),
              finish=False)  # a later stage starting here: nothing to train, and nothing reset
    assert all(torch.equal(before[k], v) for k, v in state()[0].state_dict().items())


def test_latent_jitter_is_correlated_noise_in_latent_std_units():
    from training.train_vae import jitter_sequence, teacher_clip

    e = jitter_sequence((64, 4, 6, 4, 4), 0.35, 0.7, torch.Generator().manual_seed(0))
    assert abs(float(e.std()) - 0.35) < 0.02
    lag1 = torch.corrcoef(torch.stack([e[:, :, :-1].flatten(), e[:, :, 1:].flatten()]))[0, 1]
    assert abs(float(lag1) - 0.7) < 0.05
    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO)
    video = to_video_tensor(teacher_clip(np.random.default_rng(2), 9, (32, 32), 100)[None])
    cfg = VaeTrainConfig(latent_jitter=0.35)
    with pytest.raises(ValueError, match="latent std"):
        vae_loss(vae, video, cfg, torch.Generator().manual_seed(0))
    std = torch.ones(VAE_DEMO.z_dim)
    plain = vae_loss(vae, video, VaeTrainConfig(), torch.Generator().manual_seed(0))
    jittered = vae_loss(vae, video, cfg, torch.Generator().manual_seed(0), latent_std=std)
    assert not torch.equal(plain["l1"], jittered["l1"])  # the decoder saw other latents
    torch.testing.assert_close(plain["kl"], jittered["kl"])  # the encoder's statistics did not change


def test_fast_motion_clips_change_expression_inside_a_latent_and_leave_old_clips_alone():
    from avatar.drawn.face import STATE_FIELDS, FaceState, Identity, render
    from training.train_vae import _training_clip, clip_states, random_state, teacher_clip

    # without waypoints the clip is the old two-state one, frame for frame
    rng = np.random.default_rng(5)
    idt = Identity.from_seed(int(rng.integers(100)))
    a, b = random_state(rng).as_array(), random_state(rng).as_array()
    old = [render(idt, FaceState.from_array((1 - i / 8) * a + i / 8 * b), (32, 32))[0] for i in range(9)]
    np.testing.assert_array_equal(teacher_clip(np.random.default_rng(5), 9, (32, 32), 100), np.stack(old))
    plain, fast = (clip_states(np.random.default_rng(5), 17, w) for w in (None, (2, 3)))
    pose = [STATE_FIELDS.index(f) for f in ("dx", "dy", "roll", "scale")]
    expression = [k for k in range(len(STATE_FIELDS)) if k not in pose]
    np.testing.assert_array_equal(fast[:, pose], plain[:, pose])  # the head still moves slowly
    step = lambda s: np.abs(np.diff(s[:, expression], axis=0)).mean()  # noqa: E731
    assert step(fast) > 4 * step(plain)  # a new expression every 2-3 frames vs one move over 16
    assert np.abs(fast[:5, expression] - fast[0, expression]).max() > 0.3  # inside one latent's frames
    # the share of fast clips is drawn per clip, and a share of 0 draws nothing (old runs replay exactly)
    # (no crop at this size, no colour swap: the clip itself)
    cfg = VaeTrainConfig(size=(32, 32), identities=100, colour_swap=0.0)
    np.testing.assert_array_equal(_training_clip(np.random.default_rng(7), 5, cfg)[0],
                                  teacher_clip(np.random.default_rng(7), 5, (32, 32), 100))


def test_vae_curriculum_runs_each_stage_once_in_order_and_resumes_mid_way(tmp_path, monkeypatch):
    import training.train_vae as tv
    from training.demo import DemoPlan, train_vae_curriculum

    calls = []

    def fake_train(out, cfg, stop_after=None, finish=True):  # steps to the stage's end, or halfway if "stopped"
        step = cfg.steps if stop_after is None else (cfg.first_step + cfg.steps) // 2
        torch.save({"step": step}, out / "vae_train.pt")
        calls.append((cfg.first_step, cfg.steps, cfg.decoder_only, cfg.fast_motion, finish))
        if finish and step == cfg.steps:
            (out / "vae.safetensors").write_bytes(b"")
            return out / "vae.safetensors"
        return out / "vae_train.pt"

    monkeypatch.setattr(tv, "train_vae", fake_train)
    plan = DemoPlan(out=tmp_path)
    assert train_vae_curriculum(plan)
    assert [c[:2] for c in calls] == [(0, 6000), (6000, 7600), (7600, 8600), (8600, 9200), (9200, 9800), (9800, 10400),
                                     (10400, 11000)]
    assert [c[2] for c in calls] == [False, False, True, True, True, True, True]  # the latent space is fixed at 7600
    assert [c[3] for c in calls[3:]] == [0.5, 0.75, 1.0, 1.0] and [c[4] for c in calls] == [False] * 6 + [True]
    # resumed from the middle of the motion rounds: only what is left runs
    calls.clear()
    (tmp_path / "vae.safetensors").unlink()
    torch.save({"step": 9200}, tmp_path / "vae_train.pt")
    assert train_vae_curriculum(plan)
    assert [c[:2] for c in calls] == [(9200, 9800), (9800, 10400), (10400, 11000)]
    # a stage stopped by the budget stops the curriculum (resumable), nothing is saved
    calls.clear()
    (tmp_path / "vae.safetensors").unlink()
    torch.save({"step": 9200}, tmp_path / "vae_train.pt")
    assert not train_vae_curriculum(plan, left=lambda: 1.0)
    assert len(calls) == 1 and not (tmp_path / "vae.safetensors").exists()


def test_an_encoder_stage_starts_from_a_saved_vae_and_trains_only_the_encoder(tmp_path):
    from models.config import VAE_TINY
    from models.vae_loading import load_vae, save_vae
    from training.train_vae import train_vae

    torch.manual_seed(0)
    start = save_vae(WanVAE(VAE_DEMO), tmp_path / "start.safetensors")
    small = dict(batch=1, crop=32, latents=2, warmup=0, log_every=1, checkpoint_every=1)
    cfg = VaeTrainConfig(steps=7, first_step=5, encoder_only=True, lr=1e-2, **small)
    train_vae(tmp_path / "run", cfg, finish=False, init=start)
    ckpt = torch.load(tmp_path / "run" / "vae_train.pt", weights_only=True)
    assert ckpt["step"] == 7  # two steps, counted from the stage's first
    init = load_vae(start).state_dict()
    moved = {k for k, v in ckpt["vae"].items() if not torch.equal(v, init[k])}
    assert moved and all(k.startswith(("encoder.", "conv1.")) for k in moved)
    # the encoder learns the decoder's input exactly: no posterior sample, whatever the noise draws
    video = to_video_tensor(np.random.default_rng(1).integers(0, 255, (1, 5, 32, 32, 3), dtype=np.uint8))
    a, b = (vae_loss(load_vae(start), video, cfg, torch.Generator().manual_seed(s))["loss"] for s in (1, 2))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="not shaped like"):
        train_vae(tmp_path / "other", cfg, vae_cfg=VAE_TINY, finish=False, init=start)
    with pytest.raises(ValueError, match="exclude each other"):
        train_vae(tmp_path / "both", VaeTrainConfig(encoder_only=True, decoder_only=True), init=start)


def test_a_widened_encoder_encodes_as_the_narrow_one_and_decodes_with_its_decoder(tmp_path):
    from models.vae_loading import load_vae, save_vae
    from training.train_vae import encode_stats, teacher_clip
    from training.widen import FACTOR, widen_encoder

    torch.manual_seed(0)
    vae = WanVAE(VAE_DEMO).eval()
    with torch.no_grad():  # trained-like weights everywhere, the attention's output projection included
        for p in vae.parameters():
            p.copy_(p + 0.05 * torch.randn_like(p))
    video = to_video_tensor(teacher_clip(np.random.default_rng(3), 9, (32, 32), 100)[None])
    wide = widen_encoder(vae).eval()
    assert wide.cfg.encoder_dim == FACTOR * VAE_DEMO.dim and wide.cfg.dim == VAE_DEMO.dim
    assert wide.encoder.conv1.weight.shape[0] == FACTOR * vae.encoder.conv1.weight.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(encode_stats(wide, video)[0], encode_stats(vae, video)[0], atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(wide.decoder.state_dict().items(),
                                                           vae.decoder.state_dict().items()))
    # saved and read back as what it is: the decoder's width and the encoder's own
    back = load_vae(save_vae(wide, tmp_path / "wide.safetensors"))
    assert (back.cfg.dim, back.cfg.encoder_dim) == (VAE_DEMO.dim, FACTOR * VAE_DEMO.dim)
    from models.vae_loading import infer_config

    inferred = infer_config(wide.state_dict())
    assert (inferred.dim, inferred.encoder_dim) == (VAE_DEMO.dim, FACTOR * VAE_DEMO.dim)
    assert infer_config(vae.state_dict()).encoder_dim is None
    # noise tells the copies apart and changes the encoding only a little
    noisy = widen_encoder(vae, noise=1e-3, generator=torch.Generator().manual_seed(0)).eval()
    w = noisy.encoder.conv1.weight
    assert not torch.equal(w[: w.shape[0] // 2], w[w.shape[0] // 2:])
    with torch.no_grad():
        torch.testing.assert_close(encode_stats(noisy, video)[0], encode_stats(vae, video)[0], atol=0.05, rtol=0.05)


def test_an_encoder_stage_widens_a_narrower_init_and_refuses_other_widths(tmp_path):
    from models.vae_loading import save_vae
    from training.train_vae import train_vae

    torch.manual_seed(0)
    start = save_vae(WanVAE(VAE_DEMO), tmp_path / "start.safetensors")
    cfg = VaeTrainConfig(steps=4, first_step=3, encoder_only=True, batch=1, crop=32, latents=2, warmup=0)
    train_vae(tmp_path / "wide", cfg, vae_cfg=VAE_DEMO.replace(encoder_dim=16), finish=False, init=start)
    ckpt = torch.load(tmp_path / "wide" / "vae_train.pt", weights_only=True)
    assert ckpt["vae"]["encoder.conv1.weight"].shape[0] == 16 and ckpt["vae"]["decoder.conv1.weight"].shape[0] == 32
    with pytest.raises(ValueError, match="neither be used nor widened"):
        train_vae(tmp_path / "odd", cfg, vae_cfg=VAE_DEMO.replace(encoder_dim=12), finish=False, init=start)
