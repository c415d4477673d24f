"""The engine: models loaded once per process, a worker thread and a decode thread, many sessions.

Generation never runs on the event loop. The worker picks, among sessions with work ready, the one
whose next frame is due first (earliest deadline), and with `max_batch` > 1 the other ready sessions
whose next blocks can share its DiT call (causal mode: one batched call per denoising pass, each session
on its own KV cache); it generates their blocks and hands them, in order, to the decode thread through a
bounded queue (`decode_ahead` blocks; when it is full the worker waits: nothing is dropped), so the DiT
works on block n+1 while the VAE decodes block n. A failure inside a session closes that session with
an error item while the others continue; a batched call that fails is re-run one session at a time, so
only the session at fault gets the error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import itertools
import logging
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from audio.features.base import AudioFeatures
from audio.pcm import SAMPLES_PER_VIDEO_FRAME
from avatar.chunking import LiveFusionGenerator, LiveFusionOptions, OverlapGenerator, OverlapOptions
from avatar.decoder import Deflicker, FrameDecoder, SettledReferences
from avatar.domain import ModelDomain, roundtrip_psnr
from avatar.faces import make_detector
from avatar.generator import CausalGenerator, CausalOptions, Conditions
from avatar.presets import PRESET_DEFAULTS
from avatar.reference import PreparedAvatar, prepare_avatar
from avatar.session import AvatarSession, GeneratedUnit, SessionOptions
from avatar.types import DEFAULT_FPS
from models.config import VIDEO_FRAMES_PER_LATENT
from models.dit import WanDiT
from models.vae import WanVAE

log = logging.getLogger(__name__)


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ModelBundle:
    """Weights shared by every session: DiT, VAE (encoder for avatars, decoder backend), audio front end."""

    name: str
    dit: WanDiT
    vae: WanVAE
    features: AudioFeatures
    frame_hw: tuple[int, int] = (128, 128)  # pixels the model generates
    decoder_backend: object | None = None  # OnnxVaeDecoder when exported; the torch VAE otherwise
    checkpoint: str | None = None  # where the weights were read from; None: random weights
    domain: ModelDomain | None = None  # what it was trained to draw (demo: drawn faces); None: anything

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) RGB -> normalised latent (1, 16, 1, H/8, W/8)."""
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.dit.device, torch.float32)
        x = (x / 127.5 - 1).permute(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W) in [-1, 1]
        return self.vae.encode(x)

    @functools.cached_property
    def encoder_id(self) -> str:
        """Identifies the VAE encoder weights, so cached avatar latents are never reused across VAEs."""
        h = hashlib.sha256()
        for name, t in sorted(self.vae.state_dict().items()):
            if name.startswith(("encoder.", "conv1.")):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"{self.vae.cfg.name}:{h.hexdigest()[:16]}"

    @classmethod
    def random(cls, dit_preset: str = "tiny", vae_preset: str = "tiny", seed: int = 0,
               device: str = "cpu") -> ModelBundle:
        """Untrained weights (tests, benchmarks): every module perturbed so nothing is an exact no-op."""
        from audio.features.mel import MelConfig, MelFeatures
        from models.config import dit_preset as dit_cfg, vae_preset as vae_cfg

        torch.manual_seed(seed)
        dit, vae = WanDiT(dit_cfg(dit_preset)), WanVAE(vae_cfg(vae_preset))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        features = MelFeatures(MelConfig(n_mels=dit.cfg.audio_dim or 80))
        size = (32, 32) if vae_preset == "tiny" else (128, 128)
        return cls(f"random-{dit_preset}", dit.eval().to(device), vae.eval().to(device), features, frame_hw=size)

    def check(self) -> None:
        if self.dit.cfg.audio_dim and self.dit.cfg.audio_dim != self.features.feature_dim:
            raise ValueError(f"{self.name}: the DiT expects {self.dit.cfg.audio_dim}-dim audio features, "
                             f"the front end gives {self.features.feature_dim}")
        if (lead := self.dit.cfg.audio_lead_frames) * SAMPLES_PER_VIDEO_FRAME != self.features.lead_samples:
            raise ValueError(f"{self.name}: the DiT hears audio {lead} frame(s) early, its front end "
                             f"{self.features.lead_samples} samples")
        if self.vae.cfg.z_dim != self.dit.cfg.out_dim:
            raise ValueError(f"{self.name}: VAE has {self.vae.cfg.z_dim} latent channels, DiT {self.dit.cfg.out_dim}")


@dataclass(frozen=True)
class EngineOptions:
    fps: int = DEFAULT_FPS
    mode: str = "causal"  # "causal" (KV cache, live default), "overlap" or "fusion" (bidirectional checkpoints)
    causal: CausalOptions = field(default_factory=CausalOptions)
    overlap: OverlapOptions = field(default_factory=OverlapOptions)
    fusion: LiveFusionOptions = field(default_factory=LiveFusionOptions)
    max_sessions: int = 4
    decoder: str = "auto"  # "onnx" (ONNX Runtime, CUDA EP where present), "torch", or "auto" (onnx, else torch)
    warmup: bool = True  # run the real path once at start, so the first user does not pay for it
    max_batch: int = 1  # causal mode (others run one session at a time): ready sessions whose next blocks share
    # one batched DiT call. 1 by default: on 2 CPU cores the demo DiT is compute-bound and 4 sessions batched ran
    # only ~8% faster than one at a time (`python -m benchmarks.bench_engine --batched`); on an H200 3.1x faster.
    decode_ahead: int = 1  # generated blocks waiting for the decode thread (the worker waits beyond); 0: none,
    # each block is generated and decoded in turn on the worker
    decode_threads: int | None = None  # ONNX Runtime intra-op threads of the decoder. None: 1 beside the decode
    # thread (sleeping when idle, next to the DiT; demo, 2 cores: real-time factor 2.07 vs 1.39 in turn), else `threads`
    poll_s: float = 0.005  # how often the worker re-checks live deadlines when idle
    session_prefix: str = "s"  # session ids are prefix + a counter: engines sharing a report need their own
    emotion_as_reference: bool = False  # a one-face avatar's chosen emotion image is also its reference (the
    # character image the DiT keeps): the demo model keeps its reference's expression as trained, where
    # its AEM alone moved the expression by ~5 % of the teacher's (training: reference_from_emotion)
    emotion_strength: float = 1.0  # a one-face avatar's emotion reference in latent space: portrait + this x
    # (emotion image - portrait); both are framed alike, so above 1 it pushes the expression past the image's
    max_lateness_s: float = 1.0  # overload: a session further behind than this is no more urgent than one
    # exactly this late, and among those the least recently served goes first. Plain earliest-deadline-first
    # let sessions that fell behind keep the earliest deadlines for good: a new call got no frame at all
    deflicker: Deflicker | None = None  # a latent's first frame eased where the face is still (FrameDecoder)
    threads: int | None = None  # compute threads (torch intra-op, ONNX Runtime intra-op); None: the libraries'
    # defaults (every core). A live server wants fewer: on 2 cores, 4 calls' codecs and a 2-thread torch fight
    # over the cores and denoising runs 1.6x slower than with 1 thread

    def unit_geometry(self) -> tuple[int, int, int]:
        """(latents the irregular start ends at, new latents per later unit, lookahead latents) of `mode`:
        units of the regular size follow from that latent on. Causal: the reference latent alone, and a
        first block when it is shorter than the rest."""
        c = self.causal
        return {"causal": (1 if c.first_block == c.block_frames else 1 + c.first_block, c.block_frames, 0),
                "overlap": (self.overlap.chunk_frames, self.overlap.chunk_frames - self.overlap.overlap_frames, 0),
                "fusion": (1 + self.fusion.block_frames, self.fusion.block_frames, self.fusion.lookahead_frames),
                }[self.mode]


def preset_options(preset: str, **overrides) -> EngineOptions:
    """EngineOptions with the preset's generation defaults; keyword arguments override any field."""
    if preset not in PRESET_DEFAULTS:
        raise KeyError(f"no engine defaults for DiT preset {preset!r}; known: {', '.join(PRESET_DEFAULTS)}")
    return replace(EngineOptions(), **{**PRESET_DEFAULTS[preset], **overrides})


DEFAULT_MOTION = 0.25  # head-motion intensity for models with a motion condition: a little natural movement


class EngineFull(RuntimeError):
    pass


class AvatarEngine:
    def __init__(self, models: ModelBundle, options: EngineOptions = EngineOptions()) -> None:
        models.check()
        if options.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {options.max_batch}")
        if not options.emotion_strength > 0:
            raise ValueError(f"emotion_strength must be positive (1: the emotion image as it is), "
                             f"not {options.emotion_strength}")
        if options.fps != DEFAULT_FPS:
            raise ValueError(f"the audio front ends and the VAE geometry are built for {DEFAULT_FPS} fps")
        self.models, self.options = models, options
        if options.mode == "causal":
            self.generator = CausalGenerator(models.dit, options.causal)
        elif options.mode == "overlap":
            self.generator = OverlapGenerator(models.dit, options.overlap)
        elif options.mode == "fusion":
            self.generator = LiveFusionGenerator(models.dit, options.fusion)
        else:
            raise ValueError(f"unknown generation mode {options.mode!r}; use 'causal', 'overlap' or 'fusion' "
                             "(the exact offline fusion loop is avatar.chunking.generate_fused)")
        self.sessions: dict[str, AvatarSession] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decode_thread: threading.Thread | None = None
        self.stopped_because: str | None = None  # set when a thread of the engine died
        self._decode_jobs: queue.Queue[GeneratedUnit] = queue.Queue(maxsize=max(1, options.decode_ahead))
        self._ids = itertools.count(1)
        self.failures = 0
        self._served: dict[str, float] = {}  # session id -> when the worker last took its block (its own)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # DiT calls per batch size
        self.decoder_provider = "torch"
        self.warmup_ms = 0.0
        self.settled = SettledReferences()  # per reference latent: the decoder its sessions open from

    # ---- lifecycle ----------------------------------------------------------------------------
    def _build_decoder(self) -> None:
        """The streaming decoder backend for the model's resolution (ONNX export is cached on disk)."""
        choice = self.options.decoder
        if choice not in ("auto", "onnx", "torch"):
            raise ValueError(f"decoder must be 'auto', 'onnx' or 'torch', not {choice!r}")
        self.decoder_provider = "torch"
        if choice == "torch" or self.models.decoder_backend is not None:
            if self.models.decoder_backend is not None:
                self.decoder_provider = getattr(self.models.decoder_backend, "provider", "torch")
            return
        if choice == "auto" and next(self.models.vae.parameters()).device.type == "cuda" and not _ort_has_cuda():
            # ONNX Runtime's CPU provider next to a GPU VAE is ~5x slower (H200, demo model: 4 batched
            # sessions 38 vs 361 frames/s): decode on the GPU with torch unless onnxruntime-gpu is there
            log.info("decoding with torch on the GPU: this ONNX Runtime has no CUDA provider")
            return
        from models.onnx_vae import OnnxVaeDecoder

        h, w = (x // self.models.vae.cfg.spatial_factor for x in self.models.frame_hw)
        kwargs = {}
        pipelined = self.options.decode_ahead > 0
        threads = self.options.decode_threads or (1 if pipelined else self.options.threads)
        if threads is not None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            if pipelined:  # its idle workers must not spin on cores the DiT is using
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            kwargs["session_options"] = so
        try:
            backend = OnnxVaeDecoder.from_vae(self.models.vae, h, w, **kwargs)
        except Exception as exc:
            if choice == "onnx":
                raise
            log.warning("ONNX decoder unavailable (%s: %s); decoding with torch", type(exc).__name__, exc)
            return
        self.models.decoder_backend = backend
        self.decoder_provider = backend.provider

    @torch.no_grad()
    def warmup(self) -> float:
        """One reference prefill + one block + their decode on a throwaway state. Returns ms."""
        t0, m = time.perf_counter(), self.models
        h, w = (x // m.vae.cfg.spatial_factor for x in m.frame_hw)
        cond = Conditions(reference=torch.zeros(1, m.vae.cfg.z_dim, 1, h, w, device=m.dit.device))
        state, decoder = self.generator.init_state(cond), FrameDecoder(m.decoder_backend or m.vae, h, w)
        for _ in range(2):
            unit = self.generator.next_unit(state)
            n = unit.audio_count
            audio = (torch.zeros(1, n, VIDEO_FRAMES_PER_LATENT, m.dit.cfg.audio_dim, device=m.dit.device)
                     if m.dit.cfg.audio_dim else None)
            decoder.decode(self.generator.generate_unit(state, audio))
        self.warmup_ms = (time.perf_counter() - t0) * 1e3
        return self.warmup_ms

    def start(self) -> AvatarEngine:
        if self._thread is None:
            if self.options.threads is not None:
                if self.options.threads < 1:
                    raise ValueError(f"threads must be at least 1, not {self.options.threads}")
                torch.set_num_threads(self.options.threads)  # process-wide: the engine owns the compute
            self._build_decoder()
            if self.options.warmup:
                self.warmup()
            self._stop.clear()
            if self.options.decode_ahead > 0:  # first: the worker hands blocks to it from its first block on
                self._decode_thread = threading.Thread(target=self._supervised, args=(self._run_decode, "decode"),
                                                       name="avatar-decode", daemon=True)
                self._decode_thread.start()
            self._thread = threading.Thread(target=self._supervised, args=(self._run, "worker"),
                                            name="avatar-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._decode_thread):
            if thread is not None:
                thread.join(timeout=30)
        self._thread = self._decode_thread = None
        for s in list(self.sessions.values()):
            s.close()
        self.sessions.clear()

    @property
    def running(self) -> bool:
        """Its worker thread (and decode thread, when it has one) is alive and none has died: what a health
        check asks. A dying thread records why before it fails the sessions, so a call ended by its death
        never sees the engine still running while that thread unwinds."""
        return self.stopped_because is None and self._thread is not None and self._thread.is_alive() and \
            (self._decode_thread is None or self._decode_thread.is_alive())

    def __enter__(self) -> AvatarEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- sessions -----------------------------------------------------------------------------
    def open_session(self, cond: Conditions, options: SessionOptions = SessionOptions(),
                     loop: asyncio.AbstractEventLoop | None = None) -> AvatarSession:
        """Open a session (call from the event loop that will iterate it)."""
        loop = loop or asyncio.get_running_loop()
        if self.stopped_because is not None:
            raise EngineFull(self.stopped_because)
        with self._lock:
            live = [s for s in self.sessions.values() if not s.closed]
            if len(live) >= self.options.max_sessions:
                raise EngineFull(f"{len(live)} sessions open; the limit is {self.options.max_sessions}")
            sid = f"{self.options.session_prefix}{next(self._ids)}"
            h, w = cond.latent_hw
            backend = self.models.decoder_backend or self.models.vae
            decoder = FrameDecoder(backend, h, w, self.settled, self.options.deflicker)
            session = AvatarSession(sid, self.generator, cond, decoder, self.models.features, self.options.fps,
                                    options, loop, wake=self._wake.set)
            self.sessions[sid] = session
        self._wake.set()
        return session

    def prepare_avatar(self, source, *, expected_faces: int = 1, emotion_images: dict | None = None,
                       detector=None, cache_dir=None) -> PreparedAvatar:
        """A portrait (path or bytes) -> cropped image, face masks on the token grid, latents (cached).
        With a model domain, one VAE decode of the reference checks the portrait against it: out of the
        domain, the avatar carries a warning (logged here), and is used all the same."""
        avatar = prepare_avatar(source, self.models.frame_hw, detector or make_detector(),
                                encode_image=self.models.encode_image, expected_faces=expected_faces,
                                emotion_images=emotion_images, cache_dir=cache_dir,
                                encoder_id=self.models.encoder_id)
        domain = self.models.domain
        if domain is None or avatar.reference_latent is None:
            return avatar
        psnr = roundtrip_psnr(self.models.vae, avatar.image, avatar.reference_latent)
        warning = domain.warning(psnr, avatar.source_name)
        if warning is not None:
            log.warning("%s", warning)
        return replace(avatar, warning=warning)

    def conditions(self, avatar: PreparedAvatar, emotion: str | None = None,
                   motion: float | None = None) -> Conditions:
        """What the DiT conditions on for this avatar (and one of its emotion references). `motion`
        (0 still .. 1) only matters to models trained with a motion condition; they get DEFAULT_MOTION."""
        dev = self.models.dit.device
        if avatar.size_hw != tuple(self.models.frame_hw):
            raise ValueError(f"avatar prepared at {avatar.size_hw}, the model generates {self.models.frame_hw}")
        if emotion is not None and emotion not in avatar.emotion_latents:
            raise ValueError(f"no emotion reference {emotion!r}; this avatar has {sorted(avatar.emotion_latents)}")
        if motion is not None and not 0.0 <= motion <= 1.0:
            raise ValueError(f"motion must be in [0, 1], got {motion}")
        if self.models.dit.cfg.motion_condition and motion is None:
            motion = DEFAULT_MOTION
        masks = torch.from_numpy(np.array(avatar.masks))[None].to(dev)  # (1, chars, h/2, w/2)
        reference = avatar.reference_latent.to(dev)
        emotion_latent = avatar.emotion_latents[emotion].to(dev) if emotion else None
        if emotion_latent is not None and avatar.num_characters == 1 and self.options.emotion_strength != 1.0:
            emotion_latent = reference + self.options.emotion_strength * (emotion_latent - reference)
        if emotion_latent is not None and self.options.emotion_as_reference and avatar.num_characters == 1:
            # one face: its emotion image is framed as the portrait is (cropped around its face), so it can
            # stand in for it; a scene's emotion images are cropped around one face and cannot
            return Conditions(reference=emotion_latent, face_mask=masks, emotion=emotion_latent, motion=motion,
                              neutral=reference)
        return Conditions(reference=reference, face_mask=masks, emotion=emotion_latent, motion=motion)

    def settle(self, cond: Conditions) -> None:
        """Settle the decoder on `cond`'s reference ahead of its first session, which then opens sooner."""
        self.settled.get(self.models.decoder_backend or self.models.vae, cond.reference[:, :, :1], cond.latent_hw)

    def close_session(self, session_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is not None:
            s.close()

    # ---- the worker ---------------------------------------------------------------------------
    def _supervised(self, body: Callable[[], None], name: str) -> None:
        """Run one of the engine's threads. If it dies, every session fails with why (the SessionError a
        dead worker process gives its calls: no call stays connected to a stopped engine), new sessions
        are refused, and `running` turns False (health checks report it)."""
        try:
            body()
        except BaseException as exc:
            self.stopped_because = f"the engine's {name} thread stopped ({type(exc).__name__}: {exc})"
            log.critical("%s; failing every session", self.stopped_because, exc_info=exc)
            with self._lock:
                sessions = list(self.sessions.values())
            for s in sessions:
                s.fail(self.stopped_because)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                for sid in [k for k, s in self.sessions.items() if s.closed]:
                    del self.sessions[sid]  # its caches go with it
                    self._served.pop(sid, None)
                ready = [s for s in self.sessions.values() if s.ready(now)]
            if not ready:
                self._wake.wait(self.options.poll_s)
                self._wake.clear()
                continue
            held = [s for s in ready if s.must_hold(now)]
            if held:  # behind by more than max_lag_s: catch up first, a held block costs a fraction of one
                units = self._hold(held)
            else:
                batch = self._batch(ready)
                served = time.monotonic()
                self._served.update((s.id, served) for s in batch)
                units = self._generate(batch)
            for unit in units:  # at most one unit per session, in order
                if self._decode_thread is None:
                    self._finish(unit)
                    continue
                while not self._stop.is_set():  # a full queue: wait for the decoder (never drop latents)
                    with contextlib.suppress(queue.Full):
                        self._decode_jobs.put(unit, timeout=0.1)
                        break

    def _batch(self, ready: list[AvatarSession]) -> list[AvatarSession]:
        """The most urgent session, then the others ready now whose next block can share its DiT call, most
        urgent first, up to `max_batch` sessions. Urgency: the earliest deadline, no earlier than
        `max_lateness_s` ago; among sessions that late, the least recently served."""
        oldest = time.monotonic() - self.options.max_lateness_s
        ready = sorted(ready, key=lambda s: (max(s.deadline(), oldest), self._served.get(s.id, 0.0)))
        first, n = ready[0], self.options.max_batch
        batch_key = getattr(self.generator, "batch_key", None)  # causal mode only
        key = batch_key(first.state) if n > 1 and batch_key is not None else None
        if key is None:
            return [first]
        return [first] + [s for s in ready[1:] if batch_key(s.state) == key][:n - 1]

    def _generate(self, batch: list[AvatarSession]) -> list[GeneratedUnit]:
        """Each session's next unit; a failing session is failed and left out (one bad session must not
        take the engine, or the others in its batch, down)."""
        if len(batch) == 1:
            try:
                unit = batch[0].generate()
            except Exception as exc:
                self._failed(batch[0], exc)
                return []
            self._count_batch(1)
            return [unit]
        taken = []
        for s in batch:
            try:
                taken.append((s, s.take_unit()))
            except Exception as exc:
                self._failed(s, exc)
        if not taken:
            return []
        t0 = time.perf_counter()
        try:
            latents = self.generator.generate_blocks([s.state for s, _ in taken], [t.audio for _, t in taken],
                                                     [t.face_audio for _, t in taken],
                                                     [t.face_activity for _, t in taken])
            self._count_batch(len(taken))
            ms = (time.perf_counter() - t0) * 1e3  # each session waited for the whole batch
            return [s.generated(t, x, ms) for (s, t), x in zip(taken, latents)]
        except Exception as exc:  # which session? re-run them alone (their caches re-run the same block)
            log.warning("a batched block of %d sessions failed (%s: %s); generating them one at a time",
                        len(taken), type(exc).__name__, exc)
        units = []
        for s, t in taken:
            t0 = time.perf_counter()
            try:
                x = self.generator.generate_unit(s.state, t.audio, t.face_audio, t.face_activity)
            except Exception as exc:
                self._failed(s, exc)
                continue
            self._count_batch(1)
            units.append(s.generated(t, x, (time.perf_counter() - t0) * 1e3))
        return units

    def _hold(self, sessions: list[AvatarSession]) -> list[GeneratedUnit]:
        """Each late session's next unit, held (AvatarSession.hold); a failing session is failed."""
        units = []
        for s in sessions:
            try:
                units.append(s.hold())
            except Exception as exc:
                self._failed(s, exc)
        return units

    def _count_batch(self, size: int) -> None:
        with self._lock:  # snapshot() copies it from another thread
            self.batch_sizes[size] += 1

    def _finish(self, unit: GeneratedUnit) -> None:
        try:
            unit.session.finish(unit)
        except Exception as exc:
            self._failed(unit.session, exc)

    def _run_decode(self) -> None:
        """Decode and emit generated blocks in the order they were generated."""
        while not (self._stop.is_set() and self._decode_jobs.empty()):
            try:
                unit = self._decode_jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if unit.session.closed:
                continue
            try:
                self._finish(unit)
            finally:
                self._wake.set()  # a session held back by pending frames may be ready again

    def _failed(self, session: AvatarSession, exc: Exception) -> None:
        self.failures += 1
        log.exception("session %s failed", session.id, exc_info=exc)
        session.fail(f"{type(exc).__name__}: {exc}")

    # ---- reporting ----------------------------------------------------------------------------
    def latency_budget(self) -> dict[str, float]:
        """Milliseconds from a sample's arrival to its frame being ready, by stage (worst case)."""
        o = self.options
        _, unit, ahead = o.unit_geometry()
        # the audio a unit waits for, its lookahead included
        block_ms = 1000 * VIDEO_FRAMES_PER_LATENT * (unit + ahead) / o.fps
        timing = self.models.features.timing
        with self._lock:  # the worker thread deletes closed sessions
            stages = [s.stats.stage_ms for s in self.sessions.values()]
        def med(name):  # noqa: E306
            vals = [v for st in stages for v in list(st[name])]  # list(): one atomic copy of a growing deque
            return statistics.median(vals) if vals else 0.0
        budget = {
            "block_ms": block_ms,
            "lookahead_ms": timing.lookahead_ms,
            "features_ms": med("features"),
            "denoise_ms": med("denoise"),
            "decode_ms": med("decode"),
        }
        budget["total_ms"] = sum(budget.values())
        return {k: round(v, 2) for k, v in budget.items()}

    def snapshot(self) -> dict:
        with self._lock:  # the worker thread deletes closed sessions
            sessions = list(self.sessions.items())
            batch_sizes = dict(self.batch_sizes)
        return {
            "model": self.models.name,
            "mode": self.options.mode,
            "device": str(self.models.dit.device),
            "decoder": self.decoder_provider,
            "warmup_ms": round(self.warmup_ms, 1),
            "sessions": {sid: {"frames": s.stats.frames, "idle_frames": s.stats.idle_frames,
                               "blocks": s.stats.blocks, "next_pts": s.next_video,
                               "dropped_input_samples": s.stats.dropped_input_samples,
                               "dropped_frames": s.stats.dropped_frames, "held_frames": s.stats.held_frames}
                         for sid, s in sessions},
            "failures": self.failures,
            "batch_sizes": batch_sizes,
            "latency_budget": self.latency_budget(),
        }
