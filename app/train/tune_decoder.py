"""Stage 1b of the demo model: fine-tune the VAE decoder on its own steady state, encoder frozen.

The decoder's causal caches remember about 20-30 latent frames (every causal conv keeps two frames of
its input, and there are ~10 of them at latent rate). Trained on short clips from zero caches, it
reconstructs the first ~10 latents of a stream at 20.8 dB and then drifts to a fixed point 2 dB
lower, which is where a live stream spends its life. Here each batch row is a long stream that goes on
across training steps: every step decodes the stream's next `chunk` latents from the caches the
previous step left (detached), so the loss covers stream positions 0 .. `stream_latents` evenly at the
cost of a short clip. The encoder is frozen, so latents already encoded for the DiT stay valid and the
latent statistics in the VAE config stay true.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.train.train_vae import decode_raw, drift_check, encode_stats, random_crop, teacher_clip, to_video_tensor
from models.vae import WanVAE
from models.vae_loading import load_vae, save_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderTuneConfig:
    steps: int = 300
    batch: int = 4
    chunk: int = 5  # latents decoded (with gradients) per step and stream
    stream_latents: int = 40  # a stream restarts with a new clip after about this many latents
    crop: int = 64
    size: tuple[int, int] = (128, 128)
    lr: float = 1e-4
    edge_weight: float = 1.0
    identities: int = 100_000
    seed: int = 1
    log_every: int = 25


class _Streams:
    """`batch` long teacher streams, each with its frozen-encoder latents and the decoder's caches."""

    def __init__(self, vae: WanVAE, cfg: DecoderTuneConfig) -> None:
        self.vae, self.cfg = vae, cfg
        self.video: list[torch.Tensor] = [torch.empty(0)] * cfg.batch  # (3, T, h, w) in [-1, 1]
        self.latents: list[torch.Tensor] = [torch.empty(0)] * cfg.batch  # (z, 1 + K, h, w), raw
        self.caches: list[tuple[torch.Tensor, ...] | None] = [None] * cfg.batch
        self.length = [0] * cfg.batch  # latents in the stream's current clip
        self.pos = [0] * cfg.batch  # next latent to decode (pos == length: needs a new clip)

    @torch.no_grad()
    def _restart(self, i: int, rng: np.random.Generator) -> None:
        c, tf = self.cfg, self.vae.cfg.temporal_factor
        # lengths vary (0.5x .. 1.5x), so the streams drift out of step and a batch mixes positions
        self.length[i] = int(rng.integers(max(2, c.stream_latents // 2), c.stream_latents * 3 // 2 + 1))
        frames = 1 + tf * (self.length[i] - 1)
        clip = random_crop(teacher_clip(rng, frames, c.size, c.identities), c.crop, rng)
        video = to_video_tensor(clip[None])
        mu, _, _ = encode_stats(self.vae, video)
        self.video[i], self.latents[i] = video[0], mu[0]
        self.caches[i], self.pos[i] = None, 0

    def next_chunk(self, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per stream: (latents to decode (1, z, n, h, w), their target frames (1, 3, f, H, W))."""
        tf = self.vae.cfg.temporal_factor
        zs, targets = [], []
        for i in range(self.cfg.batch):
            if self.pos[i] >= self.length[i]:
                self._restart(i, rng)
            a, b = self.pos[i], min(self.pos[i] + self.cfg.chunk, self.length[i])
            f0 = 0 if a == 0 else 1 + tf * (a - 1)
            f1 = 1 + tf * (b - 1)
            zs.append(self.latents[i][None, :, a:b])
            targets.append(self.video[i][None, :, f0:f1])
            self.pos[i] = b
        return zs, targets


def tune_decoder(vae_path: Path, out: Path, cfg: DecoderTuneConfig = DecoderTuneConfig()) -> Path:
    """Fine-tune `vae_path`'s decoder; writes `out` (a VAE safetensors) and a log beside it."""
    torch.manual_seed(cfg.seed)
    vae = load_vae(vae_path)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = [*vae.conv2.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    streams = _Streams(vae.eval(), cfg)
    logf = Path(out).with_suffix(".log.jsonl").open("a")
    t0 = time.monotonic()
    rng = np.random.default_rng(cfg.seed)
    dx = lambda v: v[..., :, 1:] - v[..., :, :-1]  # noqa: E731
    dy = lambda v: v[..., 1:, :] - v[..., :-1, :]  # noqa: E731
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * (step - 1) / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        zs, targets = streams.next_chunk(rng)
        loss = torch.zeros(())
        for i, (z, target) in enumerate(zip(zs, targets, strict=True)):
            recon, caches = decode_raw(vae, z, streams.caches[i])
            streams.caches[i] = tuple(c.detach() for c in caches)
            loss = loss + ((recon - target).abs().mean() + cfg.edge_weight * (
                (dx(recon) - dx(target)).abs().mean() + (dy(recon) - dy(target)).abs().mean())) / cfg.batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"stage": "vae_decoder", "step": step, "lr": round(float(lr), 7), "loss": round(float(loss), 5),
                   "elapsed_s": round(time.monotonic() - t0, 1)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log.info("%s", rec)
    return save_vae(vae.eval(), out)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Fine-tune the demo VAE's decoder on long streams (encoder frozen).")
    p.add_argument("--vae", type=Path, default=Path("runs/demo/vae.safetensors"))
    p.add_argument("--out", type=Path, default=Path("runs/demo/vae_tuned.safetensors"))
    p.add_argument("--steps", type=int, default=DecoderTuneConfig.steps)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    before = drift_check(load_vae(a.vae).eval())
    path = tune_decoder(a.vae, a.out, DecoderTuneConfig(steps=a.steps))
    after = drift_check(load_vae(path).eval())
    print(json.dumps({"before": before, "after": after, "out": str(path)}))


if __name__ == "__main__":
    main()
