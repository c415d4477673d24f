"""`avatarcast eval demo`: the demo model measured against its teacher, on held-out identities and audio.

Every number compares generated frames with what the teacher renders for the same identity and audio
(`training.dataset.make_clip`, blinks off, motion 0), through the probes the teacher tests validate:

- lipsync_r / lipsync_lag_frames: Pearson r between the mouth-opening probe on generated frames and the
  teacher's opening for the same audio, at the best lag within +-MAX_LAG frames (and that lag);
- lipsync_r_ci90: a 90 % bootstrap interval of that mean over clips (each clip's r averaged over the
  identities; clips differ by about 0.05, so a few clips give a wide interval); every lip-sync group has one;
- identity_psnr_db: PSNR of generated vs teacher frames;
- seam_ratio: mean |frame difference| across unit boundaries / within units;
- drift_db: identity PSNR over the last `drift_window_s` of a long stream minus over the first;
- emotion_lift / emotion_lift_teacher: mean mouth-corner lift of the first identity speaking with the happy /
  neutral / sad emotion reference, generated and teacher;
- emotion_effect: per identity, the spread (max - min over the emotions) of the generated lift over the
  teacher's spread for the same identity and audio ({"per_identity": {seed: ratio}, "min": ..,
  "order_ok": {seed: bool}}: whether the generated lifts sort the emotions as the teacher's do);
- emotion_order_ok: the teacher's order holds for every identity;
- faa_leak: two faces, audio to face A only: variance of B's mouth probe / variance of A's;
- rtf: video seconds per wall second of the whole path (audio features + DiT + VAE decode) over the
  long drift stream (steady state); rtf_clips: the same over the short lip-sync sessions, whose
  per-session start-up (avatar prefill, the first block, the flush at the end) it includes;
- first_frame_s: live session, seconds from the first pushed audio to the first frame that carries it,
  the median over `first_frame_sessions` sessions (first_frame_runs_s: each one's), on an avatar whose
  decoder earlier sessions settled (`AvatarEngine.settle`, which the service does for its default avatar
  at start); first_frame_new_avatar_s: the same for one session on an avatar the engine never settled;
- held_out_engine: lipsync_r and its lag on speech from a synthesis engine no training clip came from
  (flite: training/engines.py), when asked for; held_out_<engine> (held_out_mbrola): the same on the
  held-out voice of the corpus's second engine family (training.corpus.MBROLA_HELD_OUT), when given;
- music_under_speech: lipsync_r and its lag on the first `music_clips` clips with instrumental music mixed
  under them (and through their pauses) at `snr_db` below the speech, against the clean speech's teacher.
  The music is `training.augment.music`'s, the generator whose pieces augment training (other seeds);
- latency_ms: the same live session fed `latency_s` of speech in real time as 20 ms packets: for each
  speech frame, the wall time from the push of the packet carrying its first audio sample to the session
  yielding the frame (the frame's other samples arrived later, so this bounds theirs); p50 and p95.

The JSON is the contract; thresholds live in the model card and the issue, not here.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from audio.pcm import MODEL_SAMPLE_RATE
from training.augment import MUSIC_SNR_DB, music
from training.dataset import HELD_OUT_IDENTITY_BASE, Clip, make_clip, make_pair_clip
from training.probes import mouth_corner_lift, mouth_opening, psnr

MAX_LAG = 5  # frames searched either side for the lip-sync lag
LIVE_IDLE_S = 0.5  # a live session idles this long before its first packet
PACKET_S = 0.02  # live audio arrives as a browser's mic sends it
FIRST_FRAME_PROBE_S = 1.0  # speech in each extra session that times the first frame
KEYS = ("lipsync_r", "lipsync_lag_frames", "identity_psnr_db", "seam_ratio", "drift_db", "emotion_order_ok",
        "faa_leak", "rtf", "first_frame_s", "latency_ms", "emotion_effect")
EMOTIONS = ("happy", "neutral", "sad")  # emotion references measured, teacher order h > n > s


@dataclass(frozen=True)
class EvalConfig:
    identities: tuple[int, ...] = (HELD_OUT_IDENTITY_BASE + 11, HELD_OUT_IDENTITY_BASE + 23)
    stream_s: float = 300.0  # the drift stream (audio looped)
    drift_window_s: float = 60.0
    latency_s: float = 12.0  # live speech fed in real time for latency_ms (after LIVE_IDLE_S of idle)
    music_clips: int = 4  # held-out clips spoken again over music (training.augment.music), lip sync against
    # the clean speech's teacher. The music comes from the generator the training augmentation uses (new seeds)
    first_frame_sessions: int = 3  # live sessions whose first frame is timed (the latency session and short
    # ones): one start-up on a shared 2-core machine varied 0.39-0.63 s between runs of the same model
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


def clip_interval(rs: np.ndarray, level: float = 0.9, seed: int = 0) -> list[float] | None:
    """Bootstrap interval of the mean lip sync over clips: `rs` (identities, clips). Clips are resampled, not
    sessions, because one clip's sessions (one per identity) move together; None under 2 clips."""
    from scipy.stats import bootstrap

    finite = np.isfinite(rs)
    counts = finite.sum(axis=0)  # identities with an r, per clip
    per_clip = np.where(finite, rs, 0.0).sum(axis=0)[counts > 0] / counts[counts > 0]
    if per_clip.size < 2:
        return None
    got = bootstrap((per_clip,), np.mean, confidence_level=level, n_resamples=2000, method="percentile",
                    rng=np.random.default_rng(seed))
    return [round(float(got.confidence_interval.low), 4), round(float(got.confidence_interval.high), 4)]


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


def lift_spread(lifts: dict[str, float]) -> float:
    return max(lifts.values()) - min(lifts.values())


def emotion_effect(generated: dict[str, float], teacher: dict[str, float]) -> float | None:
    """Spread of the generated lift over the teacher's, on the same emotions (None: the teacher's lifts
    do not differ, so there is no effect to reproduce)."""
    taught = lift_spread({k: teacher[k] for k in generated})
    return lift_spread(generated) / taught if taught > 0 else None


def same_order(generated: dict[str, float], teacher: dict[str, float]) -> bool:
    """The generated lifts sort the emotions strictly as the teacher's do (ties in the generated lifts fail)."""
    order = sorted(teacher, key=teacher.get)
    return all(generated[a] < generated[b] for a, b in zip(order, order[1:]))


def emotion_summary(per_identity: dict[int, tuple[dict[str, float], dict[str, float]]]) -> dict:
    """`emotion_effect` from each identity's (generated lifts, teacher lifts)."""
    ratios = {str(seed): emotion_effect(g, t) for seed, (g, t) in per_identity.items()}
    finite = [v for v in ratios.values() if v is not None]
    return {"per_identity": {k: None if v is None else round(v, 4) for k, v in ratios.items()},
            "min": round(min(finite), 4) if finite and len(finite) == len(ratios) else None,
            "order_ok": {str(seed): same_order(g, t) for seed, (g, t) in per_identity.items()}}


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p95": round(float(np.percentile(values, 95)), 1)}


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


def avatar_conditions(engine, clip: Clip, emotion: str | None = None):
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


async def run_session(engine, cond, audio: np.ndarray, *, chunk_s: float = 1.0,
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


async def _live_session(engine, cond, audio: np.ndarray, seconds: float,
                        idle_s: float = LIVE_IDLE_S) -> tuple[float, list[float]]:
    """A live session: `idle_s` of idle, then `seconds` of `audio` (looped) pushed as 20 ms packets on the
    wall clock. Returns (first_frame_s: first push -> first frame carrying pushed audio, latencies in ms:
    for each frame whose first sample was pushed, that packet's push -> the frame yielded)."""
    from avatar.session import SessionOptions
    from avatar.types import AvatarFrame, SessionError, frame_sample_bounds

    session = engine.open_session(cond, SessionOptions(realtime=True, sample_rate=MODEL_SAMPLE_RATE))
    packet = int(PACKET_S * MODEL_SAMPLE_RATE)
    total = max(packet, int(seconds * MODEL_SAMPLE_RATE) // packet * packet)
    speech = np.resize(np.asarray(audio, np.float32), total)  # np.resize loops the clip
    starts: list[int] = []  # each packet's first sample on the session's timeline...
    pushed_at: list[float] = []  # ...and when it was pushed
    last = [0]  # timeline end after the last packet (0: still feeding)

    def end() -> int:  # the session's timeline (pushed + silence it inserted); in = out rate: sample for sample
        return session.tracks[0].pcm.end if session.tracks else 0

    async def feed():
        await asyncio.sleep(idle_s)
        t0 = time.perf_counter()
        for k, i in enumerate(range(0, total, packet)):
            await asyncio.sleep(max(0.0, t0 + k * PACKET_S - time.perf_counter()))  # on the clock: no drift
            before, now = end(), time.perf_counter()
            session.push_audio(speech[i:i + packet], MODEL_SAMPLE_RATE)
            if end() - before == packet:  # else the engine thread padded in between: place unknown, skip it
                starts.append(before)
                pushed_at.append(now)
        last[0] = end()

    feeder = asyncio.create_task(feed())
    first, latencies = float("nan"), []
    try:
        async for item in session:
            if isinstance(item, SessionError):
                raise RuntimeError(f"generation failed: {item.message}")
            if not isinstance(item, AvatarFrame):
                continue
            now = time.perf_counter()
            a, b = frame_sample_bounds(item.pts, item.sample_rate, item.fps)
            k = bisect.bisect_right(starts, a) - 1
            if k >= 0 and a < starts[k] + packet:
                latencies.append((now - pushed_at[k]) * 1e3)
            if math.isnan(first) and pushed_at and not item.idle:
                first = now - pushed_at[0]
            if last[0] and b >= last[0]:
                break
    finally:
        feeder.cancel()
        session.close()
    return first, latencies


# ---- the evaluation -----------------------------------------------------------------------------
def _speaking(engine, speech: list[np.ndarray], cfg: EvalConfig, size,
              heard: list[np.ndarray] | None = None) -> dict[str, float | int | None]:
    """Each identity speaks each clip (blinks off, motion 0): lip sync, identity, seams and speed.
    `heard`: what the model hears instead of each clip (music under it, say); the teacher follows the clip."""
    rs, lags, psnrs, seams, gen_s, wall_s = [], [], [], [], 0.0, 0.0
    for ident in cfg.identities:  # rs[k * len(speech) + i]: identity k speaking clip i
        for i, wav in enumerate(speech):
            clip = make_clip(wav, ident, motion=0.0, size=size, seed=cfg.seed, blinks=False)
            audio = clip.audio if heard is None else heard[i][None]
            frames, wall = asyncio.run(run_session(engine, avatar_conditions(engine, clip), audio))
            n = min(len(frames), clip.num_frames)
            r, lag = lipsync(openings(frames[:n], clip.mouth_boxes[0, :n]), clip.states[0, :n, 0])
            rs.append(r)
            lags.append(lag)
            psnrs.append(mean_psnr(frames[:n], clip.frames[:n]))
            seams.append(seam_ratio(frames[:n], unit_starts(engine.options, n)))
            gen_s, wall_s = gen_s + n / 25, wall_s + wall
    finite = [r for r in rs if np.isfinite(r)]  # a mouth that never moves has no correlation at all
    return {"lipsync_r": round(float(np.mean(finite)), 4) if finite else None,
            "lipsync_r_ci90": clip_interval(np.reshape(rs, (len(cfg.identities), len(speech)))),
            "lipsync_lag_frames": int(np.median(lags)), "identity_psnr_db": round(float(np.mean(psnrs)), 3),
            "seam_ratio": round(float(np.mean(seams)), 4), "rtf_clips": round(gen_s / wall_s, 3)}


def _lip_sync_of(got: dict, clips: list) -> dict:
    """A lip-sync group's entry in the result: its clip count and `_speaking`'s lip-sync figures."""
    return {"clips": len(clips), **{k: got[k] for k in ("lipsync_r", "lipsync_r_ci90", "lipsync_lag_frames")}}


def evaluate(models, speech: list[np.ndarray], cfg: EvalConfig = EvalConfig(),
             held_out_engine: tuple[str, list[np.ndarray]] | None = None,
             held_out_voices: dict[str, list[np.ndarray]] | None = None) -> dict:
    """All metrics for `models` (a ModelBundle) on held-out `speech` clips (16 kHz mono float32).
    `held_out_engine`: (engine name, its clips), lip sync measured on them too; `held_out_voices`: engine
    name -> clips of held-out voices of another engine family in the corpus (lip sync on each)."""
    if not speech:
        raise ValueError("evaluation needs at least one held-out speech clip")
    size = tuple(models.frame_hw)
    out: dict[str, object] = {}
    with _engine(models) as engine:
        # 1. lip sync, identity and seams: each identity speaks each clip, blinks off, motion 0
        out.update(_speaking(engine, speech, cfg, size))
        if held_out_engine is not None:  # the same on speech from an engine no training clip came from
            name, clips = held_out_engine
            got = _speaking(engine, clips, cfg, size)
            out["held_out_engine"] = {"engine": name, **_lip_sync_of(got, clips)}
        for name, clips in (held_out_voices or {}).items():
            got = _speaking(engine, clips, cfg, size)
            out[f"held_out_{name}"] = _lip_sync_of(got, clips)
        if cfg.music_clips:  # the first clips with music under them; the teacher follows the clean speech
            clips = speech[:cfg.music_clips]
            heard = [music(w, np.random.default_rng([cfg.seed, i, 0x3C])) for i, w in enumerate(clips)]
            got = _speaking(engine, clips, cfg, size, heard=heard)
            out["music_under_speech"] = {**_lip_sync_of(got, clips), "snr_db": list(MUSIC_SNR_DB)}
        # 2. emotion: each identity speaks the same audio with each emotion reference; corner lift on the
        # generated mouth against the teacher's, identity by identity
        lifts_by_id = {}
        for ident in cfg.identities:
            lifts, taught = {}, {}
            for emotion in EMOTIONS:
                clip = make_clip(speech[0], ident, emotion=emotion, size=size, seed=cfg.seed, blinks=False)
                frames, _ = asyncio.run(run_session(engine, avatar_conditions(engine, clip, emotion), clip.audio))
                lifts[emotion] = mean_corner_lift(frames, clip.mouth_boxes[0])
                taught[emotion] = mean_corner_lift(clip.frames, clip.mouth_boxes[0])
            lifts_by_id[ident] = (lifts, taught)
        lifts, taught = lifts_by_id[cfg.identities[0]]
        out["emotion_lift"] = {k: round(v, 4) for k, v in lifts.items()}
        out["emotion_lift_teacher"] = {k: round(v, 4) for k, v in taught.items()}  # the scale to read it on
        out["emotion_effect"] = emotion_summary(lifts_by_id)
        out["emotion_order_ok"] = all(out["emotion_effect"]["order_ok"].values())
        # 3. drift: one long stream (the clip looped), PSNR of the first vs the last window
        out["drift_db"], out["rtf"] = _drift(engine, speech[0], cfg, size)
        # 4. latency in a live session fed in real time (held-out speech, looped to latency_s)
        clip = make_clip(speech[0], cfg.identities[0], size=size, seed=cfg.seed, blinks=False)
        cond = avatar_conditions(engine, clip)
        first, latencies = asyncio.run(_live_session(engine, cond, np.concatenate(speech), cfg.latency_s))
        firsts = [first] + [asyncio.run(_live_session(engine, cond, speech[0], FIRST_FRAME_PROBE_S))[0]
                            for _ in range(cfg.first_frame_sessions - 1)]
        out["first_frame_s"] = round(float(np.median(firsts)), 3)
        out["first_frame_runs_s"] = [round(f, 3) for f in firsts]
        engine.settled.clear()  # an avatar no session has used: its first session settles the decoder itself
        new, _ = asyncio.run(_live_session(engine, cond, speech[0], FIRST_FRAME_PROBE_S))
        out["first_frame_new_avatar_s"] = round(new, 3)
        out["latency_ms"] = percentiles_ms(latencies)
    # 5. FAA: a two-face scene at twice the width, audio to the left face only
    out["faa_leak"] = _faa_leak(models, speech[0], cfg, size)
    out["model"] = models.name
    out["identities"] = list(cfg.identities)
    out["clips"] = len(speech)
    return out


def unit_starts(options, frames: int) -> list[int]:
    """Video frames at which a unit after the first starts, for EngineOptions `options`."""
    second, unit, _ = options.unit_geometry()
    starts = list(range(4 * second - 3, frames, 4 * unit))
    if options.mode == "causal" and second > 1:  # a first block shorter than the rest starts at frame 1
        starts.insert(0, 1)
    return starts


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
    frames, wall = asyncio.run(run_session(engine, avatar_conditions(engine, clip), long[None], keep=keep))
    pts = list(range(window)) + list(range(total - window, total))
    scores = [psnr(f, clip.frames[p % clip_frames]) for f, p in zip(frames, pts, strict=False)]
    return round(float(np.mean(scores[window:]) - np.mean(scores[:window])), 3), round(cfg.stream_s / wall, 3)


def _faa_leak(models, wav: np.ndarray, cfg: EvalConfig, size) -> float | None:
    pair_size = (size[0], 2 * size[1])
    silent = np.zeros_like(wav)
    clip = make_pair_clip(wav, silent, cfg.identities[0], cfg.identities[-1] + 1, size=pair_size,
                          seed=cfg.seed, blinks=False)
    with _engine(replace(models, frame_hw=pair_size, decoder_backend=None)) as engine:
        frames, _ = asyncio.run(run_session(engine, avatar_conditions(engine, clip), clip.audio))
    a = openings(frames, clip.mouth_boxes[0])
    b = openings(frames, clip.mouth_boxes[1])
    if a.var() < 1e-8:  # face A's mouth never moved: there is nothing to leak, the ratio is undefined
        return None
    return round(float(b.var() / a.var()), 4)


def held_out_speech(corpus: Path, clips: int, engine: str = "espeak-ng") -> list[np.ndarray]:
    """The first `clips` held-out clips of `engine` in a demo corpus (voices and sentences never trained on)."""
    from audio.io import read_audio
    from training.corpus import read_index

    chosen = [c for c in read_index(corpus) if c.split == "heldout" and c.engine == engine][:clips]
    if not chosen:
        raise ValueError(f"no held-out {engine} clips in {corpus}; build the corpus (`avatarcast train demo`) "
                         "or pass audio files")
    return [read_audio(corpus / c.path, sample_rate=MODEL_SAMPLE_RATE) for c in chosen]
