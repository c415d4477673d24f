"""Stages 2 and 3 of the demo model: the base DiT, then the audio path (LoRA + adapters).

Training sequences have the geometry of a live session once its window is full: latent 0 is the
reference (clean, t = 0, mask channel 0, also injected through the reference embedding), followed by
`window_latents` latents of the clip in blocks of `block_latents`, under the block-causal mask. Each
block gets its own noise level (diffusion forcing); with probability `clean_context` the blocks before
a randomly chosen target block are nearly clean (σ <= `context_sigma`), which is what the live KV cache
holds, so teacher forcing on clean context and a little context noise are both covered. Noise levels,
noising and the velocity target come from the shared sampler (`models.sampling`).

Stage "base": everything but the audio-side modules, no audio. Stage "audio": OmniAvatar-style, the base
frozen; trained are a peft LoRA on q,k,v,o,ffn.0,ffn.2 and the Audio Pack, the per-layer audio
projections, the face-aware audio adapters and the audio emotion module. Stage "emotion": the audio
stage's model frozen but for the emotion module, trained on more blocks without clean context (the
first block of a stream has only the neutral reference to go on: its expression must come from the AEM).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from audio.align import group_by_latent
from audio.features.mel import MEL_SILENCE
from models.attention import block_causal_frame_mask
from models.config import DEMO, DiTConfig
from models.dit import WanDiT
from models.lora import inject_lora, lora_state_dict
from models.sampling import add_noise, shift_sigmas, sigma_to_timestep, velocity_target, x0_from_velocity
from models.vae import WanVAE
from training.checkpoint import append_log, load_checkpoint, save_checkpoint
from training.latents import LatentClip, LatentStore
from training.schedule import warmup_cosine
from training.train_vae import decode_raw

log = logging.getLogger(__name__)

EMOTION_MODULES = ("emotion_embedding.", "emotion_adapters.")
AUDIO_MODULES = ("audio_proj.", "audio_cond_projs.", "face_audio_embedding.", "face_adapters.", *EMOTION_MODULES)


@dataclass(frozen=True)
class DiTTrainConfig:
    stage: str = "base"  # "base" | "audio" | "emotion" (the AEM alone, on the finished audio stage)
    name: str | None = None  # the run's folder, checkpoint and log name (dit_<name>); None: the stage's
    finetune: bool = False  # stage "audio": continue a finished model (init, its LoRA kept apart) instead of
    # starting the audio side afresh on a base
    reference_from_emotion: bool = False  # the reference (latent 0) is the clip's emotion image, not the
    # neutral portrait, as EngineOptions.emotion_as_reference gives it at inference. On the demo model a
    # 500-step audio-side fine-tune (lr 1e-4) with it gained nothing (emotion effect 0.26 / 0.95 vs 0.34 /
    # 1.02 without): its VAE, not the DiT, holds the effect back
    steps: int = 3000
    batch: int = 4
    window_latents: int = 9  # after the reference: 3 blocks of 3
    block_latents: int = 3
    lr: float = 3e-4
    shift: float = 5.0  # noise levels drawn like the shifted sampler spends its steps (mostly high)
    clean_context: float = 0.6
    context_sigma: float = 0.03  # noise level ceiling of "clean" context blocks (CausalOptions.context_sigma's unit)
    audio_dropout: float = 0.1  # zero audio sometimes (keeps an unconditional branch for CFG)
    pair_fraction: float = 0.25  # stage audio: batches of two-face scenes for the FAA
    mouth_weight: float = 4.0  # loss weight of latent cells where a mouth moves (~2-3% of a frame): lip
    # motion is a few pixels, and an unweighted loss spends the model on backgrounds and hair
    emotion_dropout: float = 0.0  # rows whose emotion image is the neutral reference itself: the branch
    # that emotion guidance (Guidance.emotion) subtracts at inference
    audio_augment: float = 0.0  # share of windows that hear an augmented copy of their clip's audio (another
    # pitch, noise, a room, a phone line, another level: training/augment.py) where the store has one
    emotion_weight: float = 1.0  # loss weight where the emotion image differs from the reference (mouth
    # corners, brows): a smile moves a few latent cells, which an unweighted loss barely notices. Both,
    # in a 600-step AEM-only stage on the demo model (dropout 0.15, weight 6): no gain either
    decoded_weight: float = 0.0  # weight of a loss through the frozen decoder (train_dit(decoder=)): the
    # predicted clean latents' mouth crop decoded against the data latents' (L1 on frames and on frame
    # differences), which reaches the motion inside a latent's 4 frames that latent MSE spends little on
    decoded_crop: int = 8  # latent cells per side of that crop, centred on the mouth (single-face windows)
    temporal_weight: float = 0.0  # weight of the squared error of the predicted clean latents' change from
    # one latent to the next (mouth- and emotion-weighted like the velocity loss): a redrawn still region
    # is an error here even where it is small in each latent on its own
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 200


# ---- batches ------------------------------------------------------------------------------------
class Batches:
    """Random training windows from a latent store (held in memory: the demo set is small)."""

    def __init__(self, store: LatentStore, split: str = "train", augmented=None, lead_frames: int = 0) -> None:
        """`augmented`: a training.augment.AugmentedFeatures with variants of some clips' features.
        `lead_frames`: the model hears each frame's audio this many frames early (DiTConfig.audio_lead_frames)."""
        keys = store.keys()
        clips = [replace(c, features=lead(c.features, lead_frames)) for c in map(store.read, keys)]
        # clip index -> (variants, faces, frames, D) augmented features, where there are any
        self.variants = {id(c): lead(augmented.read(k), lead_frames) for k, c in zip(keys, clips)
                         if augmented is not None and k in augmented}
        self.singles = [c for c in clips if c.split == split and c.faces == 1]
        self.pairs = [c for c in clips if c.split == split and c.faces == 2]
        if not self.singles:
            raise ValueError(f"no single-face {split} clips in {store.root}")

    def sample(self, rng: np.random.Generator, cfg: DiTTrainConfig, pairs: bool) -> dict[str, torch.Tensor]:
        pool = self.pairs if pairs and self.pairs else self.singles
        n = cfg.window_latents
        items = []
        for _ in range(cfg.batch):
            c = pool[int(rng.integers(len(pool)))]
            s = int(rng.integers(1, c.num_latents - n + 1))  # window start (latent index >= 1)
            features = c.features
            if cfg.audio_augment and id(c) in self.variants and rng.random() < cfg.audio_augment:
                variants = self.variants[id(c)]
                features = variants[int(rng.integers(len(variants)))]
            items.append(self._window(c, s, n, features))
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}

    @staticmethod
    def _window(c: LatentClip, s: int, n: int, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`features`: (faces, frames, D) to hear instead of the clip's own (an augmented copy)."""
        features = c.features if features is None else features
        lat = np.concatenate([c.latents[:, :1], c.latents[:, s:s + n]], axis=1).astype(np.float32)
        v0 = 4 * s - 3
        per_face = np.stack([group_by_latent(features[f, v0:v0 + 4 * n], s) for f in range(c.faces)])
        silent = np.zeros_like(per_face[:, :1])  # the reference frame hears nothing
        per_face = np.concatenate([silent, per_face], axis=1)  # (F, 1 + n, 4, D)
        mouth = c.mouth if c.mouth is not None else np.zeros(c.latents.shape[2:], np.float32)
        return {"latents": lat, "emotion": c.emotion.astype(np.float32), "face_audio": per_face,
                "audio": per_face.mean(0), "masks": c.masks, "motion": np.float32(c.motion),
                "mouth": mouth.astype(np.float32)}


def lead(features: np.ndarray, frames: int) -> np.ndarray:
    """(..., T, D) mel features moved `frames` earlier, the end filled with silence's: what
    MelFeatures(lead_samples=640 * frames) computes from the same audio."""
    if not frames:
        return features
    silence = np.full((*features.shape[:-2], frames, features.shape[-1]), MEL_SILENCE, features.dtype)
    return np.concatenate([features[..., frames:, :], silence], axis=-2)


def frame_sigmas(b: int, frames: int, cfg: DiTTrainConfig, g: torch.Generator) -> torch.Tensor:
    """(B, 1 + window) noise levels: 0 for the reference, one level per block, clean context often."""
    blocks = cfg.window_latents // cfg.block_latents
    sig = shift_sigmas(torch.rand(b, blocks, generator=g), cfg.shift)
    target = torch.randint(0, blocks, (b,), generator=g)
    clean = torch.rand(b, generator=g) < cfg.clean_context
    low = torch.rand(b, blocks, generator=g) * cfg.context_sigma
    before = torch.arange(blocks)[None] < target[:, None]
    sig = torch.where(before & clean[:, None], low, sig)
    per_frame = sig.repeat_interleave(cfg.block_latents, dim=1)
    return torch.cat([torch.zeros(b, 1), per_frame], dim=1)


def dit_loss(dit: WanDiT, batch: dict[str, torch.Tensor], cfg: DiTTrainConfig, g: torch.Generator,
             decoder: WanVAE | None = None) -> torch.Tensor:
    """The velocity loss, mouth- and emotion-weighted; plus `cfg.temporal_weight` x the same weighting of the
    predicted clean latents' error from one latent to the next, and `cfg.decoded_weight` x `decoded_loss`
    where a decoder is given and the window has one face."""
    x0 = batch["latents"]  # (B, 16, 1 + n, h, w)
    if cfg.reference_from_emotion:
        x0 = torch.cat([batch["emotion"].to(x0.dtype), x0[:, :, 1:]], dim=2)
    b, _, f = x0.shape[:3]
    sigma = frame_sigmas(b, f, cfg, g)  # (B, F)
    eps = torch.randn(x0.shape, generator=g)
    xt = add_noise(x0, eps, sigma)
    ref = x0[:, :, :1]
    mask = torch.ones_like(x0[:, :1])
    mask[:, :, 0] = 0
    y = torch.cat([ref.expand_as(x0), mask], dim=1)
    kw = {}
    if cfg.stage != "base":
        keep = (torch.rand(b, generator=g) >= cfg.audio_dropout).float()
        emotion = batch["emotion"]  # (B, 16, 1, h, w)
        if cfg.emotion_dropout:
            neutral = torch.rand(b, generator=g) < cfg.emotion_dropout
            emotion = torch.where(neutral[:, None, None, None, None], ref, emotion)
        kw = dict(audio=batch["audio"] * keep[:, None, None, None],
                  face_audio=batch["face_audio"] * keep[:, None, None, None, None],
                  face_mask=batch["masks"], emotion=emotion)
    frame_mask = block_causal_frame_mask(f, cfg.block_latents, first_block_frames=1)
    v = dit(xt, sigma_to_timestep(sigma), None, y=y, reference=ref, motion=batch["motion"], frame_mask=frame_mask,
            **kw)
    target = velocity_target(x0, eps)
    err = (v[:, :, 1:] - target[:, :, 1:]).pow(2)  # (B, 16, n, h, w)
    weight = 1 + (cfg.mouth_weight - 1) * batch["mouth"]  # (B, h, w); all 1: the mean
    if cfg.emotion_weight != 1.0 and cfg.stage != "base":
        weight = weight + (cfg.emotion_weight - 1) * emotion_change_map(kw["emotion"], ref)  # dropped rows: 0
    weight = weight[:, None, None]  # (B, 1, 1, h, w)
    loss = (err * weight).sum() / (weight.sum() * err.shape[1] * err.shape[2])
    decoded = decoder is not None and cfg.decoded_weight and batch["face_audio"].shape[1] == 1
    if not (cfg.temporal_weight or decoded):
        return loss
    x0_pred = x0_from_velocity(xt, v, sigma)[:, :, 1:]  # (B, 16, n, h, w)
    if cfg.temporal_weight:
        change = (x0_pred.diff(dim=2) - x0[:, :, 1:].diff(dim=2)).pow(2)  # (B, 16, n - 1, h, w)
        loss = loss + cfg.temporal_weight * (change * weight).sum() / (
            weight.sum() * change.shape[1] * change.shape[2])
    if decoded:
        loss = loss + cfg.decoded_weight * decoded_loss(decoder, x0_pred, x0[:, :, 1:], batch["mouth"],
                                                        cfg.decoded_crop)
    return loss


def mouth_crops(z: torch.Tensor, mouth: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, F, h, w) -> (B, C, F, size, size): each row's square of latent cells centred on its mouth map's
    weighted centre (kept inside the frame)."""
    b, _, _, h, w = z.shape
    if size > min(h, w):
        raise ValueError(f"a {size}-cell mouth crop does not fit a {h}x{w} latent")
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    crops = []
    for i in range(b):
        m = mouth[i].float()
        total = float(m.sum())
        cy = float((m.sum(1) * ys).sum()) / total if total > 0 else (h - 1) / 2
        cx = float((m.sum(0) * xs).sum()) / total if total > 0 else (w - 1) / 2
        y0 = min(max(round(cy - (size - 1) / 2), 0), h - size)
        x0 = min(max(round(cx - (size - 1) / 2), 0), w - size)
        crops.append(z[i, :, :, y0:y0 + size, x0:x0 + size])
    return torch.stack(crops)


def decoded_loss(decoder: WanVAE, pred: torch.Tensor, target: torch.Tensor, mouth: torch.Tensor,
                 size: int) -> torch.Tensor:
    """L1 between the frozen decoder's frames of the predicted and the data latents (normalised, (B, 16, n,
    h, w)) on the mouth crop, plus L1 between their frame differences (the motion a latent's frames make)."""
    with torch.no_grad():  # (B, 3, 1 + 4(n-1), 8 size, 8 size)
        want, _ = decode_raw(decoder, decoder.unnormalise(mouth_crops(target, mouth, size)))
    got, _ = decode_raw(decoder, decoder.unnormalise(mouth_crops(pred, mouth, size)))
    return (got - want).abs().mean() + (got.diff(dim=2) - want.diff(dim=2)).abs().mean()


EMOTION_CHANGE_SCALE = 0.1  # demo latents: a happy or sad image differs from the neutral one by up to
# 0.14-0.36 (channel mean), a surprised one by up to 0.8-1.0, in 0-30 of 256 cells; a neutral one by 0


def emotion_change_map(emotion: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B, h, w) in [0, 1]: where the emotion image's latent differs from the neutral reference's (channel
    mean of the absolute difference over EMOTION_CHANGE_SCALE, clipped at 1); 0 for a neutral image."""
    d = (emotion.float() - reference.float()).abs().mean(dim=1)[:, 0]  # (B, h, w)
    return (d / EMOTION_CHANGE_SCALE).clamp(max=1.0)


# ---- the loop -----------------------------------------------------------------------------------
def trainable_parameters(dit: WanDiT, stage: str) -> list[torch.nn.Parameter]:
    params = []
    for name, p in dit.named_parameters():
        audio_side = name.startswith(AUDIO_MODULES) or ".lora_" in name
        p.requires_grad_(name.startswith(EMOTION_MODULES) if stage == "emotion" else
                         audio_side if stage == "audio" else not audio_side)
        if p.requires_grad:
            params.append(p)
    return params


def build_model(cfg: DiTTrainConfig, dit_cfg: DiTConfig, init: Path | None) -> WanDiT:
    torch.manual_seed(cfg.seed)
    if cfg.stage == "emotion" or cfg.finetune:  # a finished model, its LoRA kept apart (saved apart again)
        from models.loading import load_dit

        if init is None:
            what = f"a {cfg.stage} fine-tune" if cfg.finetune else f"the {cfg.stage} stage"
            raise ValueError(f"{what} starts from a trained audio stage: pass init")
        return load_dit(init, config=dit_cfg, merge_lora=False)[0]
    dit = WanDiT(dit_cfg)
    if init is not None:
        from models.loading import load_dit

        base, _ = load_dit(init, config=dit_cfg.replace(lora_rank=0), merge_lora=False)
        state = base.state_dict()
        if cfg.stage == "audio":  # the audio side starts from its own init, whatever the base file holds
            state = {k: v for k, v in state.items() if not k.startswith(AUDIO_MODULES)}
        unused = dit.load_state_dict(state, strict=False).unexpected_keys
        if unused:  # e.g. a finished model's folder: its LoRA file wraps q, k, v... as `.base_layer.`, which a
            # fresh model would silently skip, training those layers from random weights
            raise ValueError(f"{init}: {len(unused)} weights have no place in a fresh {cfg.stage} model (e.g. "
                             f"{unused[0]}); for a model with a LoRA file pass a folder with its model.safetensors "
                             "alone, or fine-tune it (finetune=True)")
    # The base never hears audio: its per-layer audio projections stay at zero, so the audio path is a
    # no-op (a base used on its own is not disturbed by untrained adapters, and the audio stage starts
    # from exactly the base's output); a resumed checkpoint overwrites this
    for proj in getattr(dit, "audio_cond_projs", ()):
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
    if cfg.stage == "audio":
        inject_lora(dit, dit_cfg.lora_rank, dit_cfg.lora_alpha, dit_cfg.lora_targets)
    return dit


def train_dit(store: LatentStore, out_dir: Path, cfg: DiTTrainConfig = DiTTrainConfig(),
              dit_cfg: DiTConfig = DEMO, init: Path | None = None, stop_after: float | None = None,
              augmented=None, decoder: WanVAE | None = None) -> Path | None:
    """Train (or resume) one stage. Returns the saved model folder when the stage's steps are done.
    `augmented`: augmented feature variants (training.augment.AugmentedFeatures) for `cfg.audio_augment`;
    `decoder`: the VAE whose frozen decoder `cfg.decoded_weight` trains through."""
    if cfg.decoded_weight and decoder is None:
        raise ValueError("decoded_weight needs the decoder: pass decoder=")
    if decoder is not None:
        decoder.requires_grad_(False).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dit = build_model(cfg, dit_cfg, init)
    params = trainable_parameters(dit, cfg.stage)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    run = f"dit_{cfg.name or cfg.stage}"
    ckpt = out / f"{run}_train.pt"
    step = load_checkpoint(ckpt, dit=dit, opt=opt)
    if step:
        log.info("resuming DiT %s training at step %d", run, step)
    data = Batches(store, augmented=augmented, lead_frames=dit.cfg.audio_lead_frames)
    t0 = time.monotonic()
    dit.train()
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step, 7])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        pairs = cfg.stage != "base" and rng.random() < cfg.pair_fraction
        lr = warmup_cosine(cfg.lr, step, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = dit_loss(dit, data.sample(rng, cfg, pairs), cfg, g, decoder)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"stage": run, "step": step, "lr": round(lr, 7), "loss": round(float(loss.detach()), 5),
                   "pairs": bool(pairs), "elapsed_s": round(time.monotonic() - t0, 1)}
            append_log(out / "dit_log.jsonl", rec)
            log.info("%s", rec)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or (
                stop_after is not None and time.monotonic() - t0 > stop_after):
            save_checkpoint(ckpt, step, dit=dit, opt=opt)
            if stop_after is not None and time.monotonic() - t0 > stop_after:
                return None
    from models.loading import save_dit

    dit.eval()
    folder = save_dit(dit, out / run)
    (folder / "train_config.json").write_text(json.dumps({**cfg.__dict__, "lora": bool(lora_state_dict(dit))}))
    return folder
