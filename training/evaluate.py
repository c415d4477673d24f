"""`avatarcast eval demo`: the demo model measured against its teacher, on held-out identities and audio.

Every number compares generated frames with what the teacher renders for the same identity and audio
(`training.dataset.make_clip`, blinks off, motion 0), through the probes the teacher tests validate:

- lipsync_r / lipsync_lag_frames: Pearson r between the mouth-opening probe on generated frames and the
  teacher's opening for the same audio, at the best lag within +-MAX_LAG frames (and that lag);
- identity_psnr_db: PSNR of generated vs teacher frames;
- seam_ratio: mean |frame difference| across unit boundaries / within units;
- drift_db: identity PSNR over the last `drift_window_s` of a long stream minus over the first;
- emotion_order_ok: mouth-corner lift with the happy / neutral / sad emotion reference orders h > n > s;
- faa_leak: two faces, audio to face A only: variance of B's mouth probe / variance of A's;
- rtf: video seconds per wall second of the whole path (audio features + DiT + VAE decode) over the
  long drift stream (steady state); rtf_clips: the same over the short lip-sync sessions, whose
  per-session start-up (avatar prefill, the first block, the flush at the end) it includes;
- first_frame_s: live session, seconds from the first pushed audio to the first frame that carries it.

The JSON is the contract; thresholds live in the model card and the issue, not here.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from audio.pcm import MODEL_SAMPLE_RATE
from training.dataset import HELD_OUT_IDENTITY_BASE, Clip, make_clip, make_pair_clip
from training.probes import mouth_corner_lift, mouth_opening, psnr

MAX_LAG = 5  # frames searched either side for the lip-sync lag
KEYS = ("lipsync_r", "lipsync_lag_frames", "identity_psnr_db", "seam_ratio", "drift_db", "emotion_order_ok",
        "faa_leak", "rtf", "first_frame_s")


@dataclass(frozen=True)
class EvalConfig:
    identities: tuple[int, ...] = (HELD_OUT_IDENTITY_BASE + 11, HELD_OUT_IDENTITY_BASE + 23)
    stream_s: float = 300.0  # the drift stream (audio looped)
    drift_window_s: float = 60.0
    seed: int = 0


# ---- metrics: plain functions of probe series and frames ---------------------------------------
def lipsync(generated: np.ndarray, teacher: np.ndarray, max_lag: int = MAX_LAG) -> tuple[float, int]:
    """(best Pearson r, its lag in frames; positive = generated mouth moves later than the teacher's)."""
    g, t = np.asarray(generated, float), np.asarray(teacher, float)
    n = min(g.size, t.size)
    best = (-math.inf, 0)
    for lag in range(-max_lag, max_lag + 1):
        a = g[max(0, lag): n + min(0, lag)]
        b = t[max(0, -lag): n - max(0, lag)]
        if a.size < 3 or a.std() == 0 or b.std() == 0:
            continue
        r = float(np.corrcoef(a, b)[0, 1])
        if r > best[0]:
            best = (r, lag)
    return (best[0] if best[0] > -math.inf else float("nan")), best[1]


def seam_ratio(frames: np.ndarray, unit_starts: list[int]) -> float:
    """Mean |frame t - frame t-1| where t starts a new unit, over the same where it does not."""
    diffs = np.abs(np.diff(np.asarray(frames, np.float32), axis=0)).mean(axis=(1, 2, 3))  # diffs[i]: i+1 vs i
    starts = {s for s in unit_starts if 0 < s < len(frames)}
    at = [diffs[s - 1] for s in starts]
    within = [d for i, d in enumerate(diffs) if i + 1 not in starts]
    return float(np.mean(at) / max(np.mean(within), 1e-6)) if at and within else float("nan")


def mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([psnr(x, y) for x, y in zip(a, b, strict=False)]))


def mean_corner_lift(frames: np.ndarray, mouth_boxes: np.ndarray) -> float:
    """Mouth-corner lift averaged over the frames (as many as both have)."""
    return float(np.mean([mouth_corner_lift(f, tuple(b)) for f, b in zip(frames, mouth_boxes, strict=False)]))


def openings(frames: np.ndarray, mouth_boxes: np.ndarray) -> np.ndarray:
    return np.array([mouth_opening(f, tuple(b)) for f, b in zip(frames, mouth_boxes, strict=False)])


# ---- generation through the real engine ---------------------------------------------------------
def _engine(models):
    from avatar.engine import AvatarEngine, preset_options

    return AvatarEngine(models, preset_options(models.dit.cfg.name, decoder="auto", max_sessions=1)).start()


def _portrait(clip: Clip, state, scale: int) -> tuple[np.ndarray, list]:
    """The clip's identities in `state` at `scale` x the clip's size, and their face boxes."""
    from avatar.drawn.face import Identity, render, render_pair

    h, w = clip.frames.shape[1:3]
    ids = [Identity.from_seed(s) for s in clip.identity_seeds]
    if len(ids) == 1:
        img, info = render(ids[0], state, (h * scale, w * scale))
        return img, [info.face_box]
    img, infos = render_pair(ids[0], state, ids[1], state, (h * scale, w * scale))
    return img, [i.face_box for i in infos]


def _conditions(engine, clip: Clip, emotion: str | None = None):
    """The avatar as a user would give it: the identities' neutral portrait (rendered at >= 128 px, which
    prepare_avatar scales to the model's size), their face boxes, and the emotion's reference image."""
    from app.avatars import png_bytes
    from avatar.drawn.emotions import rest_state
    from avatar.drawn.face import NEUTRAL
    from avatar.faces import FixedBoxes

    scale = max(1, -(-128 // min(clip.frames.shape[1:3])))
    image, boxes = _portrait(clip, NEUTRAL, scale)
    emotions = {"e": png_bytes(_portrait(clip, rest_state(emotion), scale)[0])} if emotion else None
    prepared = engine.prepare_avatar(png_bytes(image), detector=FixedBoxes(boxes), expected_faces=len(boxes),
                                     emotion_images=emotions)
    return engine.conditions(prepared, "e" if emotions else None, motion=0.0)  # the teacher runs motion 0


async def _run_session(engine, cond, audio: np.ndarray, *, chunk_s: float = 1.0,
                       keep=lambda pts: True) -> tuple[np.ndarray, float]:
    """Push (F, N) 16 kHz audio (one row per speaker) as fast as generation takes it; collect the frames
    `keep(pts)` asks for. Returns (frames, wall seconds)."""
    from avatar.session import SessionOptions
    from avatar.types import AvatarFrame, SegmentEnd, SessionError, frames_for_samples

    speakers, n = audio.shape
    session = engine.open_session(cond, SessionOptions(realtime=False, speakers=speakers,
                                                       sample_rate=MODEL_SAMPLE_RATE))
    total = frames_for_samples(n, MODEL_SAMPLE_RATE, engine.options.fps)
    step = int(chunk_s * MODEL_SAMPLE_RATE)
    t0 = time.perf_counter()

    async def feed():
        pushed = 0
        while pushed < n:
            if pushed - session.next_video * MODEL_SAMPLE_RATE // engine.options.fps < 8 * MODEL_SAMPLE_RATE:
                for k in range(speakers):
                    session.push_audio(audio[k, pushed:pushed + step], MODEL_SAMPLE_RATE, speaker=k)
                pushed += step
            await asyncio.sleep(0.002)
        session.end_segment()

    feeder = asyncio.create_task(feed())
    frames = []
    try:
        async for item in session:
            if isinstance(item, SessionError):
                raise RuntimeError(f"generation failed: {item.message}")
            if isinstance(item, AvatarFrame) and keep(item.pts):
                frames.append(item.video)
            if isinstance(item, SegmentEnd) or (isinstance(item, AvatarFrame) and item.pts + 1 >= total):
                break
    finally:
        feeder.cancel()
        session.close()
    return np.stack(frames), time.perf_counter() - t0


async def _first_frame_s(engine, cond, audio: np.ndarray) -> float:
    """A live session: 20 ms packets in real time after 0.5 s of idle; time to the first frame carrying them."""
    from avatar.session import SessionOptions
    from avatar.types import AvatarFrame

    session = engine.open_session(cond, SessionOptions(realtime=True, sample_rate=MODEL_SAMPLE_RATE))
    packet = MODEL_SAMPLE_RATE // 50
    started: list[float] = []

    async def feed():
        await asyncio.sleep(0.5)
        for i in range(0, min(audio.size, 3 * MODEL_SAMPLE_RATE), packet):
            if not started:
                started.append(time.perf_counter())
            session.push_audio(audio[i:i + packet], MODEL_SAMPLE_RATE)
            await asyncio.sleep(0.02)

    feeder = asyncio.create_task(feed())
    try:
        async for item in session:
            if isinstance(item, AvatarFrame) and started and not item.idle:
                return time.perf_counter() - started[0]
    finally:
        feeder.cancel()
        session.close()
    return float("nan")


# ---- the evaluation -----------------------------------------------------------------------------
def evaluate(models, speech: list[np.ndarray], cfg: EvalConfig = EvalConfig()) -> dict:
    """All metrics for `models` (a ModelBundle) on held-out `speech` clips (16 kHz mono float32)."""
    if not speech:
        raise ValueError("evaluation needs at least one held-out speech clip")
    size = tuple(models.frame_hw)
    out: dict[str, object] = {}
    with _engine(models) as engine:
        # 1. lip sync, identity and seams: each identity speaks each clip, blinks off, motion 0
        rs, lags, psnrs, seams, gen_s, wall_s = [], [], [], [], 0.0, 0.0
        for ident in cfg.identities:
            for wav in speech:
                clip = make_clip(wav, ident, motion=0.0, size=size, seed=cfg.seed, blinks=False)
                frames, wall = asyncio.run(_run_session(engine, _conditions(engine, clip), clip.audio))
                n = min(len(frames), clip.num_frames)
                r, lag = lipsync(openings(frames[:n], clip.mouth_boxes[0, :n]), clip.states[0, :n, 0])
                rs.append(r)
                lags.append(lag)
                psnrs.append(mean_psnr(frames[:n], clip.frames[:n]))
                seams.append(seam_ratio(frames[:n], unit_starts(engine.options, n)))
                gen_s, wall_s = gen_s + n / 25, wall_s + wall
        finite = [r for r in rs if np.isfinite(r)]  # a mouth that never moves has no correlation at all
        out["lipsync_r"] = round(float(np.mean(finite)), 4) if finite else None
        out["lipsync_lag_frames"] = int(np.median(lags))
        out["identity_psnr_db"] = round(float(np.mean(psnrs)), 3)
        out["seam_ratio"] = round(float(np.mean(seams)), 4)
        out["rtf_clips"] = round(gen_s / wall_s, 3)
        # 2. emotion: the same audio with each emotion reference, corner lift on the generated mouth
        wav, ident = speech[0], cfg.identities[0]
        lifts, taught = {}, {}
        for emotion in ("happy", "neutral", "sad"):
            clip = make_clip(wav, ident, emotion=emotion, size=size, seed=cfg.seed, blinks=False)
            frames, _ = asyncio.run(_run_session(engine, _conditions(engine, clip, emotion),
                                                 clip.audio))
            lifts[emotion] = mean_corner_lift(frames, clip.mouth_boxes[0])
            taught[emotion] = mean_corner_lift(clip.frames, clip.mouth_boxes[0])
        out["emotion_lift"] = {k: round(v, 4) for k, v in lifts.items()}
        out["emotion_lift_teacher"] = {k: round(v, 4) for k, v in taught.items()}  # the scale to read it on
        out["emotion_order_ok"] = bool(lifts["happy"] > lifts["neutral"] > lifts["sad"])
        # 3. drift: one long stream (the clip looped), PSNR of the first vs the last window
        out["drift_db"], out["rtf"] = _drift(engine, speech[0], cfg, size)
        # 4. first frame latency in a live session
        clip = make_clip(speech[0], ident, size=size, seed=cfg.seed, blinks=False)
        out["first_frame_s"] = round(asyncio.run(_first_frame_s(engine, _conditions(engine, clip), clip.audio[0])), 3)
    # 5. FAA: a two-face scene at twice the width, audio to the left face only
    out["faa_leak"] = _faa_leak(models, speech[0], cfg, size)
    out["model"] = models.name
    out["identities"] = list(cfg.identities)
    out["clips"] = len(speech)
    return out


def unit_starts(options, frames: int) -> list[int]:
    """Video frames at which a new generation unit starts, for EngineOptions `options`."""
    second, unit, _ = options.unit_geometry()
    return list(range(4 * second - 3, frames, 4 * unit))


def _drift(engine, wav: np.ndarray, cfg: EvalConfig, size) -> tuple[float, float]:
    """(drift_db, the stream's real-time factor)."""
    spf = MODEL_SAMPLE_RATE // 25
    wav = wav[: wav.size // spf * spf]  # whole frames, so every loop starts on a frame boundary
    reps = int(math.ceil(cfg.stream_s * MODEL_SAMPLE_RATE / wav.size))
    long = np.tile(wav, reps)[: int(cfg.stream_s * MODEL_SAMPLE_RATE)]
    window = int(cfg.drift_window_s * 25)
    total = int(cfg.stream_s * 25)
    clip_frames = wav.size // spf
    # the reference for frame p of the looped stream: the teacher frame at the same place in the clip
    clip = make_clip(wav, cfg.identities[0], size=size, seed=cfg.seed, blinks=False)
    keep = lambda pts: pts < window or pts >= total - window  # noqa: E731
    frames, wall = asyncio.run(_run_session(engine, _conditions(engine, clip), long[None], keep=keep))
    pts = list(range(window)) + list(range(total - window, total))
    scores = [psnr(f, clip.frames[p % clip_frames]) for f, p in zip(frames, pts, strict=False)]
    return round(float(np.mean(scores[window:]) - np.mean(scores[:window])), 3), round(cfg.stream_s / wall, 3)


def _faa_leak(models, wav: np.ndarray, cfg: EvalConfig, size) -> float | None:
    pair_size = (size[0], 2 * size[1])
    silent = np.zeros_like(wav)
    clip = make_pair_clip(wav, silent, cfg.identities[0], cfg.identities[-1] + 1, size=pair_size,
                          seed=cfg.seed, blinks=False)
    with _engine(replace(models, frame_hw=pair_size, decoder_backend=None)) as engine:
        frames, _ = asyncio.run(_run_session(engine, _conditions(engine, clip), clip.audio))
    a = openings(frames, clip.mouth_boxes[0])
    b = openings(frames, clip.mouth_boxes[1])
    if a.var() < 1e-8:  # face A's mouth never moved: there is nothing to leak, the ratio is undefined
        return None
    return round(float(b.var() / a.var()), 4)


def held_out_speech(corpus: Path, clips: int) -> list[np.ndarray]:
    """The first `clips` held-out clips of a demo corpus (voices and sentences never trained on)."""
    from audio.io import read_audio
    from training.corpus import read_index

    chosen = [c for c in read_index(corpus) if c.split == "heldout"][:clips]
    if not chosen:
        raise ValueError(f"no held-out clips in {corpus}; build the corpus (`avatarcast train demo`) "
                         "or pass audio files")
    return [read_audio(corpus / c.path, sample_rate=MODEL_SAMPLE_RATE) for c in chosen]
