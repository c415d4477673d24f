"""Long-clip generation for bidirectional checkpoints: overlapping chunks and position-shift fusion.

Both are written against a velocity function `fn(x, t, frames) -> v` (x: (1, C, n, h, w) latents,
t: (1,) timestep, frames: the absolute latent indices of x's frames, so the caller can slice audio),
which keeps the loops testable with a toy denoiser and reusable with any guided DiT. Schedules and
Euler steps come from the shared sampler (`models.sampling.FlowMatchSampler`); what lives here is
only which frames are held, windowed and averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from avatar.generator import Conditions, Guidance, GuidedModel, Unit
from models.dit import WanDiT
from models.sampling import FlowMatchSampler

VelocityFn = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


# ---- 1. overlapping chunks (OmniAvatar) ---------------------------------------------------------
def denoise_with_prefix(fn: VelocityFn, noise: torch.Tensor, prefix: torch.Tensor, sampler: FlowMatchSampler,
                        frames: list[int]) -> torch.Tensor:
    """Flow matching (the sampler's steps, Euler for OmniAvatar) over a chunk whose first `p` frames are
    known and held clean.

    The prefix is written over x before every model call and after the last step, as OmniAvatar does,
    so it leaves the loop exactly as it came in. Returns (1, C, L, h, w).
    """
    p = prefix.shape[2]
    x = noise.clone()
    x[:, :, :p] = prefix
    for i in range(len(sampler)):
        v = fn(x, sampler.timestep(i, x.device), frames)
        x = sampler.step(x, v, i)
        x[:, :, :p] = prefix  # 1. re-pin the known frames
    return x


@dataclass(frozen=True)
class OverlapOptions:
    chunk_frames: int = 7  # latent frames per chunk, prefix included (OmniAvatar sizes it by a token budget)
    overlap_frames: int = 1  # latent frames carried from the previous chunk (OmniAvatar: 1 or 4 = 13 video frames)
    steps: int = 25
    shift: float = 5.0
    guidance: Guidance = field(default_factory=Guidance)


@dataclass
class OverlapState:
    cond: Conditions
    noise: torch.Generator
    tail: torch.Tensor | None = None  # last overlap_frames latents generated
    next_frame: int = 0


class OverlapGenerator:
    """Chunk after chunk: the previous chunk's tail is the prefix, the original reference the anchor."""

    def __init__(self, dit: WanDiT, options: OverlapOptions = OverlapOptions()) -> None:
        if not 0 < options.overlap_frames < options.chunk_frames:
            raise ValueError(f"overlap {options.overlap_frames} must be in 1..chunk_frames-1 ({options.chunk_frames})")
        self.dit, self.options = dit, options
        self.model = GuidedModel(dit, options.guidance)
        self.sampler = FlowMatchSampler.flow(options.steps, options.shift)

    def init_state(self, cond: Conditions, seed: int = 0) -> OverlapState:
        return OverlapState(cond=cond, noise=torch.Generator(device=self.dit.device).manual_seed(seed))

    @property
    def history_latents(self) -> int:
        return self.options.overlap_frames

    def next_unit(self, state: OverlapState) -> Unit:
        start, p, new = self.chunk_span(state)
        if state.tail is None:
            return Unit(0, p + new)  # chunk 0 outputs the reference frame too
        return Unit(start + p, new, context=p)

    def generate_unit(self, state: OverlapState, audio: torch.Tensor | None,
                      face_audio: torch.Tensor | None = None,
                      face_activity: torch.Tensor | None = None) -> torch.Tensor:
        return self.generate_chunk(state, audio, face_audio, face_activity)

    def chunk_span(self, state: OverlapState) -> tuple[int, int, int]:
        """(first latent of the chunk, prefix length, new latents) for the next chunk."""
        if state.tail is None:
            return 0, 1, self.options.chunk_frames - 1  # chunk 0: prefix = the reference latent
        p = self.options.overlap_frames
        return state.next_frame - p, p, self.options.chunk_frames - p

    @torch.no_grad()
    def generate_chunk(self, state: OverlapState, audio: torch.Tensor | None,
                       face_audio: torch.Tensor | None = None,
                       face_activity: torch.Tensor | None = None) -> torch.Tensor:
        """audio: (1, chunk_frames, 4, D) for latents [start, start + chunk_frames) of `chunk_span`.
        Returns the new latents (1, 16, new, h, w); chunk 0 also returns the reference as its first frame."""
        start, p, new = self.chunk_span(state)
        cond = state.cond
        prefix = cond.reference if state.tail is None else state.tail
        h, w = cond.latent_hw
        noise = torch.randn((1, prefix.shape[1], p + new, h, w), generator=state.noise, device=prefix.device)

        def fn(x, t, frames):
            return self.model(x, t, cond, audio, face_audio=face_audio, face_activity=face_activity,
                              known_frames=p).float()

        x = denoise_with_prefix(fn, noise, prefix, self.sampler, list(range(start, start + p + new)))
        state.tail = x[:, :, -self.options.overlap_frames:]
        first_new = state.next_frame
        state.next_frame = start + p + new
        return x if first_new == 0 else x[:, :, p:]


# ---- 2. time-aware position-shift fusion (Sonic / HunyuanVideo-Avatar) -------------------------
def position_shift_fusion(fn: VelocityFn, noise: torch.Tensor, sampler: FlowMatchSampler, window: int,
                          shift_offset: int) -> torch.Tensor:
    """Offline exact loop. The whole clip (1, C, N, h, w) is denoised in lockstep: at each step windows of
    `window` frames tile it (the last one wrapping around to the start), every window takes the same
    sampler step with window-relative positions, overlapping results are averaged, and the tiling origin
    moves by `shift_offset` frames (mod window) before the next step, so seams never stay in one place.
    """
    n = noise.shape[2]
    if window > n:
        raise ValueError(f"window {window} is longer than the clip ({n} latent frames); use one window = the clip")
    x = noise.clone()
    shift = 0
    for i in range(len(sampler)):
        t = sampler.timestep(i, x.device)
        acc = torch.zeros_like(x)
        count = torch.zeros(n, device=x.device, dtype=x.dtype)
        for s0 in range(0, n, window):
            s = s0 - shift
            frames = [(s + j) % n for j in range(window)]  # circular: the clip is a ring
            idx = torch.tensor(frames, device=x.device)
            xw = x[:, :, idx]
            xw = sampler.step(xw, fn(xw, t, frames), i)  # every window takes the same t -> t_next step
            acc.index_add_(2, idx, xw)
            count.index_add_(0, idx, torch.ones(window, device=x.device, dtype=x.dtype))
        x = acc / count.view(1, 1, n, 1, 1)
        shift = (shift + shift_offset) % window
    return x


@dataclass(frozen=True)
class FusionOptions:
    window_frames: int = 8  # latent frames per window (HunyuanVideo-Avatar: 33)
    shift_offset: int = 3  # origin moves this many latent frames per step (HunyuanVideo-Avatar: 10)
    steps: int = 25
    shift: float = 5.0
    guidance: Guidance = field(default_factory=Guidance)


@torch.no_grad()
def generate_fused(dit: WanDiT, cond: Conditions, audio: torch.Tensor | None, num_frames: int,
                   options: FusionOptions = FusionOptions(), seed: int = 0,
                   face_audio: torch.Tensor | None = None,
                   face_activity: torch.Tensor | None = None) -> torch.Tensor:
    """A whole clip of `num_frames` latents with position-shift fusion. audio: (1, N, 4, D); face_activity:
    (1, speakers, N) (`Guidance.quiet_audio_scale`). Returns (1, 16, N, h, w).

    Windows see no known frame: identity comes from the reference channels and reference injection.
    """
    model = GuidedModel(dit, options.guidance)
    h, w = cond.latent_hw
    g = torch.Generator(device=dit.device).manual_seed(seed)
    noise = torch.randn((1, cond.reference.shape[1], num_frames, h, w), generator=g, device=cond.reference.device)
    window = min(options.window_frames, num_frames)

    def fn(x, t, frames):
        a = None if audio is None else audio[:, frames]
        fa = None if face_audio is None else face_audio[:, :, frames]
        act = None if face_activity is None else face_activity[:, :, frames]
        return model(x, t, cond, a, face_audio=fa, face_activity=act).float()

    return position_shift_fusion(fn, noise, FlowMatchSampler.flow(options.steps, options.shift), window,
                                 options.shift_offset)


# ---- 3. bounded position-shift fusion, live --------------------------------------------------------
def window_starts(n: int, window: int, shift: int) -> list[int]:
    """Windows tiling [0, n) from origin -shift, without wrap-around: an edge window slides back inside."""
    return sorted({min(max(s, 0), n - window) for s in range(-shift, n, window)})


def bounded_position_shift(fn: VelocityFn, noise: torch.Tensor, prefix: torch.Tensor, sampler: FlowMatchSampler,
                           window: int, shift_offset: int, first_frame: int = 0, shift: int = 0) -> tuple[torch.Tensor, int]:
    """Position-shift fusion over a bounded span (1, C, n, h, w) whose first `p` frames are known.

    The live span is [prefix | new frames | lookahead]: everything the stream may still change. Unlike the
    offline loop there is no future to wrap onto, so windows that would cross an edge slide back inside
    (edge frames are averaged over more windows instead). The prefix is re-pinned after every step, as in
    overlap mode. Returns the denoised span and the origin shift to continue with, so seams keep moving
    from one unit to the next.
    """
    n, p = noise.shape[2], prefix.shape[2]
    window = min(window, n)
    x = noise.clone()
    x[:, :, :p] = prefix
    for i in range(len(sampler)):
        t = sampler.timestep(i, x.device)
        acc = torch.zeros_like(x)
        count = torch.zeros(n, device=x.device, dtype=x.dtype)
        for s in window_starts(n, window, shift):
            xw = x[:, :, s:s + window]
            frames = list(range(first_frame + s, first_frame + s + window))
            acc[:, :, s:s + window] += sampler.step(xw, fn(xw, t, frames), i)
            count[s:s + window] += 1
        x = acc / count.view(1, 1, n, 1, 1)
        x[:, :, :p] = prefix
        shift = (shift + shift_offset) % window
    return x, shift


@dataclass(frozen=True)
class LiveFusionOptions:
    block_frames: int = 2  # new latents per unit (8 video frames = 320 ms at 25 fps)
    lookahead_frames: int = 2  # latents past the unit denoised with it (their audio is waited for), then dropped
    prefix_frames: int = 1  # latents of the previous unit held clean at the span start (continuity)
    window_frames: int = 3  # fusion window; the span is prefix + block + lookahead latents
    shift_offset: int = 1
    steps: int = 8
    shift: float = 5.0
    guidance: Guidance = field(default_factory=Guidance)


@dataclass
class LiveFusionState:
    cond: Conditions
    noise: torch.Generator
    tail: torch.Tensor | None = None
    next_frame: int = 0
    shift: int = 0  # fusion origin, carried across units


class LiveFusionGenerator:
    """Bounded live fusion: each unit denoises [prefix | block | lookahead] with moving windows, emits the
    block, and drops the lookahead (it is regenerated next unit with more audio behind it). Costs
    (prefix + block + lookahead) / block latents of compute per emitted latent and lookahead latents of
    latency; what it buys a bidirectional checkpoint is future audio context at every seam."""

    def __init__(self, dit: WanDiT, options: LiveFusionOptions = LiveFusionOptions()) -> None:
        if options.block_frames < 1 or options.prefix_frames < 1 or options.lookahead_frames < 0:
            raise ValueError(f"live fusion needs block >= 1, prefix >= 1, lookahead >= 0: {options}")
        if not 0 <= options.shift_offset < max(1, options.window_frames):
            raise ValueError(f"shift_offset {options.shift_offset} must be in 0..window_frames-1")
        self.dit, self.options = dit, options
        self.model = GuidedModel(dit, options.guidance)
        self.sampler = FlowMatchSampler.flow(options.steps, options.shift)

    def init_state(self, cond: Conditions, seed: int = 0) -> LiveFusionState:
        return LiveFusionState(cond=cond, noise=torch.Generator(device=self.dit.device).manual_seed(seed))

    @property
    def history_latents(self) -> int:
        return self.options.prefix_frames

    def next_unit(self, state: LiveFusionState) -> Unit:
        o = self.options
        if state.tail is None:
            return Unit(0, 1 + o.block_frames, lookahead=o.lookahead_frames)  # unit 0 outputs the reference too
        return Unit(state.next_frame, o.block_frames, context=state.tail.shape[2], lookahead=o.lookahead_frames)

    @torch.no_grad()
    def generate_unit(self, state: LiveFusionState, audio: torch.Tensor | None,
                      face_audio: torch.Tensor | None = None,
                      face_activity: torch.Tensor | None = None) -> torch.Tensor:
        """audio: (1, unit.audio_count, 4, D) from latent unit.audio_first. Returns the unit's new latents."""
        unit = self.next_unit(state)
        cond = state.cond
        prefix = cond.reference if state.tail is None else state.tail
        p = prefix.shape[2]
        new = unit.count - (1 if state.tail is None else 0)
        h, w = cond.latent_hw
        n = p + new + unit.lookahead
        first = unit.audio_first
        noise = torch.randn((1, prefix.shape[1], n, h, w), generator=state.noise, device=prefix.device)

        def fn(x, t, frames):
            rel = [f - first for f in frames]
            a = None if audio is None else audio[:, rel]
            fa = None if face_audio is None else face_audio[:, :, rel]
            act = None if face_activity is None else face_activity[:, :, rel]
            return self.model(x, t, cond, a, face_audio=fa, face_activity=act,
                              known_frames=max(0, p - rel[0])).float()

        x, state.shift = bounded_position_shift(fn, noise, prefix, self.sampler, self.options.window_frames,
                                                self.options.shift_offset, first, state.shift)
        emitted = x[:, :, :p + new]
        state.tail = emitted[:, :, -self.options.prefix_frames:]
        state.next_frame = unit.first + unit.count
        return emitted if unit.first == 0 else emitted[:, :, p:]
