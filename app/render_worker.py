"""One audio file -> one mp4, with models loaded once: what every render backend runs (in this process,
in a worker process, or in a Ray actor).

    Renderer(settings)            load the models (`load_models`), start the engine, warm it up
    renderer.render(job, report)  audio -> frames (causal / overlap: an engine session; fusion: the whole
                                  clip at once) -> Mp4FileSink -> rename -> sidecar JSON; never raises:
                                  a bad input becomes a result with status "failed" and the error

The frames up to the one carrying the last input sample are written, with exactly the input's samples
(the last frame's padding is cut), so the audio track is the input audio at `sample_rate`. With
`speakers` > 1 (dialogue) every speaker has a track (app/render_tracks.py) that drives its own face of a
multi-face avatar, the shorter tracks padded with silence, and the audio track is their mix. The audio
is decoded as generation needs it (memory bounded by the feed-ahead, whatever the file's length),
after its declared length was checked against `max_duration_s`, which also stops a file whose header
understates it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from app.render_journal import write_json_atomic
from app.render_tracks import AudioFeed, SpeakerFeeds, open_tracks
from audio.align import group_by_latent, num_video_frames
from audio.io import audio_duration
from audio.pcm import MEDIA_SAMPLE_RATE, MODEL_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME
from audio.resample import PcmFormat, resample_audio
from audio.vad import detect_speech
from avatar.chunking import FusionOptions, generate_fused
from avatar.decoder import FrameDecoder, first_latent_samples, opens_moving
from avatar.engine import (
    AvatarEngine,
    EngineOptions,
    ModelBundle,
    pick_device,
    preset_options,
)
from avatar.generator import Conditions
from avatar.session import SessionOptions
from avatar.timeline import latent_voice_activity, voiced_frames
from avatar.types import (
    DEFAULT_FPS,
    AvatarFrame,
    SegmentEnd,
    SessionError,
    frame_sample_bounds,
    frames_for_samples,
)
from streaming.filesink import Mp4FileSink, remove_stale_partials

MODES = ("causal", "overlap", "fusion")
MODELS = {"auto": "the demo model when its weights are in the tree, else tiny",
          "tiny": "random TINY weights (32x32, no face: for tests and plumbing)",
          "demo": "the embedded demo model (app/demo_model: stylised faces, 128x128)"}
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_PREFIX = "demo:"
DUO_PREFIX = "duo:"  # duo:SEED: identities SEED and SEED + 1 of the demo face renderer, side by side
MAX_SPEAKERS = 8
SIDECAR_SUFFIX = ".render.json"
FEED_AHEAD_S = 10.0  # audio pushed ahead of generation (the session keeps at most 60 s buffered)
DEFAULT_MAX_DURATION_S = 4 * 3600.0  # a longer input is refused (--max-duration)
PROGRESS_INTERVAL_S = 0.1

ProgressFn = Callable[[int, int, int], None]  # (job index, frames done, frames total)


@dataclass(frozen=True)
class RenderSettings:
    """How every file of a batch is rendered. `output_key` holds the fields that change the output."""

    model: str = "tiny"
    mode: str = "causal"  # causal | overlap | fusion
    steps: int | None = None  # denoising steps; None: the preset's (avatar/engine.py PRESET_DEFAULTS; fusion 25)
    seed: int = 0
    fps: int = DEFAULT_FPS  # the audio front ends and the VAE geometry are built for 25 fps; not a user option
    sample_rate: int = MEDIA_SAMPLE_RATE  # of the AAC track
    crf: int = 18  # libx264 quality
    decoder: str = "auto"  # VAE decoder backend: auto | onnx | torch (how, not what: not in the key)
    device: str = "auto"
    max_duration_s: float = DEFAULT_MAX_DURATION_S  # longer inputs fail before decoding (not in the key)
    speakers: int = 1  # >1: one voice per face of a multi-face avatar (dialogue)

    def validate(self) -> RenderSettings:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; available: " +
                             ", ".join(f"{k} ({v})" for k, v in MODELS.items()))
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.fps != DEFAULT_FPS:
            raise ValueError(f"--fps {self.fps}: the models are built for {DEFAULT_FPS} fps only")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ValueError(f"--steps must be in 1..1000, got {self.steps}")
        if self.decoder not in ("auto", "onnx", "torch"):
            raise ValueError(f"--decoder must be auto, onnx or torch, not {self.decoder!r}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"--crf must be in 0..51, got {self.crf}")
        if not 1 <= self.speakers <= MAX_SPEAKERS:
            raise ValueError(f"--speakers must be in 1..{MAX_SPEAKERS}, got {self.speakers}")
        if not self.max_duration_s > 0:
            raise ValueError(f"--max-duration must be a positive number of seconds, got {self.max_duration_s}")
        PcmFormat(self.sample_rate)  # 8-96 kHz
        return self

    def output_key(self) -> dict:
        key = asdict(self)
        del key["decoder"], key["device"], key["max_duration_s"]
        if self.speakers == 1:  # the keys of one-speaker renders made before dialogue stay valid
            del key["speakers"]
        return key


@dataclass(frozen=True)
class RenderJob:
    index: int  # position in the batch (progress and results refer to it)
    audio: str
    output: str
    avatar: str  # portrait path, `avatar new` folder, demo:SEED or duo:SEED
    emotion: str | None = None  # emotion reference image (a name for demo:SEED and folder avatars)
    speaker_audio: tuple[str, ...] = ()  # one file per speaker (a manifest's audio_1, ...); empty: `audio`
    key: str = ""  # hash of the inputs' bytes + settings: a sidecar with the same key means done


def parse_avatar(spec: str) -> tuple[str, int | str]:
    """'demo:SEED' -> ('demo', SEED); 'duo:SEED' -> ('duo', SEED) (two faces); a folder (`avatarcast
    avatar new`) -> ('folder', path); anything else -> ('portrait', path)."""
    for kind, prefix in (("demo", DEMO_PREFIX), ("duo", DUO_PREFIX)):
        if spec.startswith(prefix):
            seed = spec[len(prefix):]
            if not seed.isdigit():
                raise ValueError(f"--avatar {spec!r}: expected {prefix}SEED with an integer seed")
            return kind, int(seed)
    return ("folder" if os.path.isdir(spec) else "portrait"), spec


def names_emotions(spec: str) -> bool:
    """Whether the avatar's emotions are given by name (demo:SEED, a folder) rather than as an image."""
    return parse_avatar(spec)[0] != "portrait"


def default_avatar(speakers: int = 1) -> str:
    """The built-in drawn avatar `avatarcast serve` uses as a demo:SEED spec; for two speakers its
    two-face "sketch-duo" as duo:SEED."""
    from app.avatars import BUILTIN_DUO_SEED, BUILTIN_SEED

    return f"{DEMO_PREFIX}{BUILTIN_SEED}" if speakers == 1 else f"{DUO_PREFIX}{BUILTIN_DUO_SEED}"


def demo_label(spec: str) -> str:
    kind, seed = parse_avatar(spec)
    if kind == "duo":
        label = f"{spec}: stylised identities {seed} (left) and {seed + 1} (right) of the demo face renderer"
    else:
        label = f"{spec}: stylised identity {seed} of the demo face renderer"
    return label + (" (the built-in avatar)" if spec in (default_avatar(1), default_avatar(2)) else "")


def resolve_model(name: str) -> str:
    """"auto" -> "demo" when the embedded weights are shipped, else "tiny"; other names unchanged."""
    if name == "auto":
        return "demo" if demo_model_available() else "tiny"
    return name


def load_models(name: str, device: str = "auto") -> ModelBundle:
    """The models `render` uses, by name: the one place to plug in the embedded demo model."""
    name = resolve_model(name)
    if name == "tiny":
        return ModelBundle.random("tiny", "tiny", seed=0, device=str(pick_device(device)))
    if name == "demo":
        return load_demo_models(DEMO_MODEL_DIR, device)
    raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")


def demo_model_available(folder: Path = DEMO_MODEL_DIR, vae: Path | None = None) -> bool:
    """The folder's DiT core and LoRA exist, and its VAE (or `vae`, another VAE file)."""
    folder = Path(folder)
    vae_file = Path(vae) if vae is not None else folder / "vae.safetensors"
    return all(p.exists() for p in (folder / "model.safetensors", folder / "lora.safetensors", vae_file))


def load_demo_models(folder: Path = DEMO_MODEL_DIR, device: str = "auto", vae: Path | None = None) -> ModelBundle:
    """The shipped demo model: DiT core + its LoRA (merged at load) + the DEMO VAE + mel features.
    `vae`: another VAE file than the folder's (a model still in training)."""
    from audio.features.mel import MelConfig, MelFeatures
    from avatar.domain import DEMO_DOMAIN
    from models.config import VAE_DEMO_SIZE
    from models.loading import load_dit
    from models.vae_loading import load_vae

    if not demo_model_available(folder, vae):
        raise FileNotFoundError(f"{folder}: the demo model's weights (model/lora/vae .safetensors) are missing")
    dev = pick_device(device)
    dit, _ = load_dit(folder, merge_lora=True, device=dev)
    vae = load_vae(vae if vae is not None else Path(folder) / "vae.safetensors").to(dev)
    features = MelFeatures(MelConfig(n_mels=dit.cfg.audio_dim,
                                      lead_samples=SAMPLES_PER_VIDEO_FRAME * dit.cfg.audio_lead_frames))
    return ModelBundle("demo", dit.eval(), vae.eval(), features, frame_hw=VAE_DEMO_SIZE, checkpoint=str(folder),
                       domain=DEMO_DOMAIN)  # drawn faces only: a photo gets a warning (avatar/domain.py)


# ---- resume sidecars ----------------------------------------------------------------------------------
def sidecar_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def read_sidecar(output: str | Path) -> dict | None:
    try:
        return json.loads(sidecar_path(output).read_text())
    except (OSError, ValueError):
        return None


# ---- the worker -------------------------------------------------------------------------------------------
def open_input_audio(path: str, settings: RenderSettings) -> tuple[AudioFeed, float | None]:
    """A one-speaker input checked and opened (see `open_job_audio`): (its feed, its declared length)."""
    feeds, declared = open_job_audio(RenderJob(0, path, "", ""), replace(settings, speakers=1))
    return feeds.feeds[0], declared


def open_job_audio(job: RenderJob, settings: RenderSettings) -> tuple[SpeakerFeeds, float | None]:
    """A job's audio checked and opened for rendering: (one feed per speaker, decoding as it is pulled,
    the first FEED_AHEAD_S (fusion: all of it) already decoded; the longest length the headers declare).
    Each file's declared length is checked against max_duration_s before any decoding.
    AudioReadError / ValueError name the file."""
    declared = None
    for path in job.speaker_audio or (job.audio,):
        length = audio_duration(path)  # from the header, nothing decoded yet
        if length is not None and length > settings.max_duration_s:
            raise ValueError(f"{path}: the audio lasts {length:.1f} s, more than --max-duration "
                             f"{settings.max_duration_s:g} s")
        declared = length if declared is None or (length or 0) > declared else declared
    feeds = open_tracks(job.audio, job.speaker_audio, settings.speakers, settings.sample_rate,
                        settings.max_duration_s)
    # fusion denoises the whole clip at once: all of it (within max_duration_s)
    feeds.pull_until(None if settings.mode == "fusion" else int(FEED_AHEAD_S * settings.sample_rate))
    for feed, source in zip(feeds.feeds, feeds.sources, strict=True):
        if feed.ended and feed.decoded == 0:
            raise ValueError(f"{source}: the audio is empty (0 samples)")
    return feeds, declared


class _Throttle:
    """Calls `fn(index, done, total)` at most every PROGRESS_INTERVAL_S, and always for the last frame."""

    def __init__(self, fn: ProgressFn | None, index: int) -> None:
        self.fn, self.index, self.last = fn, index, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.fn is not None and (done >= total or now - self.last >= PROGRESS_INTERVAL_S):
            self.last = now
            self.fn(self.index, done, total)


class Renderer:
    """Models and engine loaded once; `render` turns one job into an mp4 and a result dict.

    A multi-face avatar is generated at one face's frame size per face, side by side (128 x 256 for two
    faces with the demo model: the two-person scenes its face-aware audio adapter was trained on), by a
    second engine on the same weights, started when the first such avatar comes."""

    def __init__(self, settings: RenderSettings, threads: int | None = None) -> None:
        self.settings = s = settings.validate()
        if threads:
            torch.set_num_threads(threads)
        self.models = load_models(s.model, s.device)
        defaults = preset_options(self.models.dit.cfg.name)
        causal, overlap = defaults.causal, defaults.overlap
        if s.steps is not None:  # causal: s evenly spaced timesteps from 1000 (4 -> 1000, 750, 500, 250)
            causal = replace(causal, steps=tuple(round(1000 * (s.steps - i) / s.steps) for i in range(s.steps)))
            overlap = replace(overlap, steps=s.steps)
        self.fusion = FusionOptions() if s.steps is None else FusionOptions(steps=s.steps)
        # fusion is offline (no session), but the engine still prepares avatars and builds the decoder
        streaming = s.mode != "fusion"
        self.options: EngineOptions = replace(
            defaults, mode=s.mode if streaming else "causal", causal=causal, overlap=overlap, decoder=s.decoder,
            max_sessions=1, warmup=streaming)
        self.engine = AvatarEngine(self.models, self.options).start()
        self._engines = {1: self.engine}  # by faces in the frame
        self._conditions: dict[tuple[str, str | None], tuple[AvatarEngine, Conditions]] = {}
        self._warnings: dict[tuple[str, str | None], str] = {}  # avatars out of the model's domain

    def close(self) -> None:
        for engine in self._engines.values():
            engine.stop()

    def engine_for(self, faces: int) -> AvatarEngine:
        """The engine that generates frames for `faces` faces side by side (started on first use)."""
        if faces not in self._engines:
            h, w = self.models.frame_hw
            models = replace(self.models, frame_hw=(h, w * faces), decoder_backend=None)  # the decoder is per size
            self._engines[faces] = AvatarEngine(models, self.options).start()
        return self._engines[faces]

    def render(self, job: RenderJob, on_progress: ProgressFn | None = None) -> dict:
        """Render one job; failures (unreadable audio, bad portrait, encoder errors) become the result."""
        t0 = time.perf_counter()
        result = {"index": job.index, "input": job.audio, "output": job.output, "avatar": job.avatar,
                  "status": "failed", "duration_s": None, "frames": None, "wall_s": None, "rtf": None, "error": None}
        if self.settings.speakers > 1:
            result["speakers"] = self.settings.speakers
        try:
            frames, samples, tracks = self._render(job, _Throttle(on_progress, job.index))
            wall = time.perf_counter() - t0
            duration = samples / self.settings.sample_rate
            done = {"duration_s": round(duration, 3), "frames": frames, "wall_s": round(wall, 3),
                    "rtf": round(duration / wall, 3)}  # rtf: media seconds per wall second (>1: faster than real time)
            if self.settings.speakers > 1:
                done.update(_dialogue_fields(tracks))
            warnings = [w for w in (self._warnings.get((job.avatar, job.emotion)), done.get("warning")) if w]
            if warnings:  # the portrait is out of the model's domain, and/or a speaker was padded
                done["warning"] = "; ".join(warnings)
            write_json_atomic(sidecar_path(job.output), {"key": job.key, "settings": self.settings.output_key(),
                                                         "emotion": job.emotion, "result": done})
        except Exception as exc:  # one bad input must not stop the batch
            result.update(error=f"{type(exc).__name__}: {exc}", wall_s=round(time.perf_counter() - t0, 3))
            return result
        return {**result, **done, "status": "done"}

    def _render(self, job: RenderJob, progress: _Throttle) -> tuple[int, int, list[dict]]:
        s = self.settings
        out = Path(job.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)  # left by a killed run
        sidecar_path(out).unlink(missing_ok=True)  # the output is about to change
        feeds, declared = open_job_audio(job, s)
        engine, cond = self.prepared(job.avatar, job.emotion)
        estimate = frames_for_samples(int((declared or 0) * s.sample_rate), s.sample_rate, s.fps)
        written = 0
        with Mp4FileSink(out, video_options={"crf": str(s.crf), "preset": "medium"}) as sink:
            def emit(frame: AvatarFrame) -> None:
                nonlocal written
                start, end = frame_sample_bounds(frame.pts, s.sample_rate, s.fps)
                # the last frame's padding is not input audio (it comes after every sample has decoded)
                keep = max(0, min(end, feeds.decoded) - start) if feeds.ended else frame.audio.size
                sink.write(frame if keep == frame.audio.size else replace(frame, audio=frame.audio[:keep]))
                written += 1

            if s.mode == "fusion":
                pcm = feeds.take(feeds.decoded)
                self._fused(engine, cond, pcm, frames_for_samples(pcm.shape[1], s.sample_rate, s.fps), emit,
                            progress)
            else:
                asyncio.run(self._streamed(engine, cond, feeds, estimate, emit, progress))
            total = frames_for_samples(feeds.decoded, s.sample_rate, s.fps)
            if written != total:
                raise RuntimeError(f"{job.audio}: generated {written} frames, the audio needs {total}")
        return written, feeds.decoded, feeds.tracks()

    async def _streamed(self, engine: AvatarEngine, cond: Conditions, feeds: SpeakerFeeds, estimate: int, emit,
                        progress: _Throttle) -> None:
        """An engine session (one audio stream per speaker), fed at most FEED_AHEAD_S ahead of generation
        (decoding as it goes), read until its SegmentEnd. `estimate`: the frames the header's length needs
        (progress only)."""
        s = self.settings
        session = engine.open_session(cond, SessionOptions(realtime=False, sample_rate=s.sample_rate, seed=s.seed,
                                                           speakers=feeds.speakers))
        ahead, segment_ended = int(FEED_AHEAD_S * s.sample_rate), False

        def top_up(next_frame: int) -> None:
            nonlocal segment_ended
            target = frame_sample_bounds(next_frame, s.sample_rate, s.fps)[0] + ahead
            chunk = feeds.take(target - feeds.taken)  # (speakers, m): the tracks stay in step
            if chunk.shape[1]:
                for speaker, pcm in enumerate(chunk):
                    session.push_audio(pcm, s.sample_rate, speaker=speaker)
            if feeds.ended and feeds.taken == feeds.decoded and not segment_ended:
                session.end_segment()
                segment_ended = True

        try:
            top_up(0)
            done = 0
            async for item in session:
                if isinstance(item, AvatarFrame):
                    emit(item)
                    done += 1
                    total = frames_for_samples(feeds.decoded, s.sample_rate, s.fps) if feeds.ended else estimate
                    progress(done, max(total, done))
                    top_up(item.pts + 1)
                elif isinstance(item, SegmentEnd):
                    return
                elif isinstance(item, SessionError):
                    raise RuntimeError(f"generation failed: {item.message}")
        finally:
            session.close()

    def _fused(self, engine: AvatarEngine, cond: Conditions, pcm: np.ndarray, total: int, emit,
               progress: _Throttle) -> None:
        """Position-shift fusion over the whole clip: offline features, one fused denoise, streamed decode.
        pcm: (speakers, n); several speakers drive their faces (FAA) and, mixed, the shared audio path,
        as a session does."""
        s, m = self.settings, engine.models
        num_latents = 1 + math.ceil((total - 1) / 4)  # 1 + 4k video frames >= total
        grouped, activity = [], []
        for track in pcm:
            wav16k = resample_audio(track, PcmFormat(s.sample_rate), out_rate=MODEL_SAMPLE_RATE)
            feats = m.features(wav16k, num_video_frames(num_latents))  # (1 + 4k, D)
            grouped.append(torch.from_numpy(np.ascontiguousarray(group_by_latent(feats))))  # (N, 4, D)
            if len(pcm) > 1:  # face-aware guidance: which voices speak, per latent
                activity.append(latent_voice_activity(voiced_frames(detect_speech(wav16k)), 0, num_latents))
        audio = torch.stack(grouped).mean(0)[None].to(m.dit.device)  # (1, N, 4, D)
        face_audio = torch.stack(grouped)[None].to(m.dit.device) if len(grouped) > 1 else None  # (1, S, N, 4, D)
        face_activity = torch.from_numpy(np.stack(activity))[None] if activity else None  # (1, S, N)
        mix = np.clip(pcm.sum(0), -1, 1) if len(pcm) > 1 else pcm[0]
        # progress: DiT calls (steps x windows) then decoded latents, shown as a share of the frames
        window = min(self.fusion.window_frames, num_latents)
        work = self.fusion.steps * math.ceil(num_latents / window) + num_latents
        done = 0

        def tick(*_):
            nonlocal done
            done += 1
            progress(min(total, total * done // work), total)

        hook = m.dit.register_forward_hook(tick)
        try:
            latents = generate_fused(m.dit, cond, audio, num_latents, self.fusion, seed=s.seed,
                                     face_audio=face_audio, face_activity=face_activity)  # (1, 16, N, h, w)
        finally:
            hook.remove()
        decoder = FrameDecoder(m.decoder_backend or m.vae, *cond.latent_hw, deflicker=engine.options.deflicker)
        moving = num_latents > 1 and opens_moving([mix[first_latent_samples(s.sample_rate, s.fps)]], cond.faces)
        pts = 0
        for j in range(num_latents):
            if j == 0 and moving:  # frame 0: the settled reference; latent 1 moves from it
                decoder.settle(latents[:, :, :1])
                images = decoder.open_still()
            elif j == 0 and num_latents > 1:  # frame 0: the decoder opened at latent 1 held, as a session's
                images = decoder.open_at(latents[:, :, 1:2])
            else:
                images = decoder.decode(latents[:, :, j:j + 1])  # 1 frame for latent 0, then 4
            for image in images:
                if pts < total:
                    a, b = frame_sample_bounds(pts, s.sample_rate, s.fps)
                    chunk = np.zeros(b - a, np.float32)
                    chunk[:max(0, min(b, mix.size) - a)] = mix[a:b]
                    emit(AvatarFrame(video=image, audio=chunk, sample_rate=s.sample_rate, pts=pts, fps=s.fps))
                pts += 1
            tick()

    def prepared(self, avatar: str, emotion: str | None) -> tuple[AvatarEngine, Conditions]:
        """(the engine for the avatar's faces, its conditions) for a portrait, an `avatar new` folder, or a
        demo:SEED / duo:SEED stylised avatar (prepared and cached on disk). Its faces must match --speakers."""
        key = (avatar, emotion)
        if key not in self._conditions:
            kind, value = parse_avatar(avatar)
            faces = avatar_faces(avatar, self.settings.speakers)
            if faces != self.settings.speakers:
                raise ValueError(_faces_mismatch(avatar, faces, self.settings.speakers))
            engine = self.engine_for(faces)
            if kind in ("demo", "duo", "folder"):  # stylised identities or an `avatar new` folder: emotions by name
                from app.avatars import (
                    EMOTIONS,
                    prepare_avatar_dir,
                    prepare_stylised,
                    stylised_avatar,
                )

                if kind == "folder":  # the folder's portrait is its neutral face
                    prepared = prepare_avatar_dir(engine, Path(value), avatar_cache_dir())
                    names = ("neutral", *sorted(prepared.emotion_latents))
                else:
                    prepared, names = prepare_stylised(engine, stylised_avatar(int(value), faces=faces),
                                                       cache_dir=avatar_cache_dir()), EMOTIONS
                if emotion and emotion not in names:
                    raise ValueError(f"--emotion for {avatar} is one of {', '.join(names)}, not {emotion!r}")
                emotion = emotion if emotion in prepared.emotion_latents else None
            else:  # a photo: the detector finds --speakers faces, ordered left to right
                emotions = {"emotion": Path(emotion)} if emotion else None
                prepared = engine.prepare_avatar(Path(value), expected_faces=faces, emotion_images=emotions,
                                                 cache_dir=avatar_cache_dir())
                emotion = "emotion" if emotion else None
            self._conditions[key] = (engine, engine.conditions(prepared, emotion))
            if prepared.warning:
                self._warnings[key] = prepared.warning
        return self._conditions[key]

    def conditions(self, avatar: str, emotion: str | None) -> Conditions:
        """The avatar's conditions (see `prepared`)."""
        return self.prepared(avatar, emotion)[1]


def avatar_faces(spec: str, speakers: int) -> int:
    """How many faces an avatar has: 1 for demo:SEED, 2 for duo:SEED, the boxes of a folder's avatar.json;
    a photo is taken to have `speakers` faces (the detector must find them)."""
    kind, value = parse_avatar(spec)
    if kind == "folder":
        from app.avatars import AVATAR_SPEC, read_face_boxes

        try:
            return len(read_face_boxes(json.loads((Path(value) / AVATAR_SPEC).read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{value}: not an avatar folder ({type(exc).__name__}: {exc})") from None
    return {"demo": 1, "duo": 2}.get(kind, speakers)


def _faces_mismatch(avatar: str, faces: int, speakers: int) -> str:
    has = f"avatar {avatar} has {faces} face{'s' if faces > 1 else ''}"
    if faces < speakers:
        return f"{has}, --speakers {speakers} needs {speakers}"
    return f"{has}: pass --speakers {faces} with a voice per face (one voice cannot drive {faces} faces)"


def _dialogue_fields(tracks: list[dict]) -> dict:
    """The manifest's record of a dialogue: every speaker's track, and a warning when some were padded."""
    padded = [t for t in tracks if t["padded_s"] > 0]
    fields: dict = {"speakers": len(tracks), "tracks": tracks}
    if padded:
        fields["warning"] = "; ".join(f"speaker {t['speaker']} ({t['input']}) is {t['padded_s']} s shorter than "
                                      "the longest track: padded with silence" for t in padded)
    return fields


def avatar_cache_dir() -> Path:
    """Prepared portraits are cached beside the ONNX exports: $AVATARCAST_CACHE or ~/.cache/avatarcast."""
    root = os.environ.get("AVATARCAST_CACHE") or Path.home() / ".cache" / "avatarcast"
    return Path(root) / "avatars"
