"""Decoder adaptation: the VAE decoder fine-tuned on the latents it decodes in use, the DiT's own.

The DiT trains on the encoder's latents of teacher clips, but what a stream decodes is what the DiT
draws: a few-step, guided estimate that is blurrier than the encoder's latents and opens the mouth less.
The decoder never saw such latents. Here it learns them: pairs of the finished DiT's latents, generated
through the live path (`AvatarEngine`: the preset's sampler, guidance, block size and noise) for
training clips (training identities and voices, the teacher's motion 0, no blinks, some with an emotion
reference), and the teacher's frames for the same identity and audio. The decoder (with `conv2`) is
trained on them streamed as a live session decodes them (`FrameDecoder.open_at`, then latent by latent);
the encoder, whose latents the DiT was trained on, stays as it is, so the DiT's data does not move.

On the demo model (held-out faces and voices, and the held-out speech engine) this is where most of
its identity PSNR comes from; see the model card for the measured figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from avatar.decoder import OPENING_LATENTS, SETTLED_OPENING_LATENTS
from models.vae import WanVAE
from training.checkpoint import append_log, load_checkpoint, save_checkpoint
from training.dataset import ClipStore, make_clip
from training.latents import KeyedFiles, LatentStore
from training.schedule import warmup_cosine
from training.train_vae import decode_raw, to_video_tensor

log = logging.getLogger(__name__)

MOUTH_MARGIN = 2  # pixels around a mouth box that its loss weight also covers (the lips' edge)


@dataclass(frozen=True)
class AdaptConfig:
    steps: int = 350
    lr: float = 1e-4
    batch: int = 2
    window_latents: int = 4  # latents decoded with gradients per sample (16 frames)
    warm_latents: int = 3  # decoded before them without: the decoder's causal caches reach ~2 latents back
    mouth_weight: float = 4.0  # loss weight of mouth-box pixels (mean weight 1)
    motion_weight: float = 2.0  # L1 on frame differences: a latent's change drawn as the teacher's is
    boundary_weight: float = 4.0  # extra weight of the differences into a latent's first frame (the
    # step from the latent before, where a stream's seams are): there every new DiT latent redraws detail
    boundary_where: str = "all"  # "still": only pixels the teacher keeps still at that step (its change
    # under `still_tolerance`): a moving mouth's step into a latent is motion, and weighing it there too
    # teaches the decoder to draw the change later (lag 1)
    still_tolerance: float = 2 / 127.5  # largest teacher change counted still, in [-1, 1] units (2 of 255)
    emotions: tuple[str, ...] = ("neutral", "neutral", "neutral", "happy", "sad")  # the pairs' emotions, in turn
    seed: int = 0
    name: str = "vae_adapt"  # the run's stage name in its log (one per round of a plan)
    log_every: int = 10
    checkpoint_every: int = 50


# ---- pairs ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DecodePair:
    latents: np.ndarray  # (16, K, h, w) float32, normalised: the stream's latents 1..K as it decoded them
    frames: np.ndarray  # (N, H, W, 3) uint8: the teacher's frames 1..N (N <= 4K)
    mouths: np.ndarray  # (N, 4) the teacher's mouth boxes (x0, y0, x1, y1) on those frames
    generated: np.ndarray | None  # (N, H, W, 3) uint8: what the session showed for those frames
    emotion: str
    reference: np.ndarray | None = None  # (16, 1, h, w): the reference latent the stream settled on before
    # latent 1 (`FrameDecoder.settle`); None in pairs from streams that opened cold
    moving: bool = False  # the stream opened moving (speech at once): latent 1 decoded from the settled
    # reference, not held first (`AvatarSession._speaks_at_once`)


class PairStore(KeyedFiles):
    """One compressed .npz per training clip, written atomically."""

    def write(self, key: str, p: DecodePair) -> None:
        self._write_atomic(key, lambda tmp: np.savez_compressed(
            tmp, latents=p.latents, frames=p.frames, mouths=p.mouths, generated=p.generated,
            emotion=np.array(p.emotion), moving=np.array(p.moving),
            **({} if p.reference is None else {"reference": p.reference})))

    def read(self, key: str, generated: bool = True) -> DecodePair:
        """`generated=False` leaves the shown frames unread (None): training never uses them."""
        with np.load(self.path(key)) as z:
            return DecodePair(latents=z["latents"], frames=z["frames"], mouths=z["mouths"],
                              generated=z["generated"] if generated else None, emotion=str(z["emotion"]),
                              reference=z["reference"] if "reference" in z.files else None,
                              moving=bool(z["moving"]) if "moving" in z.files else False)


class RecordingDecoder:
    """A session's decoder backend (the torch VAE or its ONNX export) that keeps every latent a stream
    decodes, in order."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.provider = getattr(backend, "provider", "torch")
        self.latents: list[torch.Tensor] = []

    def init_state(self, batch: int, latent_h: int, latent_w: int):
        return self.backend.init_state(batch, latent_h, latent_w)

    def decode_step(self, state, z: torch.Tensor):
        self.latents.append(z.detach().float().cpu().clone())
        return self.backend.decode_step(state, z)


def generate_pairs(models, clips: ClipStore, latents: LatentStore, out: PairStore, limit: int,
                   cfg: AdaptConfig = AdaptConfig(), decoder: str = "torch") -> int:
    """Pairs for up to `limit` single-face training clips of `latents` (resumable: clips already in `out`
    count and are skipped). `models`: the finished model's bundle, generating with its preset's options;
    `decoder`: "torch" or "onnx" (faster on CPU; the latents are the same). Returns how many pairs `out`
    holds for those clips."""
    from avatar.engine import AvatarEngine, preset_options
    from training.evaluate import avatar_conditions, run_session

    keys = [k for k in latents.keys() if not k.startswith("listen_")]
    backend = models.vae
    if decoder == "onnx":
        from models.onnx_vae import OnnxVaeDecoder

        backend = OnnxVaeDecoder.from_vae(models.vae, *(x // models.vae.cfg.spatial_factor for x in models.frame_hw))
    elif decoder != "torch":
        raise ValueError(f"decoder must be 'torch' or 'onnx', not {decoder!r}")
    recorder = RecordingDecoder(backend)
    bundle = replace(models, decoder_backend=recorder)
    opts = preset_options(models.dit.cfg.name, decoder="torch", max_sessions=1)
    held = 0
    with AvatarEngine(bundle, opts).start() as engine:
        for i, key in enumerate(keys):
            if held >= limit:
                break
            lc = latents.read(key)
            if lc.split != "train" or lc.features.shape[0] != 1:  # single-face training clips
                continue
            held += 1
            if key in out:
                continue
            clip = clips.read(key)
            emotion = cfg.emotions[i % len(cfg.emotions)]
            teacher = make_clip(clip.audio[0], clip.identity_seeds[0], motion=0.0, emotion=emotion,
                                size=models.frame_hw, seed=cfg.seed, blinks=False)
            cond = avatar_conditions(engine, teacher, None if emotion == "neutral" else emotion)
            recorder.latents.clear()
            shown, _ = asyncio.run(run_session(engine, cond, teacher.audio))
            out.write(key, pair_from_stream(recorder.latents, teacher, shown, emotion, cond.reference))
            log.info("decode pair %d/%d: %s (%s)", held, limit, key, emotion)
    return held


def _held(decoded: list[torch.Tensor], i: int) -> int:
    """How many latents from `decoded[i]` on equal it."""
    n = 0
    while i + n < len(decoded) and torch.equal(decoded[i + n], decoded[i]):
        n += 1
    return n


def pair_from_stream(decoded: list[torch.Tensor], teacher, shown: np.ndarray, emotion: str,
                     reference: torch.Tensor | None = None) -> DecodePair:
    """A stream settles on the reference latent (OPENING_LATENTS decodes, none where the engine had settled
    on it for an earlier stream), opens on latent 1 held (SETTLED_OPENING_LATENTS decodes; none where it
    opened moving), then decodes latents 1, 2, ... once each."""
    start = OPENING_LATENTS if decoded and _held(decoded, 0) == OPENING_LATENTS else 0  # the settling
    held = _held(decoded, start) if start < len(decoded) else 0
    if held not in (1, SETTLED_OPENING_LATENTS + 1):
        raise RuntimeError(f"expected a stream opened on its first latent, then its latents; got {len(decoded)}")
    moving = held == 1
    start += 0 if moving else SETTLED_OPENING_LATENTS
    z = torch.cat(decoded[start:], dim=2)[0].numpy()  # (16, K, h, w)
    n = min(4 * z.shape[1], teacher.num_frames - 1, len(shown) - 1)
    return DecodePair(latents=z.astype(np.float32), frames=teacher.frames[1:1 + n],
                      mouths=teacher.mouth_boxes[0, 1:1 + n].astype(np.int32), generated=shown[1:1 + n],
                      emotion=emotion, reference=None if reference is None else
                      reference.detach().float().cpu()[0, :, :1].numpy(), moving=moving)


# ---- the loss -------------------------------------------------------------------------------------
def sample_window(pair: DecodePair, rng: np.random.Generator, cfg: AdaptConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """A training window: (warm latents (16, W, h, w), window latents (16, L, h, w), teacher frames
    (4L, H, W, 3), mouth masks (4L, H, W)). Latent s covers frames 4s-3..4s (pair index 4s-4..4s-1); the
    warm latents are those before it, as far as `warm_latents`, led by the stream's opening where the
    window starts near latent 1: the reference held OPENING_LATENTS times, then latent 1
    SETTLED_OPENING_LATENTS times (none where the stream opened moving), as a session's stream settles
    and opens (`FrameDecoder.settle`, `open_at`); latent 1 held OPENING_LATENTS times for pairs without a
    reference (a cold opening)."""
    n_lat = pair.frames.shape[0] // 4  # latents whose 4 frames the pair holds
    L = cfg.window_latents
    if n_lat < L:
        raise ValueError(f"a pair of {pair.frames.shape[0]} frames is shorter than a {L}-latent window")
    s = int(rng.integers(1, n_lat - L + 2))  # first latent of the window, 1-based
    z = torch.from_numpy(pair.latents)
    opening = []
    if s - cfg.warm_latents < 1 and pair.reference is not None:
        held = 0 if pair.moving else SETTLED_OPENING_LATENTS
        opening = [torch.from_numpy(pair.reference)] * OPENING_LATENTS + [z[:, :1]] * held
    elif s - cfg.warm_latents < 1:
        opening = [z[:, :1]] * OPENING_LATENTS
    warm = torch.cat(opening + [z[:, max(1, s - cfg.warm_latents) - 1:s - 1]], dim=1)
    frames = pair.frames[4 * (s - 1):4 * (s - 1 + L)]
    masks = np.zeros(frames.shape[:3], bool)
    m = MOUTH_MARGIN
    for j, (x0, y0, x1, y1) in enumerate(pair.mouths[4 * (s - 1):4 * (s - 1 + L)]):
        masks[j, max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m] = True
    return warm, z[:, s - 1:s - 1 + L], frames, masks


def adaptation_loss(vae: WanVAE, warm: torch.Tensor, window: torch.Tensor, frames: np.ndarray,
                    masks: np.ndarray, cfg: AdaptConfig) -> dict[str, torch.Tensor]:
    """The decoder's error on a window it decodes after `warm` (no gradients there): mouth-weighted
    L1 + MSE on frames and `motion_weight` x L1 on frame differences (a boundary step the teacher does not
    make costs as much as a missing change inside a latent)."""
    with torch.no_grad():
        _, caches = decode_raw(vae, vae.unnormalise(warm[None]))
    recon, _ = decode_raw(vae, vae.unnormalise(window[None]), caches)  # (1, 3, 4L, H, W)
    video = to_video_tensor(frames[None])
    w = 1 + (cfg.mouth_weight - 1) * torch.from_numpy(masks)[None, None].float()
    w = w / w.mean()
    l1 = ((recon - video).abs() * w).mean()
    mse = ((recon - video).pow(2) * w).mean()
    dt = lambda v: v[:, :, 1:] - v[:, :, :-1]  # noqa: E731
    into = torch.zeros_like(w[:, :, 1:], dtype=torch.bool)
    into[:, :, 3::4] = True  # differences into a latent's first frame (window frame 4j)
    if cfg.boundary_where == "still":
        into &= dt(video).abs().amax(dim=1, keepdim=True) <= cfg.still_tolerance
    elif cfg.boundary_where != "all":
        raise ValueError(f"boundary_where must be 'all' or 'still', not {cfg.boundary_where!r}")
    dw = w[:, :, 1:] * torch.where(into, cfg.boundary_weight, 1.0)  # a difference weighs as its later frame
    motion = ((dt(recon) - dt(video)).abs() * dw).mean()
    return {"loss": l1 + mse + cfg.motion_weight * motion, "l1": l1, "mse": mse, "motion": motion}


def decoder_parameters(vae: WanVAE) -> list[torch.nn.Parameter]:
    """conv2 and the decoder train; everything else (the encoder, conv1) is frozen."""
    trained = {id(p) for m in (vae.conv2, vae.decoder) for p in m.parameters()}
    for p in vae.parameters():
        p.requires_grad_(id(p) in trained)
    return [p for p in vae.parameters() if p.requires_grad]


# ---- the loop (seeded, resumable) -----------------------------------------------------------------
def adapt_decoder(vae_path: Path, pairs: PairStore, out_dir: Path, cfg: AdaptConfig = AdaptConfig(),
                  stop_after: float | None = None, dest: Path | None = None) -> Path | None:
    """Fine-tune the decoder of the VAE at `vae_path` on `pairs`; resumes from `out_dir`'s checkpoint.
    Returns the adapted VAE (`dest`, default `out_dir/vae_adapted.safetensors`) once `cfg.steps` are done,
    None when stopped by `stop_after` seconds (resumable)."""
    from models.vae_loading import load_vae, save_vae

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = Path(dest) if dest is not None else out / "vae_adapted.safetensors"
    vae = load_vae(vae_path)
    params = decoder_parameters(vae)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = out / "adapt_train.pt"
    step = load_checkpoint(ckpt, vae=vae, opt=opt)
    if step:
        log.info("resuming decoder adaptation at step %d", step)
    data = [pairs.read(k, generated=False) for k in pairs.keys()]
    data = [p for p in data if p.frames.shape[0] >= 4 * cfg.window_latents]
    if not data:
        raise ValueError(f"{pairs.root}: no pair holds a {cfg.window_latents}-latent window")
    t0 = time.monotonic()
    vae.train()
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step, 11])
        lr = warmup_cosine(cfg.lr, step, cfg.steps, warmup=50)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(cfg.batch):
            parts = adaptation_loss(vae, *sample_window(data[int(rng.integers(len(data)))], rng, cfg), cfg)
            (parts["loss"] / cfg.batch).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"stage": cfg.name, "step": step, "lr": round(lr, 7), "loss": round(sums["loss"], 5),
                   **{k: round(v, 5) for k, v in sums.items() if k != "loss"},
                   "elapsed_s": round(time.monotonic() - t0, 1)}
            append_log(out / "adapt_log.jsonl", rec)
            log.info("%s", rec)
        stopping = stop_after is not None and time.monotonic() - t0 > stop_after
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
            save_checkpoint(ckpt, step, vae=vae, opt=opt)
            if stopping and step < cfg.steps:
                return None
    vae.eval()
    tmp = dest.with_name(dest.name + ".tmp.safetensors")
    save_vae(vae, tmp)
    tmp.replace(dest)
    return dest


def adapt_in_rounds(vae_path: Path, pairs: PairStore, out_dir: Path, rounds: list[AdaptConfig],
                    stop_after: float | None = None, dest: Path | None = None) -> Path | None:
    """`adapt_decoder` once per config, each round (`out_dir/adapt_K`, a fresh optimiser and schedule) on the
    decoder the round before made; rounds already finished are skipped. Returns `dest` (default
    `out_dir/vae_adapted.safetensors`, a copy of the last round's VAE), None when stopped (resumable)."""
    import shutil

    out = Path(out_dir)
    dest = Path(dest) if dest is not None else out / "vae_adapted.safetensors"
    t0 = time.monotonic()
    start = Path(vae_path)
    for k, cfg in enumerate(rounds, 1):
        folder = out / f"adapt_{k}"
        made = folder / "vae_adapted.safetensors"
        if not made.exists():
            left = None if stop_after is None else max(0.0, stop_after - (time.monotonic() - t0))
            if adapt_decoder(start, pairs, folder, cfg, stop_after=left, dest=made) is None:
                return None
        start = made
    tmp = dest.with_name(dest.name + ".tmp.safetensors")
    shutil.copy2(start, tmp)
    tmp.replace(dest)
    return dest
