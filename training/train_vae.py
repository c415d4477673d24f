"""Stage 1 of the demo model: train the causal VAE (DEMO preset) on teacher video.

Clips of 1 + 4k frames are encoded chunk by chunk ([1, 4, 4, ...], causal caches carried), a latent
is sampled, and decoded latent by latent, exactly the streaming path the engine runs, so the trained
decoder is the one that streams. Loss: L1 + MSE (what PSNR measures) + image-gradient L1 (keeps the
drawn edges sharp) + a small KL. After training, the per-channel latent mean/std are measured on teacher
frames and written into the VAE config, so the DiT sees unit-scale latents. A curriculum runs this in
stages (`finish=False`, `first_step`): single frames first, then streamed clips.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avatar.drawn.face import STATE_FIELDS, FaceState, Identity, render
from models.config import VAE_DEMO, VAEConfig
from models.vae import CausalConv3d, Resample, WanVAE
from models.vae_loading import save_vae
from training.checkpoint import append_log, load_checkpoint, save_checkpoint
from training.schedule import warmup_cosine

log = logging.getLogger(__name__)
WIDEN_NOISE = 1e-3  # relative noise on a widened encoder's copies (training.widen): tells them apart


@dataclass(frozen=True)
class VaeTrainConfig:
    steps: int = 3000
    batch: int = 4
    latents: int = 5  # clips of 1 + 4 (latents - 1) frames: long enough that the causal caches learn to stay
    # stable (a VAE trained on 2-latent clips decodes latent 1 at 18 dB and latents >= 3 at 10-11 dB)
    warmup: int = 6  # up to this many extra latents run first without gradients, so the trained latents
    # also start from caches deep into a stream (a 5-latent-only VAE still drifts past latent 5)
    size: tuple[int, int] = (128, 128)  # rendered frames
    crop: int = 64  # trained on random crops: the VAE is convolutional, 4x cheaper per step than full frames
    lr: float = 3e-4
    first_step: int = 0  # where this stage of a curriculum begins: its warm-up and cosine start here
    kl_weight: float = 1e-6
    colour_swap: float = 0.5  # share of clips whose RGB channels are permuted: teacher pixels are mostly
    # skin and hair, and without it saturated shirts and backgrounds decode grey ((200, 40, 200) -> (175, 177, 179))
    mse_weight: float = 1.0  # on [-1, 1] pixels; a small AE on teacher faces gained ~1 dB at 2000 steps with it
    edge_weight: float = 1.0
    motion_weight: float = 0.0  # L1 between the recon's and the clip's frame-to-frame differences: a decoder
    # that draws each latent's 4 frames alike and jumps into the next (stair steps: seams) pays for it here
    decoder_only: bool = False  # train only conv2 + decoder: the latent space (and a DiT trained on it) stays
    encoder_only: bool = False  # train only encoder + conv1 against the decoder as it is, on the posterior
    # mean (no sampling): a latent optimised for the demo decoder draws a held-out face at 32-34 dB where
    # its encoder's gives 27 (the amortisation gap), so the decoder, and what decoding costs, stay
    latent_jitter: float = 0.0  # rms (in normalised latent units) of noise added to the decoded latents: a
    # generated latent is off by ~0.35 and re-rolls its detail each latent; a decoder taught on exact latents
    # turns that into flicker, one taught on jittered latents learns to draw the clean clip from them anyway
    jitter_corr: float = 0.7  # latent-to-latent correlation of that noise (AR(1)), as measured on the demo DiT
    fast_motion: float = 0.0  # share of clips whose expression changes at speech speed (`teacher_clip`
    # waypoints): on two-state clips a frame moves ~1/40 of a state, so what a decoder draws between two
    # latents costs it almost nothing, and it draws a latent's change as one step at its first frame
    waypoints: tuple[int, int] = (2, 6)  # frames between the fast clips' random expression states
    mouth_weight: float = 1.0  # loss weight (l1, mse, motion) inside each frame's mouth box: the mouth is
    # ~3 % of a frame, and what lip sync, emotion (mouth corners) and a still silent face are measured on
    seed: int = 0
    identities: int = 100_000  # identity seeds drawn from [0, identities); held-out seeds live above it
    log_every: int = 25
    checkpoint_every: int = 200
    stat_clips: int = 64  # teacher clips measured for the latent mean/std at the end


# ---- teacher video for the VAE ------------------------------------------------------------------
def random_state(rng: np.random.Generator) -> FaceState:
    return FaceState(mouth_open=float(rng.uniform(0, 1) ** 1.5), mouth_width=float(rng.uniform(0.1, 0.9)),
                     smile=float(rng.uniform(-1, 1)), blink=float(rng.choice([0, 0, 0, rng.uniform(0, 1)])),
                     brow_raise=float(rng.uniform(0, 1) ** 2), dx=float(rng.normal(0, 0.04)),
                     dy=float(rng.normal(0, 0.03)), roll=float(rng.normal(0, 5)), scale=float(rng.uniform(0.9, 1.1)))


POSE_FIELDS = ("dx", "dy", "roll", "scale")


def teacher_clip(rng: np.random.Generator, frames: int, size: tuple[int, int], identities: int,
                 first_seed: int = 0, waypoints: tuple[int, int] | None = None) -> np.ndarray:
    """(frames, H, W, 3) uint8: one identity (seed in [first_seed, first_seed + identities)) moving
    smoothly between two random states (see `clip_states` for `waypoints`)."""
    return teacher_clip_and_mouths(rng, frames, size, identities, first_seed, waypoints)[0]


def teacher_clip_and_mouths(rng: np.random.Generator, frames: int, size: tuple[int, int], identities: int,
                            first_seed: int = 0, waypoints: tuple[int, int] | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """`teacher_clip` and its (frames, H, W) bool mouth masks (each frame's mouth box)."""
    idt = Identity.from_seed(first_seed + int(rng.integers(identities)))
    drawn = [render(idt, FaceState.from_array(s), size) for s in clip_states(rng, frames, waypoints)]
    masks = np.zeros((frames, *size), bool)
    for mask, (_, info) in zip(masks, drawn):
        x0, y0, x1, y1 = info.mouth_box
        mask[y0:y1, x0:x1] = True
    return np.stack([frame for frame, _ in drawn]), masks


def clip_states(rng: np.random.Generator, frames: int, waypoints: tuple[int, int] | None = None) -> np.ndarray:
    """(frames, len(STATE_FIELDS)) face states moving linearly between two random states.

    waypoints (lo, hi): the expression (everything but the head pose) instead passes through a new
    random state every lo..hi frames, piecewise linearly: speech-speed change inside a latent's 4 frames,
    where on the two-state path an expression moves about 1/40 of its range per frame."""
    a, b = random_state(rng).as_array(), random_state(rng).as_array()
    states = np.stack([(1 - w) * a + w * b for w in (i / max(1, frames - 1) for i in range(frames))])
    if waypoints is not None:
        at, keys = [0], [a]
        while at[-1] < frames - 1:
            at.append(at[-1] + int(rng.integers(waypoints[0], waypoints[1] + 1)))
            keys.append(random_state(rng).as_array())
        path = np.stack(keys)
        for k, name in enumerate(STATE_FIELDS):
            if name not in POSE_FIELDS:
                states[:, k] = np.interp(np.arange(frames), at, path[:, k])
    return states


def _training_clip(rng: np.random.Generator, frames: int, cfg: VaeTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """A teacher clip and its mouth masks, cropped alike, colours maybe swapped: ((T, c, c, 3), (T, c, c))."""
    fast = cfg.fast_motion > 0 and rng.random() < cfg.fast_motion  # no extra draw when off: old runs replay
    clip, masks = teacher_clip_and_mouths(rng, frames, cfg.size, cfg.identities,
                                          waypoints=cfg.waypoints if fast else None)
    both = random_crop(np.concatenate([clip, masks[..., None].astype(np.uint8)], axis=-1), cfg.crop, rng)
    return swap_colours(both[..., :3], rng, cfg.colour_swap), both[..., 3].astype(bool)


def random_crop(clip: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """The same random crop (multiple-of-8 offsets) of every frame of a (T, H, W, C) clip."""
    h, w = clip.shape[1:3]
    if crop >= min(h, w):
        return clip
    y, x = (int(rng.integers(0, (n - crop) // 8 + 1)) * 8 for n in (h, w))
    return clip[:, y:y + crop, x:x + crop]


def swap_colours(clip: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """With probability p, the clip with its RGB channels in a random other order (a colour augmentation)."""
    if rng.random() >= p:
        return clip
    order = [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)][int(rng.integers(5))]
    return clip[..., order]


def to_video_tensor(clips: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]."""
    return torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()


# ---- the streaming forward, differentiable -------------------------------------------------------
Caches = tuple[torch.Tensor, ...]


def encode_stats(vae: WanVAE, video: torch.Tensor, caches: Caches | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, Caches]:
    """(B, 3, 1+4k, H, W) -> mean, log-variance (B, z, 1+k, h, w) and the encoder's causal caches after it.

    With `caches` given, the video continues a stream: 4k frames, no leading single frame."""
    b, _, t, h, w = video.shape
    fresh = caches is None
    if fresh:
        caches = tuple(torch.zeros(s, dtype=video.dtype) for s in vae.encoder.cache_shapes(b, h, w))
    step = vae.cfg.temporal_factor
    spans = ([(0, 1)] + [(s, s + step) for s in range(1, t, step)]) if fresh else \
        [(s, s + step) for s in range(0, t, step)]
    stats = []
    for i, (a, e) in enumerate(spans):
        feat, caches = vae.encoder(video[:, :, a:e], caches, fresh and i == 0)
        stats.append(vae.conv1(feat))
    mu, logvar = torch.cat(stats, dim=2).chunk(2, dim=1)
    return mu, logvar.clamp(-30, 20), caches


def decode_raw(vae: WanVAE, z: torch.Tensor, caches: Caches | None = None) -> tuple[torch.Tensor, Caches]:
    """Un-normalised latents (B, z, T, h, w) -> video (B, 3, 1+4(T-1), H, W) (4T frames when continuing
    a stream from `caches`), latent by latent, and the decoder's caches after it."""
    b, _, t, h, w = z.shape
    fresh = caches is None
    if fresh:
        caches = tuple(torch.zeros(s, dtype=z.dtype) for s in vae.decoder.cache_shapes(b, h, w))
    x = vae.conv2(z)
    out = []
    for i in range(t):
        frames, caches = vae.decoder(x[:, :, i:i + 1], caches, fresh and i == 0)
        out.append(frames)
    return torch.cat(out, dim=2), caches


def jitter_sequence(shape: tuple[int, ...], rms: float, corr: float, noise: torch.Generator) -> torch.Tensor:
    """AR(1) noise along dim 2 (latents) of `shape`, unit-free rms `rms`, lag-1 correlation `corr`."""
    e = torch.randn(shape, generator=noise)
    for k in range(1, shape[2]):
        e[:, :, k] = corr * e[:, :, k - 1] + (1 - corr ** 2) ** 0.5 * e[:, :, k]
    return rms * e


def vae_loss(vae: WanVAE, video: torch.Tensor, cfg: VaeTrainConfig, noise: torch.Generator,
             warm_frames: int = 0, latent_std: torch.Tensor | None = None,
             mouths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss on `video[:, :, warm_frames:]`; the first `warm_frames` (0 or 1 + 4k) only fill the caches.

    latent_std: (z,) the encoder's per-channel latent std, the unit of `cfg.latent_jitter`.
    mouths: (B, T, H, W) bool, where `cfg.mouth_weight` applies (l1, mse and motion; mean weight 1)."""
    enc = dec = None
    jitter = None
    if cfg.latent_jitter > 0:
        if latent_std is None:
            raise ValueError("latent_jitter needs the latent std (its unit)")
        b, _, t, h, w = video.shape
        latents = 1 + (t - 1) // vae.cfg.temporal_factor
        jitter = jitter_sequence((b, vae.cfg.z_dim, latents, h // vae.cfg.spatial_factor,
                                  w // vae.cfg.spatial_factor), cfg.latent_jitter, cfg.jitter_corr, noise)
        jitter = jitter * latent_std.view(1, -1, 1, 1, 1)
    if warm_frames:
        with torch.no_grad():
            mu, logvar, enc = encode_stats(vae, video[:, :, :warm_frames])
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=noise)
            _, dec = decode_raw(vae, z if jitter is None else z + jitter[:, :, :z.shape[2]])
        video = video[:, :, warm_frames:]
    weight = None
    if mouths is not None and cfg.mouth_weight != 1.0:
        weight = 1.0 + (cfg.mouth_weight - 1.0) * mouths[:, None, warm_frames:].float()  # (B, 1, T, H, W)
        weight = weight / weight.mean()
    with torch.set_grad_enabled(not cfg.decoder_only and torch.is_grad_enabled()):
        mu, logvar, _ = encode_stats(vae, video, enc)
    z = mu if cfg.encoder_only else mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=noise)
    if jitter is not None:
        z = z + jitter[:, :, jitter.shape[2] - z.shape[2]:]
    recon, _ = decode_raw(vae, z, dec)
    weighted = (lambda e: e.mean()) if weight is None else (lambda e: (e * weight).mean())  # noqa: E731
    l1 = weighted((recon - video).abs())
    mse = weighted((recon - video).pow(2))
    dx = lambda v: v[..., :, 1:] - v[..., :, :-1]  # noqa: E731
    dy = lambda v: v[..., 1:, :] - v[..., :-1, :]  # noqa: E731
    edge = (dx(recon) - dx(video)).abs().mean() + (dy(recon) - dy(video)).abs().mean()
    dt = lambda v: v[:, :, 1:] - v[:, :, :-1]  # noqa: E731
    motion = recon.new_zeros(())
    if video.shape[2] > 1:  # a frame difference weighs as its later frame
        err = (dt(recon) - dt(video)).abs()
        motion = err.mean() if weight is None else (err * weight[:, :, 1:]).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
    total = l1 + cfg.mse_weight * mse + cfg.edge_weight * edge + cfg.motion_weight * motion + cfg.kl_weight * kl
    return {"loss": total, "l1": l1, "mse": mse, "edge": edge, "motion": motion, "kl": kl}


# ---- training loop (seeded, resumable) ----------------------------------------------------------
def stage_lr(cfg: VaeTrainConfig, step: int) -> float:
    """The shared warm-up + cosine schedule over this stage's steps [first_step, steps)."""
    return warmup_cosine(cfg.lr, step, cfg.steps, cfg.first_step)


def fan_in_init(vae: WanVAE) -> WanVAE:
    """Kaiming-normal conv weights and zero biases, for a VAE trained from scratch.

    Under PyTorch's default init (uniform weights of gain 1/sqrt(3), random biases) the biases swamp the
    picture after a dozen narrow convs, so a fresh dim-8 VAE starts out nearly blind to its input: taught
    flat colours for 200 steps it decoded them all as one grey, where this init learned them. Zero-initialised
    weights (the attention's output projection: each block starts as the identity) stay zero."""
    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
            if bool(m.weight.any()):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return vae


@torch.no_grad()
def inflate_to_video(vae: WanVAE) -> WanVAE:
    """Make a VAE trained on single frames stream every frame the way it coded the first one.

    Single frames only ever reach the current-frame tap of each causal 3x3x3 conv (the cache is zero)
    and never the time convs of the 3d resamplers, which are still at their init. Here the past taps go
    to zero, the encoder's time convs keep the later frame of each pair and the decoder's repeat each
    frame twice: a still clip then streams at the single-frame quality and the clip stage starts from
    there instead of from noise (its Adam moments for these weights are still zero: no gradient reached
    them)."""
    for m in vae.modules():
        if isinstance(m, Resample) and m.temporal:
            w = m.time_conv.weight  # (C_out, C_in, 3, 1, 1)
            w.zero_()
            m.time_conv.bias.zero_()
            eye = torch.eye(w.shape[1], dtype=w.dtype)
            if m.upsample:  # 2C outputs = two frames, both the input frame
                w[:w.shape[1], :, -1, 0, 0] = eye
                w[w.shape[1]:, :, -1, 0, 0] = eye
            else:  # stride 2 over [previous, this chunk]: the later frame of each pair
                w[:, :, -1, 0, 0] = eye
        elif isinstance(m, CausalConv3d) and m.stride[0] == 1:
            m.weight[:, :, :-1] = 0  # only the current frame
    return vae


def time_trained(vae: WanVAE, opt: torch.optim.Optimizer) -> bool:
    """Whether the time convs of the 3d resamplers ever got a gradient (Adam keeps state only for those
    that did): false after single-frame training, where inflating them is the right start."""
    return any(len(opt.state.get(m.time_conv.weight, {})) > 0
               for m in vae.modules() if isinstance(m, Resample) and m.temporal)


def train_vae(out_dir: Path, cfg: VaeTrainConfig = VaeTrainConfig(), vae_cfg: VAEConfig = VAE_DEMO,
              stop_after: float | None = None, finish: bool = True, init: Path | None = None) -> Path:
    """Train (or resume) into out_dir; returns the saved VAE (stats measured) when `steps` are done.

    With `finish=False` (a first stage of a curriculum) it returns the checkpoint instead, and the next
    stage resumes from it with its own config. `init`: a saved VAE (`save_vae`) this stage starts from
    at `cfg.first_step` when out_dir has no checkpoint yet."""
    if cfg.encoder_only and cfg.decoder_only:
        raise ValueError("encoder_only and decoder_only exclude each other: one of the two must train")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = fan_in_init(WanVAE(vae_cfg.replace(latents_mean=(0.0,) * vae_cfg.z_dim, latents_std=(1.0,) * vae_cfg.z_dim)))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = 0
    ckpt = out / "vae_train.pt"
    if ckpt.exists():
        step = load_checkpoint(ckpt, vae=vae, opt=opt)
        log.info("resuming VAE training at step %d", step)
        if cfg.latents > 1 and 0 < cfg.first_step == step and not time_trained(vae, opt) and init is None:
            # a clip stage right after a single-frame one (a stage begun from a trained `init` has its time
            # convs trained, though its fresh optimiser never stepped them)
            inflate_to_video(vae)
            log.info("inflated the single-frame VAE to stream frames as it codes the first")
    elif init is not None:
        from models.vae_loading import load_vae

        from training.widen import FACTOR, widen_encoder

        start = load_vae(init)
        shape = ("dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample", "in_channels")
        if any(getattr(start.cfg, f) != getattr(vae_cfg, f) for f in shape):
            raise ValueError(f"{init}: its VAE is not shaped like {vae_cfg.name} ({', '.join(shape)})")
        if start.cfg.encoder_base * FACTOR == vae_cfg.encoder_base:  # a wider encoder grows from the narrow one
            start = widen_encoder(start, noise=WIDEN_NOISE, generator=torch.Generator().manual_seed(cfg.seed))
            log.info("widened %s's encoder to %d", init, vae_cfg.encoder_base)
        elif start.cfg.encoder_base != vae_cfg.encoder_base:
            raise ValueError(f"{init}: encoder width {start.cfg.encoder_base} can neither be used nor widened "
                             f"({FACTOR}x) to {vae_cfg.encoder_base}")
        vae.load_state_dict(start.state_dict())
        step = cfg.first_step
        log.info("starting from %s at step %d", init, step)
    if cfg.decoder_only:  # the encoder and its latent statistics stay as they are; Adam skips gradless weights
        for module in (vae.encoder, vae.conv1):
            module.requires_grad_(False)
    if cfg.encoder_only:
        for module in (vae.decoder, vae.conv2):
            module.requires_grad_(False)
    latent_std = None
    if cfg.latent_jitter > 0:  # the jitter's unit: the encoder's per-channel spread (fixed when decoder_only)
        latent_std = torch.tensor(latent_statistics(vae.eval(), cfg, cfg.stat_clips // 4)[1])
        vae.train()
    frames = 1 + vae_cfg.temporal_factor * (cfg.latents - 1)
    t_start = time.monotonic()
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step])  # the batch depends only on (seed, step): resumable
        noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        warm = int(rng.integers(0, cfg.warmup + 1))
        warm_frames = 1 + vae_cfg.temporal_factor * (warm - 1) if warm else 0
        length = warm_frames + vae_cfg.temporal_factor * cfg.latents if warm else frames  # a continuation
        # is whole 4-frame chunks
        clips, mouths = zip(*(_training_clip(rng, length, cfg) for _ in range(cfg.batch)))
        lr = stage_lr(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        losses = vae_loss(vae, to_video_tensor(np.stack(clips)), cfg, noise, warm_frames, latent_std,
                          torch.from_numpy(np.stack(mouths)))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"stage": "vae", "step": step, "lr": lr, "elapsed_s": round(time.monotonic() - t_start, 1),
                   **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
            append_log(out / "vae_log.jsonl", rec)
            log.info("%s", rec)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, step, vae=vae, opt=opt)
        if stop_after is not None and time.monotonic() - t_start > stop_after:
            save_checkpoint(ckpt, step, vae=vae, opt=opt)
            return ckpt
    if not finish:
        save_checkpoint(ckpt, step, vae=vae, opt=opt)
        return ckpt
    vae = vae.eval()
    mean, std = latent_statistics(vae, cfg, cfg.stat_clips)
    final = WanVAE(vae.cfg.replace(latents_mean=tuple(mean), latents_std=tuple(std)))
    final.load_state_dict(vae.state_dict())
    return save_vae(final, out / "vae.safetensors")


@torch.no_grad()
def latent_statistics(vae: WanVAE, cfg: VaeTrainConfig, clips: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the encoder means over fresh teacher clips."""
    rng = np.random.default_rng([cfg.seed, 10**9])
    frames = 1 + vae.cfg.temporal_factor * (cfg.latents - 1)
    mus = []
    for _ in range(max(1, clips // cfg.batch)):
        video = to_video_tensor(np.stack([teacher_clip(rng, frames, cfg.size, cfg.identities)
                                          for _ in range(cfg.batch)]))
        mus.append(encode_stats(vae, video)[0])
    mu = torch.cat(mus).transpose(0, 1).flatten(1)  # (z, N)
    return [round(float(v), 5) for v in mu.mean(1)], [round(float(v), 5) for v in mu.std(1).clamp_min(1e-3)]


@torch.no_grad()
def psnr_by_latent(vae: WanVAE, clip: np.ndarray) -> list[float]:
    """Reconstruction PSNR (dB) of a (1+4k, H, W, 3) uint8 clip, one value per latent frame (its 1 or 4
    video frames), streamed the engine's way. Flat means the causal caches hold; falling means drift."""
    video = to_video_tensor(clip[None])
    mu, _, _ = encode_stats(vae, video)
    recon, _ = decode_raw(vae, mu)
    err = (recon.clamp(-1, 1) - video).pow(2).mean(dim=(0, 1, 3, 4)) / 4.0  # per frame, on a [0, 1] scale
    step = vae.cfg.temporal_factor
    spans = [(0, 1)] + [(s, s + step) for s in range(1, video.shape[2], step)]
    return [round(float(10 * torch.log10(1 / err[a:e].mean().clamp_min(1e-10))), 2) for a, e in spans]


def drift_check(vae: WanVAE, latents: int = 40, seed: int = 1_000_003, size: tuple[int, int] = (128, 128)
                ) -> dict[str, object]:
    """PSNR by latent index on a long still clip of a held-out identity (seed above the training range):
    every frame is the same picture, so any change along the stream is the causal caches drifting."""
    rng = np.random.default_rng(seed)
    frame, _ = render(Identity.from_seed(seed), random_state(rng), size)
    clip = np.repeat(frame[None], 1 + vae.cfg.temporal_factor * (latents - 1), axis=0)
    per = psnr_by_latent(vae, clip)
    third = max(1, len(per) // 3)
    return {"psnr_by_latent": per, "first_third_db": round(float(np.mean(per[1:third + 1])), 2),
            "last_third_db": round(float(np.mean(per[-third:])), 2)}


def moving_check(vae: WanVAE, clips: int = 3, latents: int = 11, seed: int = 12345,
                 size: tuple[int, int] = (128, 128)) -> dict[str, float]:
    """Mean streamed PSNR (dB) of the latents after the first, on clips of held-out identities moving
    between two random states: what the still-clip drift check cannot see (motion)."""
    rng = np.random.default_rng(seed)
    per = [np.mean(psnr_by_latent(vae, teacher_clip(rng, 1 + 4 * (latents - 1), size, 1000, 1_000_000))[1:])
           for _ in range(clips)]
    return {"moving_db": round(float(np.mean(per)), 2)}


@torch.no_grad()
def seam_check(vae: WanVAE, clips: int = 3, latents: int = 11, seed: int = 12345,
               size: tuple[int, int] = (128, 128)) -> dict[str, float]:
    """Seam ratio (|frame diff| where a latent's frames start / elsewhere) of streamed reconstructions of
    held-out moving clips, next to the teacher clips' own: what a decoder adds at latent boundaries."""
    from training.evaluate import seam_ratio

    rng = np.random.default_rng(seed)
    starts = list(range(1, 1 + 4 * (latents - 1), vae.cfg.temporal_factor))
    ours, teacher = [], []
    for _ in range(clips):
        clip = teacher_clip(rng, 1 + 4 * (latents - 1), size, 1000, 1_000_000)
        mu, _, _ = encode_stats(vae, to_video_tensor(clip[None]))
        recon = ((decode_raw(vae, mu)[0][0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0).numpy()
        ours.append(seam_ratio(recon, starts))
        teacher.append(seam_ratio(clip, starts))
    return {"seam_ratio": round(float(np.mean(ours)), 3), "teacher_seam_ratio": round(float(np.mean(teacher)), 3)}


FLAT_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (40, 200, 200), (200, 40, 200), (200, 200, 40),
                (128, 128, 128), (230, 190, 160), (60, 40, 30))


@torch.no_grad()
def flat_colour_check(vae: WanVAE, size: int = 64) -> dict[str, object]:
    """How far flat frames of saturated (and skin, and grey) colours decode from themselves, 0-255 per
    channel at the frame's centre. Teacher pixels are mostly skin and hair: a VAE can score a fair PSNR on
    faces and still decode a green shirt grey."""
    frames = np.stack([np.full((1, size, size, 3), c, np.uint8) for c in FLAT_COLOURS])
    mu, _, _ = encode_stats(vae, to_video_tensor(frames))
    recon, _ = decode_raw(vae, mu)
    q = size // 4
    got = ((recon[:, :, 0, q:-q, q:-q].clamp(-1, 1) + 1) * 127.5).mean(dim=(2, 3))  # (N, 3)
    err = (got - torch.tensor(FLAT_COLOURS, dtype=got.dtype)).abs().mean(dim=1)
    return {"flat_colour_mae": round(float(err.mean()), 1),
            "decoded": {str(c): [round(float(v)) for v in g] for c, g in zip(FLAT_COLOURS, got)}}


@torch.no_grad()
def mouth_check(vae: WanVAE, faces: int = 4, openings: int = 9, seed: int = 1_000_003,
                size: tuple[int, int] = (128, 128)) -> dict[str, float]:
    """Whether lip shapes survive the VAE: the mouth-opening probe on decoded single frames vs on the
    teacher frames, held-out identities, openings swept from closed to wide. A VAE that blurs mouths
    away caps any lip sync the DiT can learn."""
    from training.probes import mouth_opening

    teacher, decoded = [], []
    for k in range(faces):
        idt = Identity.from_seed(seed + 2 * k)
        frames, boxes = [], []
        for m in np.linspace(0.0, 1.0, openings):
            frame, info = render(idt, FaceState(mouth_open=float(m)), size)
            frames.append(frame[None])
            boxes.append(info.mouth_box)
        mu, _, _ = encode_stats(vae, to_video_tensor(np.stack(frames)))
        recon, _ = decode_raw(vae, mu)
        recon = ((recon[:, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        teacher += [mouth_opening(f[0], b) for f, b in zip(frames, boxes)]
        decoded += [mouth_opening(f, b) for f, b in zip(recon, boxes)]
    r = float(np.corrcoef(teacher, decoded)[0, 1]) if np.std(decoded) > 0 else 0.0
    return {"mouth_probe_r": round(r, 3),
            "mouth_probe_gain": round(float(np.polyfit(teacher, decoded, 1)[0]), 3)}  # 1 = full opening kept


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train the demo VAE (resumable).")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=VaeTrainConfig.steps)
    p.add_argument("--latents", type=int, default=VaeTrainConfig.latents, help="latents per training clip")
    p.add_argument("--warmup", type=int, default=VaeTrainConfig.warmup,
                   help="up to this many latents stream first without gradients (steady-state caches)")
    p.add_argument("--batch", type=int, default=VaeTrainConfig.batch)
    p.add_argument("--lr", type=float, default=VaeTrainConfig.lr)
    p.add_argument("--first-step", type=int, default=0, help="where this stage's learning-rate schedule starts")
    p.add_argument("--mse-weight", type=float, default=VaeTrainConfig.mse_weight)
    p.add_argument("--motion-weight", type=float, default=VaeTrainConfig.motion_weight,
                   help="weight of the frame-difference loss (smooth motion across latent boundaries)")
    p.add_argument("--decoder-only", action="store_true", help="train only the decoder: the latent space stays")
    p.add_argument("--encoder-only", action="store_true",
                   help="train only the encoder, on the posterior mean, against the decoder as it is")
    p.add_argument("--encoder-dim", type=int, default=None,
                   help="the encoder's base width (default: the decoder's); twice --init's widens its encoder")
    p.add_argument("--init", type=Path, default=None, metavar="VAE",
                   help="a saved VAE to start from (at --first-step) when --out has no checkpoint")
    p.add_argument("--latent-jitter", type=float, default=VaeTrainConfig.latent_jitter,
                   help="rms of AR(1) noise on the decoded latents, in latent std units (a DiT's error)")
    p.add_argument("--fast-motion", type=float, default=VaeTrainConfig.fast_motion,
                   help="share of clips whose expression moves at speech speed (waypoints every 2-6 frames)")
    p.add_argument("--mouth-weight", type=float, default=VaeTrainConfig.mouth_weight,
                   help="loss weight inside the mouth box (l1, mse, motion), relative to the rest of the frame")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check", type=Path, default=None, metavar="VAE",
                   help="print PSNR by latent index of a saved VAE (or training checkpoint) and exit")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    if a.check is not None:
        if a.check.suffix == ".pt":
            vae = WanVAE(VAE_DEMO.replace(encoder_dim=a.encoder_dim))
            vae.load_state_dict(torch.load(a.check, weights_only=True)["vae"])
        else:
            from models.vae_loading import load_vae

            vae = load_vae(a.check)
        vae = vae.eval()
        print(json.dumps({**drift_check(vae), **moving_check(vae), **seam_check(vae), **flat_colour_check(vae),
                          **mouth_check(vae)}))
        return
    print(train_vae(a.out, VaeTrainConfig(steps=a.steps, latents=a.latents, warmup=a.warmup, batch=a.batch,
                                          lr=a.lr, first_step=a.first_step, mse_weight=a.mse_weight,
                                          motion_weight=a.motion_weight, decoder_only=a.decoder_only,
                                          encoder_only=a.encoder_only, latent_jitter=a.latent_jitter,
                                          fast_motion=a.fast_motion, mouth_weight=a.mouth_weight),
                    vae_cfg=VAE_DEMO.replace(encoder_dim=a.encoder_dim), init=a.init))


if __name__ == "__main__":
    main()
