"""Latent generation: conditions, guided velocity, and the causal block loop (live default).

The causal loop is Self-Forcing's: each block of N latent frames is denoised in a few steps against the
session's KV cache, then run once more at t = 0 so the cache keeps clean keys/values; the reference
latent is latent frame 0 and stays in the cache as the sink. Classifier-free guidance runs its branches
as one batch, so in causal mode each branch has its own rows in the same cache. Several sessions' blocks
can run as one batch too (`generate_blocks`): each session keeps its own cache, noise stream and frame
position, and its rows equal what it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models.dit import WanDiT
from models.kv_cache import CacheGroup, KVCache
from models.sampling import FlowMatchSampler, add_noise, cfg2, cfg3, sigma_to_timestep


@dataclass(frozen=True)
class Guidance:
    """OmniAvatar's CFG forms. audio_scale 1 and text_scale None: a single pass.

    2-pass: v = v(neg text, no audio) + s·(v(text, audio) − v(neg text, no audio)), s = audio_scale.
    3-pass (text_scale set): v = v_nt + s_text·(v_na − v_nt) + s_audio·(v_full − v_na).
    emotion: the branches without audio also see the neutral reference as their emotion image, so the
    audio scale guides the emotion too, at no extra pass. Training with emotion dropout to the reference
    teaches that branch; the demo model, trained without it, still gains (emotion effect 0.28 -> 0.34 and
    0.95 -> 1.02 on two held-out faces, 6 s of held-out speech).
    quiet_audio_scale: face-aware guidance for several speakers. Inside face i's mask the audio scale
    is quiet_audio_scale + (audio_scale - quiet_audio_scale)·a_i, a_i in [0, 1] the voice activity of
    speaker i's audio in that latent (`face_activity`); elsewhere, and without activity, audio_scale.
    The guided term (with audio − without) on a face whose voice is silent is what the other voices
    leak into it: scaled by 2 it doubles a listener's mouth motion. None: one scale everywhere.
    """

    audio_scale: float = 1.0
    text_scale: float | None = None
    emotion: bool = False
    quiet_audio_scale: float | None = None

    @property
    def passes(self) -> int:
        if self.text_scale is not None:
            return 3
        return 1 if self.audio_scale == 1.0 else 2


@dataclass(frozen=True)
class CausalOptions:
    block_frames: int = 3  # latent frames per block (12 video frames = 480 ms at 25 fps)
    first_block_frames: int = 1  # latent frames of the first block after the reference: the stream's first
    # frame is drawn from it (FrameDecoder.open_at), so a live call's picture waits for this much audio
    sink_frames: int = 1  # the reference latent stays visible forever
    window_frames: int = 6  # recent latent frames kept in the cache
    steps: tuple[int, ...] = (1000, 750, 500, 250)  # timesteps, warped through the shifted schedule
    shift: float = 5.0
    context_sigma: float = 0.0  # noise level σ of the pass that writes clean K/V (Self-Forcing: 0)
    sink_follows: bool = True  # sink keys kept just before the window: long streams look like training
    guidance: Guidance = field(default_factory=Guidance)
    # share of every latent's noise variance drawn once per session: latents denoised from partly the same
    # noise keep the same detail, where independent noise re-rolls it every latent (flicker at 4-frame steps)
    noise_correlation: float = 0.0

    @property
    def first_block(self) -> int:
        """Latent frames of the first block after the reference (`first_block_frames`, at most a block)."""
        return min(self.first_block_frames, self.block_frames)

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_correlation <= 1.0:
            raise ValueError(f"noise_correlation must be in [0, 1], got {self.noise_correlation}")
        if not 1 <= self.first_block_frames:
            raise ValueError(f"first_block_frames must be at least 1, got {self.first_block_frames}")
        if not 0.0 <= self.context_sigma < 1.0:
            raise ValueError(f"context_sigma is a noise level in [0, 1) (σ, not a timestep), got {self.context_sigma}")


@dataclass
class Conditions:
    """What a session conditions on besides audio; fixed for the session (change = new Conditions)."""

    reference: torch.Tensor  # (1, 16, 1, h, w) normalised reference latent
    context: torch.Tensor | None = None  # (1, L, text_dim); None = the model's null context
    negative_context: torch.Tensor | None = None  # for text guidance; None = null context
    emotion: torch.Tensor | None = None  # (1, 16, 1, h, w) emotion-reference latent (AEM)
    face_mask: torch.Tensor | None = None  # (1, chars, h/2, w/2) token-grid masks (FAA)
    motion: float | None = None  # head-motion intensity 0 (still) .. 1, for models trained with it
    neutral: torch.Tensor | None = None  # the portrait's latent where `reference` is an emotion image's
    # (EngineOptions.emotion_as_reference): what emotion guidance's unconditional branch sees as emotion

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.reference.shape[-2], self.reference.shape[-1]

    @property
    def faces(self) -> int:
        """How many faces the avatar has: one FAA mask each, 1 without masks."""
        return 1 if self.face_mask is None else int(self.face_mask.shape[1])


def zero_audio_like(audio: torch.Tensor) -> torch.Tensor:
    """OmniAvatar's unconditional audio: zeros of the feature tensor (before the Audio Pack)."""
    return torch.zeros_like(audio)


def _stack(values: Sequence[torch.Tensor | None], name: str) -> torch.Tensor | None:
    """Per-session tensors (1, ...) -> (S, ...); all None -> None (sessions must agree on having it)."""
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"sessions batched together must all have {name} or all lack it")
    return values[0] if len(values) == 1 else torch.cat(list(values))


class GuidedModel:
    """Calls the DiT once per step with every guidance branch (of every session given) in one batch,
    and combines them."""

    def __init__(self, dit: WanDiT, guidance: Guidance) -> None:
        self.dit, self.guidance = dit, guidance

    def reference_channels(self, cond: Conditions, frames: int, known: int) -> torch.Tensor | None:
        """y for in_dim 33: reference latent repeated over frames + mask (0 = known frame, 1 = generate)."""
        c = self.dit.cfg
        if c.in_dim == c.out_dim:
            return None
        ref = cond.reference.expand(-1, -1, frames, -1, -1)
        mask = torch.ones_like(ref[:, :1])
        mask[:, :, :known] = 0
        return torch.cat([ref, mask], dim=1)  # (1, 17, F, h, w)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions, audio: torch.Tensor | None, *,
                 face_audio: torch.Tensor | None = None, face_activity: torch.Tensor | None = None,
                 known_frames: int = 0, cache: KVCache | None = None, start_frame: int = 0,
                 frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (1, 16, F, h, w), t: (1,) or (1, F); audio: (1, F, 4, D); face_activity: (1, speakers, F).
        Returns guided velocity (1, 16, F, h, w)."""
        return self.many(x, t, [cond], [audio], [face_audio], [face_activity], known_frames=known_frames,
                         cache=cache, start_frame=start_frame, frame_mask=frame_mask)

    def many(self, x: torch.Tensor, t: torch.Tensor, conds: Sequence[Conditions],
             audios: Sequence[torch.Tensor | None], face_audios: Sequence[torch.Tensor | None],
             face_activities: Sequence[torch.Tensor | None] | None = None, *,
             known_frames: int = 0, cache: KVCache | CacheGroup | None = None,
             start_frame: int | Sequence[int] = 0, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """S sessions in one call. x: (S, 16, F, h, w); t: (1,) shared or (S,) / (S, F); audios: S of
        (1, F, 4, D) or None; face_activities: S of (1, speakers, F) or None (`Guidance.quiet_audio_scale`);
        start_frame: one for all or one per session. The DiT sees S*k rows, session-major (session s's
        branches are rows s*k .. s*k+k-1). Returns guided velocity (S, 16, F, h, w)."""
        k, s = self.guidance.passes, len(conds)
        dt = self.dit.dtype
        if x.shape[0] != s:
            raise ValueError(f"latents for {x.shape[0]} sessions, conditions for {s}")
        # a (1, ...) tensor is shared by every row (a view); (S, ...) gives each session's k branch rows
        rows = lambda v: None if v is None else (  # noqa: E731
            v.expand(s * k, *v.shape[1:]) if v.shape[0] == 1 else v.repeat_interleave(k, 0))
        y = _stack([self.reference_channels(c, x.shape[2], known_frames) for c in conds], "a reference")
        ctx = self._session_contexts(conds, k)
        a = _stack([None if au is None else torch.cat([au] + [zero_audio_like(au)] * (k - 1))
                    for au in audios], "audio")  # branch 0 conditional, the others without audio
        fa = _stack([None if f is None else torch.cat([f] + [zero_audio_like(f)] * (k - 1))
                     for f in face_audios], "face audio")
        motion = None
        if self.dit.cfg.motion_condition:
            motion = _stack([None if c.motion is None else torch.full((k,), float(c.motion), device=x.device)
                             for c in conds], "a motion condition")
        if not isinstance(start_frame, int):
            start_frame = tuple(f for f in start_frame for _ in range(k))  # one per row
        v = self.dit(rows(x).to(dt), rows(t), ctx, y=rows(y), audio=a, face_audio=fa,
                     face_mask=rows(_stack([c.face_mask for c in conds], "face masks")),
                     emotion=self._emotion_rows(conds, k, rows),
                     reference=rows(_stack([c.reference for c in conds], "a reference")),
                     motion=motion, cache=cache, start_frame=start_frame, frame_mask=frame_mask)
        if k == 1:
            return v
        g = self.guidance
        v = v.unflatten(0, (s, k))  # (S, k, 16, F, h, w)
        scale = self.audio_scales(conds, face_activities, v.shape[-3:])
        if k == 2:
            return cfg2(v[:, 0], v[:, 1], scale)
        return cfg3(v[:, 0], v[:, 1], v[:, 2], g.text_scale, scale)

    def audio_scales(self, conds: Sequence[Conditions], face_activities: Sequence[torch.Tensor | None] | None,
                     fhw: tuple[int, int, int]) -> float | torch.Tensor:
        """The audio guidance scale: `audio_scale`, or with `quiet_audio_scale` and some session's face
        activity a map (S, 1, F, h, w) lowering it inside the faces of silent voices (where masks overlap,
        the more active face's scale)."""
        g = self.guidance
        if g.quiet_audio_scale is None or not face_activities or all(a is None for a in face_activities):
            return g.audio_scale
        maps = []
        for cond, act in zip(conds, face_activities):
            scale = torch.full((1, 1, *fhw), float(g.audio_scale))
            if act is not None and cond.face_mask is not None:
                masks = cond.face_mask[0].float().cpu()  # (chars, gh, gw) on the token grid
                masks = masks.repeat_interleave(fhw[1] // masks.shape[-2], -2).repeat_interleave(
                    fhw[2] // masks.shape[-1], -1)  # (chars, h, w) on the latent grid
                a = torch.zeros(masks.shape[0], fhw[0])  # a face without a voice is silent
                a[:act.shape[1]] = act[0].float().cpu()[:masks.shape[0]]
                faces = g.quiet_audio_scale + (g.audio_scale - g.quiet_audio_scale) * a  # (chars, F)
                inside = masks[:, None] > 0  # (chars, 1, h, w)
                per_face = torch.where(inside, faces[:, :, None, None], torch.tensor(float("-inf")))
                best = per_face.amax(0)  # (F, h, w)
                scale = torch.where(torch.isfinite(best), best, scale[0, 0])[None, None]
            maps.append(scale)
        return torch.cat(maps).to(conds[0].reference.device)

    def _emotion_rows(self, conds: Sequence[Conditions], k: int, rows) -> torch.Tensor | None:
        """(S*k, 16, 1, h, w) emotion images: every branch the session's own, or with emotion guidance the
        conditional branch its own and the unconditional ones the neutral reference."""
        emotion = _stack([c.emotion for c in conds], "an emotion reference")
        if emotion is None or k == 1 or not self.guidance.emotion:
            return rows(emotion)
        return torch.cat([torch.cat([c.emotion] + [c.reference if c.neutral is None else c.neutral] * (k - 1))
                          for c in conds])

    def _session_contexts(self, conds: Sequence[Conditions], k: int) -> torch.Tensor | None:
        """(S*k, L, text_dim) branch contexts of every session, or None when no session has one (the DiT's
        null context). Shorter ones are zero-padded, as the DiT pads every context to text_len anyway."""
        ctxs = [self._contexts(c, k) for c in conds]
        if len(ctxs) == 1 or all(c is None for c in ctxs):
            return ctxs[0]
        if any(c is None for c in ctxs):
            if not self.dit.cfg.null_context_len:
                raise ValueError("no context given and this model has no learned null context")
            null = self.dit.null_context.expand(k, -1, -1)
            ctxs = [null if c is None else c for c in ctxs]
        n = max(c.shape[1] for c in ctxs)
        return torch.cat([torch.cat([c, c.new_zeros(k, n - c.shape[1], c.shape[2])], 1) for c in ctxs])

    def _contexts(self, cond: Conditions, k: int) -> torch.Tensor | None:
        """(k, L, text_dim) branch contexts: positive for the first, negative for the text-free branch."""
        if k == 1 or (cond.context is None and cond.negative_context is None):
            return None if cond.context is None else cond.context
        null = self.dit.null_context if self.dit.cfg.null_context_len else None
        pos = cond.context if cond.context is not None else null
        neg = cond.negative_context if cond.negative_context is not None else null
        if neg is None:  # no learned null context: Wan's empty prompt pads to all-zero rows
            neg = pos.new_zeros(1, 1, pos.shape[2])
        pos, neg = self._same_length(pos, neg)
        rows = [pos, neg] if k == 2 else [pos, pos, neg]
        return torch.cat(rows)

    def _same_length(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(a.shape[1], b.shape[1])
        pad = lambda v: torch.cat([v, v.new_zeros(1, n - v.shape[1], v.shape[2])], 1)  # noqa: E731
        return pad(a), pad(b)


# ---- the unit of work a session asks for -----------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """The next latents a generator will produce, and the audio it needs for them.

    New latents are [first, first + count); audio features are needed for latents
    [first - context, first + count + lookahead) (an overlap prefix re-uses the previous chunk's audio;
    live fusion also denoises `lookahead` latents past the unit, whose audio must have arrived).
    """

    first: int
    count: int
    context: int = 0
    lookahead: int = 0

    @property
    def audio_first(self) -> int:
        return self.first - self.context

    @property
    def audio_count(self) -> int:
        return self.context + self.count + self.lookahead


# ---- causal streaming ---------------------------------------------------------------------------
@dataclass
class CausalState:
    """Per-session generation state: the KV cache, the frame cursor, the noise stream."""

    cond: Conditions
    cache: KVCache
    noise: torch.Generator
    next_frame: int = 0  # next latent frame to generate (0 = the reference, prefilled)
    shared_noise: torch.Tensor | None = None  # (1, 16, 1, h, w) the session's fixed noise component

    def reset(self, seed: int) -> None:
        self.cache.reset()
        self.noise.manual_seed(seed)
        self.next_frame = 0
        self.shared_noise = None


class CausalGenerator:
    """Block-causal few-step generation through a KV cache: flat cost per block, forever."""

    def __init__(self, dit: WanDiT, options: CausalOptions = CausalOptions()) -> None:
        self.dit, self.options = dit, options
        self.model = GuidedModel(dit, options.guidance)
        self.sampler = FlowMatchSampler.few_step(options.steps, options.shift)

    def init_state(self, cond: Conditions, seed: int = 0) -> CausalState:
        o = self.options
        h, w = cond.latent_hw
        cache = self.dit.init_cache(o.guidance.passes, h, w, sink_frames=o.sink_frames,
                                    window_frames=o.window_frames, block_frames=o.block_frames,
                                    sink_follows=o.sink_follows)
        noise = torch.Generator(device=self.dit.device).manual_seed(seed)
        return CausalState(cond=cond, cache=cache, noise=noise)

    history_latents = 0  # audio of already generated latents that a later unit needs

    def next_unit(self, state: CausalState) -> Unit:
        """The reference first (latent 0), then a first block of `first_block_frames` (at most
        `block_frames`), then blocks of `block_frames`."""
        if state.next_frame == 0:
            return Unit(0, 1)
        if state.next_frame == 1:
            return Unit(1, self.options.first_block)
        return Unit(state.next_frame, self.options.block_frames)

    def generate_unit(self, state: CausalState, audio: torch.Tensor | None,
                      face_audio: torch.Tensor | None = None,
                      face_activity: torch.Tensor | None = None) -> torch.Tensor:
        if state.next_frame == 0:
            return self.prefill_reference(state, audio, face_audio)
        return self.generate_block(state, audio, face_audio, face_activity)

    @torch.no_grad()
    def prefill_reference(self, state: CausalState, audio: torch.Tensor | None,
                          face_audio: torch.Tensor | None = None) -> torch.Tensor:
        """Latent frame 0 is the reference itself, clean; its K/V become the sink. Returns it (1,16,1,h,w).

        audio: (1, 1, 4, D) features of video frame 0 (replicated, as for OmniAvatar's first latent).
        """
        if state.next_frame != 0:
            raise RuntimeError("the reference is prefilled once, at the start of a stream")
        ref = state.cond.reference
        t0 = torch.full((1,), sigma_to_timestep(self.options.context_sigma), device=ref.device)
        self.model(ref, t0, state.cond, audio, face_audio=face_audio, known_frames=1, cache=state.cache,
                   start_frame=0)
        state.next_frame = 1
        return ref

    @torch.no_grad()
    def generate_block(self, state: CausalState, audio: torch.Tensor | None,
                       face_audio: torch.Tensor | None = None,
                       face_activity: torch.Tensor | None = None) -> torch.Tensor:
        """Generate the next block. audio: (1, N, 4, D) features of its latent frames; face_activity:
        (1, speakers, N) their voice activity (`Guidance.quiet_audio_scale`). Returns (1, 16, N, h, w)."""
        return self.generate_blocks([state], [audio], [face_audio], [face_activity])[0]

    def batch_key(self, state: CausalState) -> tuple | None:
        """Sessions whose keys are equal can generate their next blocks in one batch (`generate_blocks`);
        None: this session's next unit runs alone (the reference prefill is one pass of one frame)."""
        if state.next_frame == 0:
            return None
        c = state.cond
        shape = lambda v: None if v is None else tuple(v.shape)  # noqa: E731
        return (self.next_unit(state).count, shape(c.reference), shape(c.emotion), shape(c.face_mask),
                c.motion is None, c.context is None, c.negative_context is None)

    @torch.no_grad()
    def generate_blocks(self, states: Sequence[CausalState], audios: Sequence[torch.Tensor | None],
                        face_audios: Sequence[torch.Tensor | None] | None = None,
                        face_activities: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """The next block of S sessions, each at its own frame, one batched DiT call per pass.

        audios: S of (1, N, 4, D) or None; face_audios: S of (1, chars, N, 4, D) or None; face_activities:
        S of (1, speakers, N) or None (only the guidance of the denoising passes reads them). Every session
        draws its noise from its own stream in the order it would alone and keeps its own cache, so its
        block equals `generate_block` on it alone (to float rounding). Returns S of (1, 16, N, h, w).
        """
        if not states:
            return []
        if face_audios is None:
            face_audios = [None] * len(states)
        if not len(states) == len(audios) == len(face_audios):
            raise ValueError(f"{len(states)} sessions, {len(audios)} audio and {len(face_audios)} face audio inputs")
        if any(st.next_frame == 0 for st in states):
            raise RuntimeError("prefill_reference() first: latent frame 0 is the reference")
        conds = [st.cond for st in states]
        ref = conds[0].reference
        n = audios[0].shape[1] if audios[0] is not None else self.options.block_frames
        h, w = conds[0].latent_hw
        one = len(states) == 1
        cache = states[0].cache if one else CacheGroup([st.cache for st in states])
        starts = states[0].next_frame if one else [st.next_frame for st in states]
        stack = lambda xs: xs[0] if one else torch.cat(xs)  # noqa: E731 -- S of (1, ...) -> (S, ...)
        shape = (1, ref.shape[1], n, h, w)
        sampler = self.sampler
        # 1. start from noise: (S, 16, N, h, w), each session's from its own stream
        x = stack([self._noise(st, shape) for st in states])
        # 2. few-step denoising against the caches (each pass overwrites this block's K/V): predict x0,
        #    re-noise it to the next level with each session's noise; the last step lands on x0 itself
        for i in range(len(sampler)):
            v = self.model.many(x, sampler.timestep(i, ref.device), conds, audios, face_audios, face_activities,
                                cache=cache, start_frame=starts).float()
            noise = stack([self._noise(st, shape) for st in states]) if i + 1 < len(sampler) else None
            x = sampler.step(x, v, i, noise=noise)
        x0 = x
        # 3. clean pass: the caches keep K/V of the clean block (committed when the next block begins);
        #    with context_sigma > 0 the context is lightly re-noised first, as Self-Forcing allows
        sigma_ctx = self.options.context_sigma
        x_ctx = x0
        if sigma_ctx > 0:
            eps = stack([torch.randn(shape, generator=st.noise, device=x0.device, dtype=x0.dtype) for st in states])
            x_ctx = add_noise(x0, eps, sigma_ctx)
        t_clean = torch.full((1,), sigma_to_timestep(sigma_ctx), device=ref.device)
        self.model.many(x_ctx, t_clean, conds, audios, face_audios, cache=cache, start_frame=starts)
        # 4. advance the cursors
        for st in states:
            st.next_frame += n
        return [x0] if one else list(x0.split(1))

    @torch.no_grad()
    def hold_block(self, state: CausalState, latent: torch.Tensor, audio: torch.Tensor | None,
                   face_audio: torch.Tensor | None = None) -> torch.Tensor:
        """Catch-up for a session behind real time: the next block is `latent` (1, 16, 1, h, w), the last one
        generated, held; only the clean pass runs, so the cache and the cursor move on as if the block had
        been generated (guidance passes, not steps x passes + passes). Returns the held block (1, 16, N, h, w).

        audio: (1, N, 4, D) the block's features, as for `generate_block` (its K/V hear what was said)."""
        if state.next_frame == 0:
            raise RuntimeError("prefill_reference() first: there is nothing to hold before the reference")
        n = audio.shape[1] if audio is not None else self.options.block_frames
        x = latent[:, :, -1:].expand(-1, -1, n, -1, -1).contiguous()  # (1, 16, N, h, w)
        t_clean = torch.full((1,), sigma_to_timestep(self.options.context_sigma), device=x.device)
        self.model.many(x, t_clean, [state.cond], [audio], [face_audio], cache=state.cache,
                        start_frame=state.next_frame)
        state.next_frame += n
        return x

    def _noise(self, state: CausalState, shape) -> torch.Tensor:
        """Unit-variance noise for a block; `noise_correlation` of its variance is the session's fixed draw."""
        dev = state.cond.reference.device
        eps = torch.randn(shape, generator=state.noise, device=dev, dtype=torch.float32)
        rho = self.options.noise_correlation
        if rho == 0.0:
            return eps
        if state.shared_noise is None:
            state.shared_noise = torch.randn((*shape[:2], 1, *shape[3:]), generator=state.noise, device=dev)
        return rho ** 0.5 * state.shared_noise + (1 - rho) ** 0.5 * eps
