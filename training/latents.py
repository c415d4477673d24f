"""Teacher clips -> what the DiT trains on: VAE latents, per-frame audio features, face masks.

The latent sequence of a clip starts with the reference image, as a live session does: video
[reference, frame 1, frame 2, ...] is encoded causally, so latent 0 is the reference latent and latent
j >= 1 covers video frames 4j-3 .. 4j. Audio features are per video frame (the mel front end the demo
model uses live), one row per face plus what a single microphone hears.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from audio.features.base import AudioFeatures
from avatar.faces import FaceBox, face_mask_for_grid, rasterise_box
from models.vae import WanVAE
from training.dataset import LISTENER_PREFIX, Clip, ClipStore

MASK_SCALE = 1.6  # face box enlargement for FAA masks; two-face scenes are also cut at the midline


@dataclass(frozen=True, eq=False)
class LatentClip:
    latents: np.ndarray  # (16, 1 + K, h, w) float16: latent 0 = the reference
    emotion: np.ndarray  # (16, 1, h, w) float16: the emotion reference image's latent
    features: np.ndarray  # (F, 1 + 4K, D) float32: per-face audio features per video frame
    masks: np.ndarray  # (F, h/2, w/2) float32: FAA masks on the DiT token grid
    motion: float
    emotions: tuple[str, ...]
    split: str = "train"
    mouth: np.ndarray | None = None  # (h, w) float32 in [0, 1]: where any mouth reaches, on the latent grid

    @property
    def num_latents(self) -> int:
        return self.latents.shape[1]

    @property
    def faces(self) -> int:
        return self.features.shape[0]


def face_token_masks(clip: Clip, grid_hw: tuple[int, int], scale: float = MASK_SCALE) -> np.ndarray:
    """(F, gh, gw) masks from the faces' boxes in the reference pose (first frame)."""
    h, w = clip.reference.shape[:2]
    masks = []
    for f in range(clip.num_faces):
        box = FaceBox(*(float(v) for v in clip.face_boxes[f, 0]))
        m = face_mask_for_grid(box, (h, w), grid_hw, scale=scale)
        if clip.num_faces == 2:  # two-face scenes: each face owns its half of the picture
            half = grid_hw[1] // 2
            if f == 0:
                m[:, half:] = 0
            else:
                m[:, :half] = 0
        masks.append(m)
    return np.stack(masks).astype(np.float32)


def mouth_latent_mask(clip: Clip, grid_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) float32: the share of each latent cell inside the box every mouth of the clip stays in
    (the union over faces and frames), for weighting the DiT loss where lip sync is decided."""
    h, w = clip.reference.shape[:2]
    pixels = np.zeros((h, w), np.float32)
    for b in clip.mouth_boxes:  # (T, 4) x0, y0, x1, y1 per face
        if len(b):
            box = FaceBox(float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))
            pixels = np.maximum(pixels, rasterise_box(box, (h, w)))
    return cv2.resize(pixels, (grid_hw[1], grid_hw[0]), interpolation=cv2.INTER_AREA)  # coverage per cell


@torch.no_grad()
def encode_clip(vae: WanVAE, features: AudioFeatures, clip: Clip, split: str = "train") -> LatentClip:
    step = vae.cfg.temporal_factor
    k = (clip.num_frames - 1) // step
    if k < 1:
        raise ValueError(f"clip of {clip.num_frames} frames is too short (needs at least {1 + step})")
    frames = np.concatenate([clip.reference[None], clip.frames[1:1 + step * k]])  # (1 + 4K, H, W, 3)
    video = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W)
    latents = vae.encode(video)[0]  # (16, 1 + K, h, w)
    emo = torch.from_numpy(clip.emotion_reference).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
    emotion = vae.encode(emo)[0]
    n_video = 1 + step * k
    feats = np.stack([features(clip.audio[f], n_video) for f in range(clip.num_faces)])
    grid = (latents.shape[2] // 2, latents.shape[3] // 2)
    return LatentClip(latents=latents.half().numpy(), emotion=emotion.half().numpy(), features=feats,
                      masks=face_token_masks(clip, grid), motion=clip.motion, emotions=clip.emotions, split=split,
                      mouth=mouth_latent_mask(clip, tuple(latents.shape[2:])))


class KeyedFiles:
    """A directory of one `<key><suffix>` file per key, each written atomically (a temporary file, then
    a rename: a reader or a resumed build never sees half of one)."""

    suffix = ".npz"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}{self.suffix}"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def keys(self) -> list[str]:
        return sorted(p.name[:-len(self.suffix)] for p in self.root.glob(f"*{self.suffix}"))

    def _write_atomic(self, key: str, save: Callable[[Path], None]) -> None:
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp{self.suffix}"
        save(tmp)
        os.replace(tmp, self.path(key))


class LatentStore(KeyedFiles):
    """One .npz per clip, written atomically; small enough to hold in memory for training."""

    def write(self, key: str, lc: LatentClip) -> None:
        extra = {} if lc.mouth is None else {"mouth": lc.mouth}
        meta = np.frombuffer(json.dumps({"motion": lc.motion, "emotions": lc.emotions, "split": lc.split}).encode(),
                             np.uint8)
        self._write_atomic(key, lambda tmp: np.savez(tmp, latents=lc.latents, emotion=lc.emotion,
                                                     features=lc.features, masks=lc.masks, **extra, meta=meta))

    def read(self, key: str) -> LatentClip:
        with np.load(self.path(key)) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            return LatentClip(latents=z["latents"], emotion=z["emotion"], features=z["features"],
                              masks=z["masks"], motion=meta["motion"], emotions=tuple(meta["emotions"]),
                              split=meta["split"], mouth=z["mouth"] if "mouth" in z.files else None)


def build_latents(clips: ClipStore, vae: WanVAE, features: AudioFeatures, out: LatentStore,
                  splits: dict[str, str] | None = None, log=print, *, limit: int | None = None,
                  shard: tuple[int, int] = (0, 1), keys: list[str] | None = None) -> int:
    """Encode every clip not yet in `out` (resumable). `splits`: clip key -> 'train' | 'heldout'.
    `keys`: only these clips (default: all). `limit`: only the first `limit` single-face clips, a quarter
    as many two-voice pairs and a quarter as many listener scenes (sorted keys); `shard` (i, n): only every
    n-th of those from i, so n processes can share the work."""
    done = 0
    keys = clips.keys() if keys is None else sorted(k for k in keys if k in clips)
    if limit is not None:
        pairs = [k for k in keys if k.startswith("pair_")]
        listeners = [k for k in keys if k.startswith(LISTENER_PREFIX)]
        singles = [k for k in keys if not k.startswith(("pair_", LISTENER_PREFIX))]
        keys = singles[:limit] + pairs[:max(1, limit // 4)] + listeners[:limit // 4]
    for key in keys[shard[0]::shard[1]]:
        if key in out:
            continue
        clip = clips.read(key)
        if clip.num_frames < 1 + vae.cfg.temporal_factor * 10:
            continue  # too short for a training window
        out.write(key, encode_clip(vae, features, clip, (splits or {}).get(key, "train")))
        done += 1
        if done % 20 == 0:
            log(f"encoded {done} clips")
    return done


def main() -> None:
    import argparse

    from audio.features.mel import MelFeatures
    from models.vae_loading import load_vae
    from training.dataset import ClipStore

    p = argparse.ArgumentParser(description="Encode teacher clips into latents (resumable, shardable).")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shard", default="0/1", help="i/n: this process encodes every n-th clip from i")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    i, n = (int(v) for v in a.shard.split("/"))
    vae = load_vae(a.out / "vae.safetensors").eval()
    print(build_latents(ClipStore(a.out / "clips"), vae, MelFeatures(), LatentStore(a.out / "latents"),
                        _splits(a.out), limit=a.limit, shard=(i, n)))


def _splits(out: Path) -> dict[str, str]:
    """Clip key -> split, from the plans the clip store wrote beside the clips."""
    return {p["key"]: p["split"] for p in json.loads((out / "clips" / "plans.json").read_text())}


if __name__ == "__main__":
    main()
