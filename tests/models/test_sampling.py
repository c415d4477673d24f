"""models/sampling.py against diffusers' FlowMatchEulerDiscreteScheduler and against first principles."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from models.sampling import (
    FlowMatchSampler,
    add_noise,
    broadcast_sigma,
    cfg2,
    cfg3,
    denoise,
    euler_step,
    flow_sigmas,
    linear_guidance,
    linear_guidance_schedule,
    noise_from_velocity,
    renoise_step,
    shift_sigmas,
    sigma_to_timestep,
    velocity_from_noise,
    velocity_from_x0,
    velocity_target,
    warped_schedule,
    x0_from_velocity,
)

SHAPE = (2, 4, 3, 6, 5)  # (B, C, F, H, W)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class FakeVelocity:
    """Nonlinear in x and in t, so a wrong timestep or a wrong x shows up; records the timesteps it saw."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.seen.append(t.clone())
        scale = (t / 1000).view(-1, 1, 1, 1, 1)
        return torch.tanh(x) * scale - 0.3 * x.roll(1, dims=2) + 0.05


def _diffusers(sigmas: torch.Tensor, **kw) -> FlowMatchEulerDiscreteScheduler:
    # shift=1: diffusers re-shifts sigmas given to set_timesteps; ours are already shifted. It appends the 0.
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, **kw)
    sched.set_timesteps(sigmas=sigmas[:-1].tolist())
    assert torch.equal(sched.sigmas, sigmas)  # identical schedules, or the comparison means nothing
    return sched


# ---- schedules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 5.0, 8.0])
def test_shift_matches_diffusers_formula(shift):
    base = torch.linspace(1.0, 0.0, 11)[:-1]
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=base.tolist())  # diffusers applies its shift to these
    torch.testing.assert_close(shift_sigmas(base, shift), sched.sigmas[:-1], atol=1e-6, rtol=0)
    assert shift_sigmas(torch.tensor([0.0, 1.0]), shift).tolist() == [0.0, 1.0]


def test_flow_sigmas_diffsynth_convention():
    n, s = 50, 5.0
    got = flow_sigmas(n, s)
    assert got.shape == (n + 1,) and got.dtype == torch.float32
    expected = [s * u / (1 + (s - 1) * u) for u in (1 - k / n for k in range(n))] + [0.0]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-7, rtol=0)
    assert got[0] == 1.0 and got[-1] == 0.0 and bool((got[1:] < got[:-1]).all())


def test_flow_sigmas_against_diffusers_shift_and_its_double_shift_quirk():
    # diffusers shifting the unshifted DiffSynth grid gives our schedule ...
    n, s = 20, 5.0
    sched = FlowMatchEulerDiscreteScheduler(shift=s)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.0, n + 1)[:-1].tolist())
    torch.testing.assert_close(sched.sigmas, flow_sigmas(n, s), atol=1e-6, rtol=0)
    # ... its default spacing does not (sigma_min shifted at init and again): so oracle tests pass sigmas.
    sched.set_timesteps(4)
    assert float(sched.sigmas[-2]) < 0.03 < float(flow_sigmas(4, s)[-2])


def test_flow_sigmas_other_spacings():
    # sigma_min > 0 with extra_one_step: the grid point sigma_min itself is never visited; 0 is the end
    got = flow_sigmas(4, 1.0, sigma_min=0.2, sigma_max=1.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0]), atol=1e-7, rtol=0)
    got = flow_sigmas(4, 1.0, sigma_min=0.1, sigma_max=0.7, extra_one_step=False)
    torch.testing.assert_close(got, torch.tensor([0.7, 0.5, 0.3, 0.1, 0.0]), atol=1e-7, rtol=0)


def test_warped_list_from_first_principles():
    steps, s = [1000, 750, 500, 250], 5.0
    timesteps, sigmas = warped_schedule(steps, s)
    # Closed form: base sigma at index 1000 - t of linspace(1, 0, 1001) is t/1000, then shift.
    closed = [1000 * s * (t / 1000) / (1 + (s - 1) * t / 1000) for t in steps]
    assert closed == [1000.0, 937.5, 2500 / 3, 625.0]
    torch.testing.assert_close(timesteps, torch.tensor(closed), atol=1e-4, rtol=0)
    torch.testing.assert_close(sigmas, torch.tensor([c / 1000 for c in closed] + [0.0]), atol=1e-7, rtol=0)
    # Literal table lookup as Self-Forcing does it (float32 linspace, shift, x1000, append 0, index).
    base = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = torch.cat([s * base / (1 + (s - 1) * base) * 1000, torch.zeros(1)])
    torch.testing.assert_close(timesteps, table[[1000 - t for t in steps]], atol=1e-4, rtol=0)


def test_warped_list_shift_one_is_identity_and_trailing_zero_is_terminal():
    timesteps, sigmas = warped_schedule([1000, 757, 522, 0], 1.0)
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 757.0, 522.0]), atol=1e-4, rtol=0)
    assert sigmas.shape == (4,) and sigmas[-1] == 0.0
    t8, _ = warped_schedule([1000, 757, 522], 8.0)
    assert 1000 > t8[1] > 757 and t8[2] > 522  # shift > 1 pushes every step towards noise


# ---- Euler loop against diffusers ----------------------------------------------------------------
@pytest.mark.parametrize(
    "sigmas",
    [
        flow_sigmas(50, 5.0),
        flow_sigmas(8, 3.0),
        flow_sigmas(6, 1.0, sigma_min=0.05),
        warped_schedule([1000, 750, 500, 250], 5.0)[1],
    ],
    ids=["50x5", "8x3", "6x1-min", "warped4"],
)
def test_euler_loop_matches_diffusers(sigmas):
    x_init = _randn(*SHAPE, seed=1)
    sched = _diffusers(sigmas)
    ref_fn, x = FakeVelocity(), x_init.clone()
    for t in sched.timesteps:
        x = sched.step(ref_fn(x, t.expand(SHAPE[0])), t, x).prev_sample

    ours_fn, sampler = FakeVelocity(), FlowMatchSampler.from_sigmas(sigmas)
    out = denoise(ours_fn, x_init.clone(), sampler)
    assert len(sampler) == len(sched.timesteps) == len(ours_fn.seen)
    for a, b in zip(ours_fn.seen, ref_fn.seen):
        assert a.shape == (SHAPE[0],) and torch.equal(a, b)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    assert not torch.allclose(out, x_init)


def test_renoise_matches_diffusers_stochastic_sampling():
    sigmas = warped_schedule([1000, 750, 500, 250], 5.0)[1]
    x_init = _randn(*SHAPE, seed=2)
    sched = _diffusers(sigmas, stochastic_sampling=True)
    gen, x, fn = torch.Generator().manual_seed(7), x_init.clone(), FakeVelocity()
    for t in sched.timesteps:
        x = sched.step(fn(x, t.expand(SHAPE[0])), t, x, generator=gen).prev_sample

    sampler = FlowMatchSampler.from_sigmas(sigmas, mode="renoise")
    out = denoise(FakeVelocity(), x_init.clone(), sampler, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


# ---- renoise step --------------------------------------------------------------------------------
def test_renoise_step_deterministic_and_exact_x0_at_zero():
    x, v = _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4)
    a = renoise_step(x, v, 0.8, 0.5, generator=torch.Generator().manual_seed(0))
    b = renoise_step(x, v, 0.8, 0.5, generator=torch.Generator().manual_seed(0))
    c = renoise_step(x, v, 0.8, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, add_noise(x - 0.8 * v, eps, 0.5), atol=1e-6, rtol=0)
    last = renoise_step(x, v, torch.tensor(0.8), torch.tensor(0.0), generator=torch.Generator())
    assert torch.equal(last, x0_from_velocity(x, v, 0.8))


def test_renoise_sampler_last_step_returns_x0():
    sampler = FlowMatchSampler.from_sigmas(warped_schedule([1000, 750, 500, 250], 5.0)[1], mode="renoise")
    x, v = _randn(*SHAPE, seed=5), _randn(*SHAPE, seed=6)
    out = sampler.step(x, v, len(sampler) - 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0_from_velocity(x, v, sampler.sigmas[-2]))


def test_renoise_draws_only_the_noise_it_uses():
    """Steps to σ_next > 0 draw one tensor of x's shape; the last step (σ_next = 0) draws nothing, so a
    session's noise stream is where the next block expects it."""
    x, v = _randn(*SHAPE, seed=5), _randn(*SHAPE, seed=6)
    g, fresh = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    renoise_step(x, v, 0.8, 0.5, generator=g)
    torch.randn(SHAPE, generator=fresh)
    assert torch.equal(g.get_state(), fresh.get_state())
    renoise_step(x, v, 0.5, 0.0, generator=g)
    renoise_step(x, v, torch.tensor([0.5, 0.4]), torch.zeros(2), generator=g)
    assert torch.equal(g.get_state(), fresh.get_state())
    # given noise is used as is: the step is add_noise of the predicted x0
    eps = _randn(*SHAPE, seed=7)
    sampler = FlowMatchSampler.few_step([1000, 500], 3.0)
    assert torch.equal(sampler.step(x, v, 0, noise=eps), add_noise(x0_from_velocity(x, v, sampler.sigmas[0]), eps,
                                                                   sampler.sigmas[1]))


def test_sampler_constructors_and_timesteps():
    few = FlowMatchSampler.few_step([1000, 750, 500, 250], 5.0)
    timesteps, sigmas = warped_schedule([1000, 750, 500, 250], 5.0)
    assert few.mode == "renoise" and torch.equal(few.timesteps, timesteps) and torch.equal(few.sigmas, sigmas)
    flow = FlowMatchSampler.flow(8, 3.0)
    assert flow.mode == "euler" and torch.equal(flow.sigmas, flow_sigmas(8, 3.0))
    assert torch.equal(flow.timesteps, sigma_to_timestep(flow.sigmas[:-1]))
    assert flow.timestep(2, "cpu").shape == (1,) and torch.equal(flow.timestep(2, "cpu"), flow.timesteps[2:3])
    assert sigma_to_timestep(0.03) == pytest.approx(30.0) and sigma_to_timestep(1.0) == 1000.0


# ---- conversions ---------------------------------------------------------------------------------
PER_FRAME = torch.tensor([[0.1, 0.5, 0.95], [0.4, 0.6, 0.7]])


@pytest.mark.parametrize(
    "sigma", [0.3, torch.tensor([0.2, 0.9]), PER_FRAME], ids=["scalar", "per-sample", "per-frame"]
)
def test_conversions_round_trip(sigma):
    x0, eps = _randn(*SHAPE, seed=8), _randn(*SHAPE, seed=9)
    x_t, v = add_noise(x0, eps, sigma), velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(noise_from_velocity(x_t, v, sigma), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, sigma), v, atol=1e-4, rtol=0)
    torch.testing.assert_close(velocity_from_noise(x_t, eps, sigma), v, atol=1e-4, rtol=0)
    # one Euler step along the true velocity lands on the same straight path
    torch.testing.assert_close(euler_step(x_t, v, sigma, 0.0), x0, atol=1e-5, rtol=0)


def test_conversions_keep_low_precision_dtype():
    x0, eps = _randn(*SHAPE, seed=10, dtype=torch.bfloat16), _randn(*SHAPE, seed=11, dtype=torch.bfloat16)
    x_t = add_noise(x0, eps, torch.tensor([0.25, 0.75]))
    assert x_t.dtype == torch.bfloat16
    assert euler_step(x_t, velocity_target(x0, eps), 0.75, 0.5).dtype == torch.bfloat16
    assert renoise_step(x_t, eps, 0.75, 0.5, generator=torch.Generator()).dtype == torch.bfloat16


def test_per_frame_sigma_broadcasting():
    x = _randn(*SHAPE, seed=12)
    per_frame = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.4, 0.8]])
    assert broadcast_sigma(per_frame, x).shape == (2, 1, 3, 1, 1)
    assert broadcast_sigma(torch.tensor([0.1, 0.2]), x).shape == (2, 1, 1, 1, 1)
    assert broadcast_sigma(0.5, x).shape == ()
    v = _randn(*SHAPE, seed=13)
    out = euler_step(x, v, per_frame, per_frame / 2)
    for b in range(2):
        for f in range(3):
            s = float(per_frame[b, f])
            torch.testing.assert_close(out[b, :, f], x[b, :, f] + (s / 2 - s) * v[b, :, f], atol=1e-6, rtol=0)
    bad = [(torch.zeros(2, 4), x), (torch.zeros(3), x), (torch.zeros(2, 3, 1), x), (per_frame, x[:, :, 0])]
    for sigma, target in bad:
        with pytest.raises(ValueError, match="sigma of shape"):
            broadcast_sigma(sigma, target)


# ---- guidance ------------------------------------------------------------------------------------
def test_cfg2_reductions():
    cond, uncond = _randn(2, 3, seed=14), _randn(2, 3, seed=15)
    torch.testing.assert_close(cfg2(cond, uncond, 1.0), cond, atol=1e-6, rtol=0)
    assert torch.equal(cfg2(cond, uncond, 0.0), uncond)
    assert torch.equal(cfg2(uncond, uncond, 4.5), uncond)
    assert cfg2(torch.tensor(3.0), torch.tensor(1.0), 4.5) == 10.0


def test_cfg3_reductions():
    full, na, nt = _randn(2, 3, seed=16), _randn(2, 3, seed=17), _randn(2, 3, seed=18)
    torch.testing.assert_close(cfg3(full, nt, nt, 4.5, 4.5), cfg2(full, nt, 4.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(cfg3(full, na, nt, 4.5, 4.5), cfg2(full, nt, 4.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(cfg3(full, na, nt, 1.0, 1.0), full, atol=1e-6, rtol=0)
    # which scale multiplies which difference: nt + 2·(3 - 1) + 10·(6 - 3) = 35 (swapped would be 27)
    assert cfg3(torch.tensor(6.0), torch.tensor(3.0), torch.tensor(1.0), 2.0, 10.0) == 35.0


def test_linear_guidance_hunyuan_avatar_recipe():
    assert linear_guidance(0, 50, 7.5, 2.0) == 7.5
    assert linear_guidance(9, 50, 7.5, 2.0) == pytest.approx(6.51)
    assert linear_guidance(10, 50, 6.5, 3.5) == pytest.approx(5.9)
    assert linear_guidance(49, 50, 6.5, 3.5) == pytest.approx(3.56)
    sched = linear_guidance_schedule(50, 6.5, 3.5)
    assert len(sched) == 50 and all(a > b for a, b in zip(sched, sched[1:]))
    with pytest.raises(ValueError):
        linear_guidance(50, 50, 6.5, 3.5)


# ---- input validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_shift_raises(shift):
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(torch.tensor([0.5]), shift)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(4, shift)
    with pytest.raises(ValueError, match="shift"):
        warped_schedule([1000, 500], shift)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_steps=0), dict(num_steps=4, sigma_min=0.5, sigma_max=0.5), dict(num_steps=4, sigma_max=1.5),
     dict(num_steps=4, extra_one_step=False)],
)
def test_bad_flow_sigmas_raise(kwargs):
    with pytest.raises(ValueError):
        flow_sigmas(shift=5.0, **kwargs)


@pytest.mark.parametrize(
    "steps", [[], [0], [500, 750], [1000, 1000], [1001, 500], [1000, 0, 500], [1000, 750.5]]
)
def test_bad_step_lists_raise(steps):
    with pytest.raises(ValueError):
        warped_schedule(steps, 5.0)


@pytest.mark.parametrize(
    "sigmas", [[1.0, 0.5, 0.5, 0.0], [0.5, 1.0, 0.0], [1.0], [1.5, 0.5, 0.0], [1.0, 0.5, -0.1], [[1.0, 0.0]]]
)
def test_bad_sampler_sigmas_raise(sigmas):
    with pytest.raises(ValueError):
        FlowMatchSampler.from_sigmas(sigmas)


def test_bad_sampler_mode_and_timesteps_raise():
    with pytest.raises(ValueError, match="mode"):
        FlowMatchSampler.from_sigmas([1.0, 0.0], mode="ddim")
    with pytest.raises(ValueError, match="timesteps"):
        FlowMatchSampler(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1000.0]))
    with pytest.raises(IndexError):
        FlowMatchSampler.from_sigmas([1.0, 0.0]).step(torch.zeros(1), torch.zeros(1), 1)
