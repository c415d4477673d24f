"""Flow-matching sampling: sigma schedules, velocity/x0/noise conversions, steppers, guidance.

Convention (Wan2.1 / OmniAvatar / Self-Forcing): the DiT predicts the velocity of the straight path

    x_t = (1 - σ)·x0 + σ·ε,     v = ε - x0,     timestep = 1000·σ,

so σ = 1 is pure noise and σ = 0 is clean data. A schedule is a strictly decreasing list of N + 1 sigmas
that ends at 0; step i takes σ_i to σ_{i+1} and the model sees timestep 1000·σ_i.

Latents are (B, C, F, H, W). A sigma is a Python float, a 0-d tensor, one value per sample (B,) or one per
latent frame (B, F). Step and conversion math runs in at least float32 and returns the input's dtype.

This is the one sampler: the causal block loop (avatar/generator.py), overlapping chunks and both
position-shift fusions (avatar/chunking.py) and the DiT trainer's noising all step, re-noise and guide
through it. Noise levels are sigmas everywhere outside the model call; `sigma_to_timestep` is the one
place they become the DiT's timesteps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.config import NUM_TRAIN_TIMESTEPS

SigmaLike = float | Tensor


# ---- schedules -----------------------------------------------------------------------------------
def shift_sigmas(sigmas: Tensor | Sequence[float], shift: float) -> Tensor:
    """σ' = s·σ / (1 + (s - 1)·σ). Pushes sigmas towards 1 for s > 1, fixes 0 and 1; s = 1 is the identity."""
    if not 0 < shift < math.inf:
        raise ValueError(f"shift must be finite and > 0, got {shift}")
    sigmas = torch.as_tensor(sigmas)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(
    num_steps: int,
    shift: float,
    sigma_min: float = 0.0,
    sigma_max: float = 1.0,
    *,
    extra_one_step: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Shifted schedule of `num_steps + 1` sigmas, strictly decreasing, ending at exactly 0.

    extra_one_step=True (default; DiffSynth `FlowMatchScheduler(extra_one_step=True)`, which OmniAvatar runs
    with shift=5, sigma_min=0, and Self-Forcing with 1000 steps as its warping table):
        base = linspace(sigma_max, sigma_min, num_steps + 1)[:-1]
    extra_one_step=False (DiffSynth's other spacing; needs sigma_min > 0):
        base = linspace(sigma_max, sigma_min, num_steps)
    then sigmas = shift_sigmas(base, shift) with a 0 appended; timesteps = 1000·sigmas[:-1]. The last step
    always goes to σ = 0, as DiffSynth's `step` does. Computed in float64, returned in `dtype`.

    diffusers' `FlowMatchEulerDiscreteScheduler` re-shifts sigmas passed to `set_timesteps(sigmas=...)` and,
    with its own spacing, shifts sigma_min twice; to reproduce this schedule there, build it with shift=1.0
    and pass `sigmas=flow_sigmas(...)[:-1]` (it appends the 0 itself).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= sigma_min < sigma_max <= 1.0:
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got {sigma_min}, {sigma_max}")
    if not extra_one_step and sigma_min == 0.0:
        raise ValueError("extra_one_step=False needs sigma_min > 0, else the last step is 0 -> 0")
    if extra_one_step:
        base = torch.linspace(sigma_max, sigma_min, num_steps + 1, dtype=torch.float64)[:-1]
    else:
        base = torch.linspace(sigma_max, sigma_min, num_steps, dtype=torch.float64)
    shifted = shift_sigmas(base, shift)
    return torch.cat([shifted, shifted.new_zeros(1)]).to(dtype)


def warped_schedule(
    step_list: Sequence[int], shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[Tensor, Tensor]:
    """Few-step list of a causal student (CausVid / Self-Forcing `warp_denoising_step`) mapped through the
    full shifted schedule. Returns timesteps (K,) and sigmas (K + 1,), float32, sigmas ending at 0.

    Rule: table = 1000·flow_sigmas(1000, shift) (the 1000 shifted timesteps of DiffSynth's
    `set_timesteps(1000)` with a 0 appended, 1001 entries); warped_t = table[1000 - t]; σ = warped_t / 1000.
    Since linspace(1, 0, 1001)[1000 - t] = t/1000, this is warped_t = 1000·shift_sigmas(t/1000, shift):
    [1000, 750, 500, 250] with shift 5 -> [1000, 937.5, 833.3, 625]. shift=1 leaves the list unchanged.
    Steps must be strictly decreasing integers in 1..1000; one trailing 0 (as in CausVid's configs) is the
    terminal, not a step, and is dropped from the timesteps.
    """
    steps = [int(t) for t in step_list]
    if steps and steps[-1] == 0:
        steps = steps[:-1]
    if not steps:
        raise ValueError("step_list has no denoising steps")
    if any(t != float(s) for t, s in zip(steps, step_list)):
        raise ValueError(f"step_list must hold integers, got {list(step_list)}")
    if any(not 1 <= t <= num_train_timesteps for t in steps):
        raise ValueError(f"steps must lie in 1..{num_train_timesteps} (a 0 only last), got {list(step_list)}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"step_list must be strictly decreasing, got {list(step_list)}")
    table = flow_sigmas(num_train_timesteps, shift) * num_train_timesteps  # (1001,), last entry 0
    timesteps = table[[num_train_timesteps - t for t in steps]]
    sigmas = torch.cat([timesteps / num_train_timesteps, timesteps.new_zeros(1)])
    return timesteps, sigmas


# ---- conversions ---------------------------------------------------------------------------------
def sigma_to_timestep(sigma: SigmaLike) -> SigmaLike:
    """The timestep the model sees at noise level σ: 1000·σ (a float, or a tensor of any shape)."""
    return sigma * NUM_TRAIN_TIMESTEPS


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def broadcast_sigma(sigma: SigmaLike, x: Tensor) -> Tensor:
    """Shape a sigma to multiply x: scalar -> 0-d, (B,) -> (B, 1, ..., 1), (B, F) -> (B, 1, F, 1, 1).

    Returned in x's working dtype (at least float32). A 0-d tensor stays on its device (a CPU scalar
    multiplies CUDA tensors without a copy); others move to x's device.
    """
    dtype = _work_dtype(x)
    s = sigma if isinstance(sigma, Tensor) else torch.tensor(sigma, dtype=dtype)
    if s.ndim == 0:
        return s.to(dtype)
    if s.ndim == 1 and s.shape[0] == x.shape[0]:
        return s.to(x.device, dtype).view(-1, *([1] * (x.ndim - 1)))
    if s.ndim == 2 and x.ndim == 5 and tuple(s.shape) == (x.shape[0], x.shape[2]):
        return s.to(x.device, dtype).view(x.shape[0], 1, x.shape[2], 1, 1)
    raise ValueError(f"sigma of shape {tuple(s.shape)} fits neither (B,) nor (B, F) of x {tuple(x.shape)}")


def add_noise(x0: Tensor, noise: Tensor, sigma: SigmaLike) -> Tensor:
    """x_t = (1 - σ)·x0 + σ·ε. x0, noise: (B, C, F, H, W)."""
    s = broadcast_sigma(sigma, x0)
    w = s.dtype
    return ((1 - s) * x0.to(w) + s * noise.to(w)).to(x0.dtype)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Training target v = ε - x0 (independent of σ)."""
    return noise - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: SigmaLike) -> Tensor:
    """x0 = x_t - σ·v."""
    s = broadcast_sigma(sigma, x_t)
    return (x_t.to(s.dtype) - s * v.to(s.dtype)).to(x_t.dtype)


def noise_from_velocity(x_t: Tensor, v: Tensor, sigma: SigmaLike) -> Tensor:
    """ε = x_t + (1 - σ)·v."""
    s = broadcast_sigma(sigma, x_t)
    return (x_t.to(s.dtype) + (1 - s) * v.to(s.dtype)).to(x_t.dtype)


def velocity_from_x0(x_t: Tensor, x0: Tensor, sigma: SigmaLike) -> Tensor:
    """v = (x_t - x0) / σ; undefined (inf/nan) where σ = 0."""
    s = broadcast_sigma(sigma, x_t)
    return ((x_t.to(s.dtype) - x0.to(s.dtype)) / s).to(x_t.dtype)


def velocity_from_noise(x_t: Tensor, noise: Tensor, sigma: SigmaLike) -> Tensor:
    """v = (ε - x_t) / (1 - σ); undefined where σ = 1."""
    s = broadcast_sigma(sigma, x_t)
    return ((noise.to(s.dtype) - x_t.to(s.dtype)) / (1 - s)).to(x_t.dtype)


# ---- steppers ------------------------------------------------------------------------------------
def euler_step(x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
    """Deterministic Euler step of the flow ODE: x_next = x + (σ_next - σ)·v. x, v: (B, C, F, H, W)."""
    dt = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    return (x.to(dt.dtype) + dt * v.to(dt.dtype)).to(x.dtype)


def renoise_step(
    x: Tensor,
    v: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Few-step student step: predict x0 = x - σ·v, then re-noise it to σ_next with fresh noise,
    x_next = (1 - σ_next)·x0 + σ_next·ε. Returns exactly x0 where σ_next = 0.

    ε is `noise` if given, else drawn (in the working dtype) on the generator's device, or x's device
    without a generator, and moved to x's device. Where σ_next is 0 everywhere (a schedule's last step)
    nothing is drawn and x0 is returned as is: a noise stream advances only by the noise that is used,
    which is what keeps a causal session's later blocks independent of how its last step is written.
    """
    x0 = x0_from_velocity(x, v, sigma)
    if not bool(torch.as_tensor(sigma_next).any()):
        return x0
    if noise is None:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=_work_dtype(x)).to(x.device)
    return add_noise(x0, noise, sigma_next)


@dataclass(frozen=True, eq=False)
class FlowMatchSampler:
    """A fixed schedule and a stepping rule: what every generator and the trainer share.

    sigmas: (N + 1,) strictly decreasing within [0, 1]; timesteps: (N,) what the model sees at step i
    (normally 1000·sigmas[:-1]); mode: 'euler' (ODE, deterministic: bidirectional chunks and fusion) or
    'renoise' (x0 then fresh noise: the causal few-step student).
    """

    sigmas: Tensor
    timesteps: Tensor
    mode: str = "euler"

    def __post_init__(self) -> None:
        s, t = self.sigmas, self.timesteps
        if self.mode not in ("euler", "renoise"):
            raise ValueError(f"mode must be 'euler' or 'renoise', got {self.mode!r}")
        if s.ndim != 1 or s.shape[0] < 2 or not s.is_floating_point():
            raise ValueError(f"sigmas must be a 1-D float tensor of at least 2 values, got {tuple(s.shape)}")
        if t.ndim != 1 or t.shape[0] != s.shape[0] - 1:
            raise ValueError(f"timesteps must have shape ({s.shape[0] - 1},), got {tuple(t.shape)}")
        if not bool((s[1:] < s[:-1]).all()):
            raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")
        if not (0.0 <= float(s[-1]) and float(s[0]) <= 1.0):
            raise ValueError(f"sigmas must lie in [0, 1], got {s.tolist()}")

    @classmethod
    def from_sigmas(
        cls,
        sigmas: Tensor | Sequence[float],
        mode: str = "euler",
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    ) -> FlowMatchSampler:
        """Sampler over float32 `sigmas` (N + 1,) with timesteps = num_train_timesteps·sigmas[:-1]."""
        s = torch.as_tensor(sigmas, dtype=torch.float32)
        if s.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
        return cls(s, s[:-1] * num_train_timesteps, mode)

    @classmethod
    def flow(cls, num_steps: int, shift: float) -> FlowMatchSampler:
        """Euler over `flow_sigmas(num_steps, shift)`: OmniAvatar's overlap chunks, position-shift fusion."""
        return cls.from_sigmas(flow_sigmas(num_steps, shift), mode="euler")

    @classmethod
    def few_step(cls, step_list: Sequence[int], shift: float) -> FlowMatchSampler:
        """Re-noising over a causal student's warped step list (`warped_schedule`): Self-Forcing / LiveTalk."""
        timesteps, sigmas = warped_schedule(step_list, shift)
        return cls(sigmas, timesteps, mode="renoise")

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device | str) -> FlowMatchSampler:
        return dataclasses.replace(self, sigmas=self.sigmas.to(device), timesteps=self.timesteps.to(device))

    def timestep(self, i: int, device: torch.device | str) -> Tensor:
        """(1,) timestep the model sees at step i, on `device`."""
        return self.timesteps[i].reshape(1).to(device)

    def step(self, x: Tensor, v: Tensor, i: int, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Step i: x at σ_i, velocity v -> x at σ_{i+1}. x, v: (B, C, F, H, W).

        'renoise' takes its fresh noise from `noise` (same shape as x) when given, else from `generator`;
        the last step (σ_{i+1} = 0) uses none and returns the predicted x0. 'euler' uses neither.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"step {i} outside 0..{len(self) - 1}")
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.mode == "euler":
            return euler_step(x, v, sigma, sigma_next)
        return renoise_step(x, v, sigma, sigma_next, generator=generator, noise=noise)


def denoise(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sampler: FlowMatchSampler,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the whole schedule from x at sigmas[0]. model_fn(x (B, C, F, H, W), timesteps (B,)) -> velocity
    of x's shape (apply guidance inside it). Returns x at sigmas[-1]."""
    # 1. timesteps on x's device once, not a copy per step
    timesteps = sampler.timesteps.to(x.device)
    for i in range(len(sampler)):
        # 2. the same timestep for every sample in the batch
        t = timesteps[i].expand(x.shape[0])
        # 3. velocity prediction
        v = model_fn(x, t)
        # 4. step to sigmas[i + 1]
        x = sampler.step(x, v, i, generator=generator)
    return x


# ---- classifier-free guidance --------------------------------------------------------------------
def cfg2(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Two-pass guidance: uncond + s·(cond - uncond). OmniAvatar: cond = (prompt, audio),
    uncond = (negative prompt, zero audio)."""
    return uncond + scale * (cond - uncond)


def cfg3(
    full: Tensor, no_audio: Tensor, no_text_no_audio: Tensor, text_scale: float, audio_scale: float
) -> Tensor:
    """OmniAvatar's three-pass guidance: nt + s_text·(na - nt) + s_audio·(full - na), where full =
    (prompt, audio), na = (prompt, zero audio), nt = (negative prompt, zero audio). With
    text_scale == audio_scale it equals cfg2(full, nt, scale), whatever na is."""
    nt = no_text_no_audio
    return nt + text_scale * (no_audio - nt) + audio_scale * (full - no_audio)


def linear_guidance(i: int, num_steps: int, start: float, end: float) -> float:
    """HunyuanVideo-Avatar's decaying scale g_i = (1 - i/N)·(start - end) + end, i in 0..N-1 (start at
    i = 0; end is approached, never reached). Its recipe with N = 50, cfg 7.5: steps 0-9 use
    (7.5, 2.0) on text+audio guidance, steps 10-49 use (6.5, 3.5) with the prompt in both branches."""
    if not 0 <= i < num_steps:
        raise ValueError(f"step {i} outside 0..{num_steps - 1}")
    return (1 - i / num_steps) * (start - end) + end


def linear_guidance_schedule(num_steps: int, start: float, end: float) -> tuple[float, ...]:
    """[linear_guidance(i, num_steps, start, end) for i in 0..N-1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return tuple(linear_guidance(i, num_steps, start, end) for i in range(num_steps))
