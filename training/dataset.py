"""Teacher clips for training: rendered frames + the audio that drives them, stored as .npz shards.

``make_clip`` animates one identity from one voice; ``make_pair_clip`` puts two identities side by
side, each driven by its own audio (for the face-aware audio adapter, FAA). A ``Clip`` always has a
leading face axis (``F`` = 1 or 2) on its per-face arrays, so training code handles both the same way.
Everything is a deterministic function of its arguments (audio, identity seeds, motion, emotion,
size, seed).

``ClipStore`` keeps one clip per compressed ``.npz`` file (no pickles), written atomically, so a
training loop streams clips without re-rendering and a crashed build resumes where it stopped.

Identity seeds below ``HELD_OUT_IDENTITY_BASE`` are for training; seeds from it upwards are held out
(unseen faces). ``build_clip_store`` follows that and the corpus' voice / sentence split.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from audio.pcm import MODEL_SAMPLE_RATE, as_mono_float32
from avatar.drawn.emotions import EMOTIONS, emotion_reference, rest_state
from avatar.drawn.face import NEUTRAL, STATE_FIELDS, FaceState, Identity, render, render_pair
from training.animate import animate

HELD_OUT_IDENTITY_BASE = 1_000_000  # identity seeds >= this are never used for training


@dataclass(frozen=True, eq=False)
class Clip:
    """A rendered teacher clip. Per-face arrays have a leading face axis F (1, or 2 for pairs)."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    audio: np.ndarray  # (F, N) float32, 16 kHz: row f drives face f (pairs: face 0 left, 1 right)
    states: np.ndarray  # (F, T, len(STATE_FIELDS)) float32, the FaceState of each face and frame
    face_boxes: np.ndarray  # (F, T, 4) int32 (x0, y0, x1, y1) pixels of the whole frame
    mouth_boxes: np.ndarray  # (F, T, 4) int32
    reference: np.ndarray  # (H, W, 3) uint8: neutral expression, mouth closed, no motion, eyes open
    emotion_reference: np.ndarray  # (H, W, 3) uint8: each face's emotion at rest, no motion
    identity_seeds: tuple[int, ...]
    emotions: tuple[str, ...]
    motion: float
    seed: int
    fps: int = 25

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.audio.shape[0])

    @property
    def mix(self) -> np.ndarray:
        """(N,) what a single microphone would hear: the faces' audio summed."""
        return self.audio.sum(axis=0)

    def face_states(self, face: int = 0) -> list[FaceState]:
        return [FaceState.from_array(v) for v in self.states[face]]


def make_clip(wav16k: np.ndarray, identity_seed: int, motion: float = 0.0, emotion: str = "neutral",
              size: tuple[int, int] = (128, 128), seed: int = 0, *, blinks: bool = True,
              fps: int = 25) -> Clip:
    """Animate and render one identity speaking ``wav16k`` (16 kHz mono)."""
    x = as_mono_float32(wav16k, name="make_clip")
    idt = Identity.from_seed(identity_seed)
    states = animate(x, identity_seed, fps=fps, motion=motion, emotion=emotion, seed=seed, blinks=blinks)
    frames, face, mouth = [], [], []
    for st in states:
        img, info = render(idt, st, size)
        frames.append(img)
        face.append(info.face_box)
        mouth.append(info.mouth_box)
    h, w = size
    return Clip(frames=_stack_frames(frames, h, w), audio=x[None].copy(), states=_state_array([states]),
                face_boxes=_boxes([face]), mouth_boxes=_boxes([mouth]), reference=render(idt, NEUTRAL, size)[0],
                emotion_reference=emotion_reference(idt, emotion, size), identity_seeds=(int(identity_seed),),
                emotions=(emotion,), motion=float(motion), seed=int(seed), fps=fps)


def make_pair_clip(wav_a: np.ndarray, wav_b: np.ndarray, seed_a: int, seed_b: int, motion: float = 0.0,
                   emotions: tuple[str, str] = ("neutral", "neutral"), size: tuple[int, int] = (128, 256),
                   seed: int = 0, *, blinks: bool = True, fps: int = 25) -> Clip:
    """Two identities side by side; face A (left) is driven by ``wav_a`` only, face B by ``wav_b``.

    The shorter audio is padded with silence. Pass zeros as one face's audio for a silent listener.
    """
    a, b = as_mono_float32(wav_a, name="make_pair_clip"), as_mono_float32(wav_b, name="make_pair_clip")
    n = max(a.size, b.size)
    audio = np.stack([np.pad(a, (0, n - a.size)), np.pad(b, (0, n - b.size))])
    ids = (Identity.from_seed(seed_a), Identity.from_seed(seed_b))
    tracks = [animate(audio[k], s, fps=fps, motion=motion, emotion=e, seed=2 * int(seed) + k, blinks=blinks)
              for k, (s, e) in enumerate(zip((seed_a, seed_b), emotions, strict=True))]
    frames, face, mouth = [], ([], []), ([], [])
    for st_a, st_b in zip(*tracks, strict=True):
        img, infos = render_pair(ids[0], st_a, ids[1], st_b, size)
        frames.append(img)
        for k in range(2):
            face[k].append(infos[k].face_box)
            mouth[k].append(infos[k].mouth_box)
    h, w = size
    return Clip(frames=_stack_frames(frames, h, w), audio=audio, states=_state_array(tracks),
                face_boxes=_boxes(face), mouth_boxes=_boxes(mouth),
                reference=render_pair(ids[0], NEUTRAL, ids[1], NEUTRAL, size)[0],
                emotion_reference=render_pair(ids[0], rest_state(emotions[0]), ids[1], rest_state(emotions[1]),
                                              size)[0],
                identity_seeds=(int(seed_a), int(seed_b)), emotions=tuple(emotions), motion=float(motion),
                seed=int(seed), fps=fps)


def _stack_frames(frames: list[np.ndarray], h: int, w: int) -> np.ndarray:
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def _state_array(tracks: list[list[FaceState]]) -> np.ndarray:
    n = len(tracks[0])
    return np.asarray([[s.as_array() for s in t] for t in tracks], dtype=np.float32).reshape(
        len(tracks), n, len(STATE_FIELDS))


def _boxes(per_face) -> np.ndarray:
    return np.asarray(per_face, dtype=np.int32).reshape(len(per_face), -1, 4)


# ---------------------------------------------------------------------------------------------
# Storage


_ARRAYS = ("frames", "audio", "states", "face_boxes", "mouth_boxes", "reference", "emotion_reference")


class ClipStore:
    """A directory of clips, one ``<key>.npz`` each (compressed; metadata as JSON bytes, no pickle)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith(".") or key != key.strip():
            raise ValueError(f"bad clip key {key!r}: use a plain file name without '/' or a leading dot")
        return self.root / f"{key}.npz"

    def write(self, key: str, clip: Clip) -> Path:
        """Store ``clip`` under ``key`` atomically (a reader never sees a half-written file)."""
        meta = {"identity_seeds": list(clip.identity_seeds), "emotions": list(clip.emotions),
                "motion": clip.motion, "seed": clip.seed, "fps": clip.fps, "state_fields": list(STATE_FIELDS),
                "sample_rate": MODEL_SAMPLE_RATE}
        arrays = {name: getattr(clip, name) for name in _ARRAYS}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        final = self.path(key)
        tmp = final.with_name(f".{final.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def read(self, key: str) -> Clip:
        path = self.path(key)
        if not path.exists():
            raise KeyError(f"no clip {key!r} in {self.root}")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if tuple(meta["state_fields"]) != STATE_FIELDS:
                raise ValueError(f"{path}: stored state fields {meta['state_fields']} differ from {STATE_FIELDS}")
            arrays = {name: z[name] for name in _ARRAYS}
        return Clip(**arrays, identity_seeds=tuple(meta["identity_seeds"]), emotions=tuple(meta["emotions"]),
                    motion=float(meta["motion"]), seed=int(meta["seed"]), fps=int(meta["fps"]))

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.npz") if not p.name.startswith("."))

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[tuple[str, Clip]]:
        for key in self.keys():
            yield key, self.read(key)


# ---------------------------------------------------------------------------------------------
# Corpus -> store


@dataclass(frozen=True)
class ClipPlan:
    """How one stored clip is made from corpus clips (a function of the corpus index and a seed)."""

    key: str
    split: str
    corpus_clips: tuple[str, ...]  # clip ids: one, or two for a pair (face A, face B)
    identity_seeds: tuple[int, ...]
    emotions: tuple[str, ...]
    motion: float
    seed: int
    silent: int | None = None  # a listener scene: this face hears silence while the other one speaks


LISTENER_PREFIX = "listen_"


def plan_clips(corpus_clips, seed: int = 0, *, pair_fraction: float = 0.15,
               train_identities: int = 10_000) -> list[ClipPlan]:
    """One plan per corpus clip (pairs take a second clip of the same split and engine as face B's voice).

    Train clips get identities ``[0, train_identities)``, held-out clips identities from
    ``HELD_OUT_IDENTITY_BASE``; emotion uniform over ``EMOTIONS``; motion uniform in {0, .25, .5, .75, 1}.
    """
    if not 0 < train_identities <= HELD_OUT_IDENTITY_BASE:
        raise ValueError(f"train_identities must be in 1..{HELD_OUT_IDENTITY_BASE}")
    clips = sorted(corpus_clips, key=lambda c: c.clip_id)
    pools: dict[tuple[str, str], list[str]] = {}  # face B speaks in face A's engine, so adding an engine's
    for c in clips:  # clips never changes the pairs of the others
        pools.setdefault((c.split, c.engine), []).append(c.clip_id)
    names = sorted(EMOTIONS)
    plans = []
    for c in clips:
        rng = np.random.default_rng([int(seed), int(c.clip_id.rsplit("_", 1)[-1]), 0xD5])
        pool = pools[(c.split, c.engine)]
        pair = len(pool) > 1 and rng.random() < pair_fraction
        ids = [c.clip_id] + ([pool[(pool.index(c.clip_id) + 1 + int(rng.integers(len(pool) - 1))) % len(pool)]]
                             if pair else [])
        held = HELD_OUT_IDENTITY_BASE
        lo, hi = (0, train_identities) if c.split == "train" else (held, held + 10**6)
        plans.append(ClipPlan(
            key=("pair_" if pair else "") + c.clip_id, split=c.split, corpus_clips=tuple(ids),
            identity_seeds=tuple(int(v) for v in rng.integers(lo, hi, size=len(ids))),
            emotions=tuple(names[int(k)] for k in rng.integers(len(names), size=len(ids))),
            motion=float(rng.integers(0, 5)) / 4, seed=int(rng.integers(2**31))))
    return plans


def plan_listeners(corpus_clips, seed: int = 0, *, fraction: float = 0.0,
                   train_identities: int = 10_000) -> list[ClipPlan]:
    """Two-face scenes where one face speaks (a corpus clip) and the other listens (silence): what a
    dialogue looks like between turns, which the two-voice pairs of `plan_clips` never show. About
    `fraction` of the corpus clips get one, keyed ``listen_<clip id>``; its own random stream, so the
    plans of `plan_clips` do not change with it."""
    plans = []
    for c in sorted(corpus_clips, key=lambda c: c.clip_id):
        rng = np.random.default_rng([int(seed), int(c.clip_id.rsplit("_", 1)[-1]), 0x115])
        if rng.random() >= fraction:
            continue
        held = HELD_OUT_IDENTITY_BASE
        lo, hi = (0, train_identities) if c.split == "train" else (held, held + 10**6)
        names = sorted(EMOTIONS)
        plans.append(ClipPlan(
            key=LISTENER_PREFIX + c.clip_id, split=c.split, corpus_clips=(c.clip_id,),
            identity_seeds=tuple(int(v) for v in rng.integers(lo, hi, size=2)),
            emotions=tuple(names[int(k)] for k in rng.integers(len(names), size=2)),
            motion=float(rng.integers(0, 5)) / 4, seed=int(rng.integers(2**31)), silent=int(rng.integers(2))))
    return plans


def build_clip_store(corpus_dir: str | Path, store: ClipStore, seed: int = 0, *,
                     size: tuple[int, int] = (128, 128), pair_fraction: float = 0.15,
                     train_identities: int = 10_000, shard: tuple[int, int] = (0, 1),
                     listener_fraction: float = 0.0) -> list[ClipPlan]:
    """Render every corpus clip (this shard's share) into ``store``; existing keys are skipped.

    Pairs and listener scenes (`plan_listeners`) are rendered at ``(height, 2 * width)``. Returns the
    plans (the JSON of them is also written as ``plans.json`` next to the clips).
    """
    from audio.io import read_audio
    from training.corpus import read_index

    index = {c.clip_id: c for c in read_index(corpus_dir)}
    plans = plan_clips(index.values(), seed, pair_fraction=pair_fraction, train_identities=train_identities)
    plans += plan_listeners(index.values(), seed, fraction=listener_fraction, train_identities=train_identities)
    k, n = shard
    for i, p in enumerate(plans):
        if i % n != k or p.key in store:
            continue
        wavs = [read_audio(Path(corpus_dir) / index[cid].path) for cid in p.corpus_clips]
        if p.silent is not None:
            wavs.insert(p.silent, np.zeros_like(wavs[0]))
            clip = make_pair_clip(wavs[0], wavs[1], *p.identity_seeds, p.motion, p.emotions,
                                  (size[0], 2 * size[1]), p.seed)
        elif len(wavs) == 1:
            clip = make_clip(wavs[0], p.identity_seeds[0], p.motion, p.emotions[0], size, p.seed)
        else:
            clip = make_pair_clip(wavs[0], wavs[1], *p.identity_seeds, p.motion, p.emotions,
                                  (size[0], 2 * size[1]), p.seed)
        store.write(p.key, clip)
    body = json.dumps([p.__dict__ for p in plans], indent=1)
    tmp = store.root / f".plans.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(body)
    os.replace(tmp, store.root / "plans.json")
    return plans
