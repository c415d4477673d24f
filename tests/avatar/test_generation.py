"""Generation modes: causal streaming == offline block-causal; fusion == the upstream loop; overlap keeps its prefix."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avatar.chunking import (
    FusionOptions,
    OverlapGenerator,
    OverlapOptions,
    denoise_with_prefix,
    generate_fused,
    bounded_position_shift,
    position_shift_fusion,
    window_starts,
    LiveFusionGenerator,
    LiveFusionOptions,
)
from avatar.generator import CausalGenerator, CausalOptions, Conditions, Guidance, GuidedModel
from models.attention import block_causal_frame_mask
from models.config import TINY
from models.dit import WanDiT
from models.sampling import FlowMatchSampler, flow_sigmas

H = W = 4


@pytest.fixture(scope="module")
def dit(randomize):
    torch.manual_seed(0)
    return randomize(WanDiT(TINY).eval())


def _cond(seed=0, chars=1):
    g = torch.Generator().manual_seed(seed)
    return Conditions(reference=torch.randn(1, 16, 1, H, W, generator=g),
                      emotion=torch.randn(1, 16, 1, H, W, generator=g),
                      face_mask=torch.ones(1, chars, H // 2, W // 2))


def _audio(frames, seed=3):
    return torch.randn(1, frames, 4, TINY.audio_dim, generator=torch.Generator().manual_seed(seed))


def _offline_block_causal(dit, cond, audio, opts, seed):
    """Reference: every step is a full forward over [clean history | noisy block] with per-frame timesteps
    under the block-causal (sink + window) mask; the noise is drawn in the same order as the stream."""
    gen = CausalGenerator(dit, opts)
    model = GuidedModel(dit, opts.guidance)
    noise = torch.Generator().manual_seed(seed)
    n = opts.block_frames
    total = audio.shape[1]
    clean = cond.reference
    for s in range(1, total, n):
        x = torch.randn((1, 16, n, H, W), generator=noise)
        frames = s + n
        mask = block_causal_frame_mask(frames, n, sink_frames=opts.sink_frames, window_frames=opts.window_frames,
                                       first_block_frames=1)
        for i, t in enumerate(gen.sampler.timesteps):
            sig, sig_next = float(gen.sampler.sigmas[i]), float(gen.sampler.sigmas[i + 1])
            t_frames = torch.tensor([[1000 * opts.context_sigma] * s + [float(t)] * n])
            v = model(torch.cat([clean, x], 2), t_frames, cond, audio[:, :frames], known_frames=1,
                      frame_mask=mask)[:, :, s:]
            x0 = x - sig * v
            if sig_next > 0:
                x = (1 - sig_next) * x0 + sig_next * torch.randn(x.shape, generator=noise)
        clean = torch.cat([clean, x0], 2)
    return clean


@pytest.mark.parametrize("guidance", [Guidance(), Guidance(audio_scale=2.5)])
def test_causal_stream_equals_offline_block_causal(dit, guidance):
    opts = CausalOptions(block_frames=2, sink_frames=1, window_frames=2, steps=(1000, 500), guidance=guidance,
                         sink_follows=False)  # the offline reference keeps absolute positions
    cond, audio = _cond(), _audio(7)
    gen = CausalGenerator(dit, opts)
    state = gen.init_state(cond, seed=11)
    out = [gen.prefill_reference(state, audio[:, :1])]
    for s in range(1, 7, 2):
        out.append(gen.generate_block(state, audio[:, s:s + 2]))
    stream = torch.cat(out, 2)
    offline = _offline_block_causal(dit, cond, audio, opts, seed=11)
    torch.testing.assert_close(stream, offline, atol=2e-5, rtol=0)
    assert state.next_frame == 7 and state.cache.history_frames == [0, 3, 4]


def test_context_sigma_is_a_noise_level_not_a_timestep():
    with pytest.raises(ValueError, match="context_sigma"):
        CausalOptions(context_sigma=30.0)  # the old timestep unit is refused, not silently clamped
    with pytest.raises(ValueError, match="context_sigma"):
        CausalOptions(context_sigma=-0.01)
    assert CausalOptions(context_sigma=0.03).context_sigma == 0.03


def test_causal_state_reset_replays_the_same_stream(dit):
    gen = CausalGenerator(dit, CausalOptions(block_frames=2, steps=(1000, 500)))
    cond, audio = _cond(), _audio(3)
    state = gen.init_state(cond, seed=5)
    gen.prefill_reference(state, audio[:, :1])
    first = gen.generate_block(state, audio[:, 1:3])
    state.reset(seed=5)
    gen.prefill_reference(state, audio[:, :1])
    assert torch.equal(gen.generate_block(state, audio[:, 1:3]), first)


def _toy_fn(weights):
    """A denoiser that depends on x, t, window-relative position and the absolute frames (like audio)."""
    def fn(x, t, frames):
        rel = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        absf = torch.tensor(frames, dtype=x.dtype).view(1, 1, -1, 1, 1)
        return weights * x + 0.01 * rel - 0.002 * absf * (t / 1000) + 0.05 * torch.sin(absf)
    return fn


def _upstream_fusion(fn, noise, sigmas, window, alpha):
    """Literal transcription of HunyuanVideo-Avatar's loop with python lists."""
    latents_all = noise.clone()
    n = noise.shape[2]
    shift = 0
    for i in range(len(sigmas) - 1):
        t = sigmas[i] * 1000
        acc = torch.zeros_like(latents_all)
        cnt = [0] * n
        for s in range(0, n, window):
            s -= shift
            idx = [(s + j) % n for j in range(window)]
            x = latents_all[:, :, idx]
            x = x + (sigmas[i + 1] - sigmas[i]) * fn(x, t.reshape(1), idx)
            for j, f in enumerate(idx):
                acc[:, :, f] += x[:, :, j]
                cnt[f] += 1
        shift = (shift + alpha) % window
        latents_all = acc / torch.tensor(cnt, dtype=acc.dtype).view(1, 1, n, 1, 1)
    return latents_all


@pytest.mark.parametrize("n,window,alpha", [(11, 4, 3), (12, 4, 1), (9, 9, 2), (10, 3, 2)])
def test_fusion_equals_the_upstream_loop(n, window, alpha):
    noise = torch.randn(1, 2, n, 2, 2, generator=torch.Generator().manual_seed(n))
    sigmas = flow_sigmas(6, 3.0)
    fn = _toy_fn(torch.tensor(-0.3))
    got = position_shift_fusion(fn, noise, FlowMatchSampler.from_sigmas(sigmas), window, alpha)
    want = _upstream_fusion(fn, noise, sigmas, window, alpha)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if n % window:  # the wrapped window overlaps the first one: averaging happened and mattered
        no_shift = position_shift_fusion(fn, noise, FlowMatchSampler.from_sigmas(sigmas), window, 0)
        assert not torch.allclose(got, no_shift) or alpha % window == 0


def test_fusion_with_one_window_and_no_shift_is_plain_sampling():
    noise = torch.randn(1, 2, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(5, 2.0)
    fn = _toy_fn(torch.tensor(-0.5))
    x = noise.clone()
    for i in range(5):
        x = x + (sigmas[i + 1] - sigmas[i]) * fn(x, (sigmas[i] * 1000).reshape(1), list(range(6)))
    torch.testing.assert_close(position_shift_fusion(fn, noise, FlowMatchSampler.from_sigmas(sigmas), 6, 0), x,
                               atol=1e-6, rtol=0)


def test_generate_fused_runs_the_dit_over_a_long_clip(dit):
    out = generate_fused(dit, _cond(), _audio(10), 10, FusionOptions(window_frames=4, shift_offset=3, steps=3))
    assert out.shape == (1, 16, 10, H, W) and torch.isfinite(out).all()


def test_prefix_stays_exactly_clean():
    seen = []

    def fn(x, t, frames):
        seen.append(x[:, :, :2].clone())
        return torch.ones_like(x)

    prefix = torch.randn(1, 2, 2, 2, 2)
    out = denoise_with_prefix(fn, torch.randn(1, 2, 5, 2, 2), prefix, FlowMatchSampler.flow(4, 1.0), list(range(5)))
    assert torch.equal(out[:, :, :2], prefix) and all(torch.equal(s, prefix) for s in seen)


def test_overlap_chunks_carry_the_tail_and_the_reference(dit):
    gen = OverlapGenerator(dit, OverlapOptions(chunk_frames=4, overlap_frames=2, steps=3))
    cond = _cond()
    state = gen.init_state(cond, seed=1)
    assert gen.chunk_span(state) == (0, 1, 3)
    c0 = gen.generate_chunk(state, _audio(4, 1))
    assert c0.shape[2] == 4 and torch.equal(c0[:, :, :1], cond.reference)
    tail = state.tail.clone()
    assert gen.chunk_span(state) == (2, 2, 2)
    c1 = gen.generate_chunk(state, _audio(4, 2))
    assert c1.shape[2] == 2 and torch.equal(tail, c0[:, :, 2:]) and state.next_frame == 6


def _plain_bounded_fusion(fn, noise, prefix, sigmas, window, alpha, first):
    """Reference: the upstream loop with the wrap replaced by sliding edge windows back inside, per frame."""
    x = noise.clone()
    n, p = x.shape[2], prefix.shape[2]
    x[:, :, :p] = prefix
    shift = 0
    for i in range(len(sigmas) - 1):
        t = (sigmas[i] * 1000).reshape(1)
        sums = {f: [] for f in range(n)}
        starts = []
        for s in range(0, n + window, window):
            s = s - shift
            if s >= n:
                break
            s = min(max(s, 0), n - window)
            if s in starts:
                continue
            starts.append(s)
            out = x[:, :, s:s + window] + (sigmas[i + 1] - sigmas[i]) * fn(
                x[:, :, s:s + window], t, [first + s + j for j in range(window)])
            for j in range(window):
                sums[s + j].append(out[:, :, j])
        x = torch.stack([torch.stack(sums[f]).mean(0) for f in range(n)], dim=2)
        x[:, :, :p] = prefix
        shift = (shift + alpha) % window
    return x


@pytest.mark.parametrize("n,window,alpha", [(7, 3, 1), (8, 3, 2), (6, 4, 3), (5, 5, 0)])
def test_bounded_fusion_equals_a_plain_reimplementation(n, window, alpha):
    noise = torch.randn(1, 2, n, 2, 2, generator=torch.Generator().manual_seed(n + window))
    prefix = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    sigmas = flow_sigmas(5, 3.0)
    fn = _toy_fn(torch.tensor(-0.4))
    got, next_shift = bounded_position_shift(fn, noise, prefix, FlowMatchSampler.from_sigmas(sigmas), window, alpha,
                                             first_frame=10)
    torch.testing.assert_close(got, _plain_bounded_fusion(fn, noise, prefix, sigmas, window, alpha, 10),
                               atol=1e-6, rtol=0)
    assert next_shift == (5 * alpha) % window
    assert torch.equal(got[:, :, :1], prefix)
    assert all(0 <= s <= n - window for s in window_starts(n, window, alpha))


def test_bounded_fusion_with_one_window_and_no_shift_is_prefix_sampling():
    noise = torch.randn(1, 2, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    prefix = torch.randn(1, 2, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    sampler = FlowMatchSampler.flow(4, 2.0)
    fn = _toy_fn(torch.tensor(-0.5))
    got, _ = bounded_position_shift(fn, noise, prefix, sampler, 6, 0)
    torch.testing.assert_close(got, denoise_with_prefix(fn, noise, prefix, sampler, list(range(6))), atol=1e-6, rtol=0)


def test_live_fusion_units_emit_blocks_and_keep_the_lookahead_out(dit):
    opts = LiveFusionOptions(block_frames=2, lookahead_frames=2, prefix_frames=1, window_frames=3,
                             shift_offset=1, steps=3)
    gen = LiveFusionGenerator(dit, opts)
    cond = _cond()
    state = gen.init_state(cond, seed=2)
    u0 = gen.next_unit(state)
    assert (u0.first, u0.count, u0.context, u0.lookahead, u0.audio_count) == (0, 3, 0, 2, 5)
    audio = _audio(12, 4)
    out0 = gen.generate_unit(state, audio[:, :5])
    assert out0.shape[2] == 3 and torch.equal(out0[:, :, :1], cond.reference)
    u1 = gen.next_unit(state)
    assert (u1.first, u1.count, u1.context, u1.audio_first, u1.audio_count) == (3, 2, 1, 2, 5)
    out1 = gen.generate_unit(state, audio[:, 2:7])
    assert out1.shape[2] == 2 and torch.isfinite(out1).all()
    assert torch.equal(state.tail, out1[:, :, -1:]) and state.next_frame == 5
    # the lookahead's audio matters (it is context), but the emitted prefix frame does not change
    other = gen.init_state(cond, seed=2)
    gen.generate_unit(other, audio[:, :5])
    changed = audio[:, 2:7].clone()
    changed[:, 3:] += 1.0  # only the lookahead latents' audio
    assert not torch.allclose(gen.generate_unit(other, changed), out1)


def test_the_motion_condition_reaches_the_dit():
    torch.manual_seed(0)
    dit = WanDiT(TINY.replace(motion_condition=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights (the head and the motion embedding start at zero)
        for p in dit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = GuidedModel(dit, Guidance())
    x = torch.randn(1, 16, 2, H, W)
    t = torch.tensor([500.0])
    out = {m: model(x, t, replace(_cond(), motion=m), None) for m in (None, 0.0, 1.0)}
    assert not torch.allclose(out[0.0], out[1.0]) and not torch.allclose(out[None], out[0.0])


def test_emotion_guidance_gives_the_unconditional_branch_the_reference_as_its_emotion(dit):
    """Guidance(emotion=True): v = v(no audio, emotion = reference) + s·(v(audio, emotion) − that), in one
    call; batched sessions each get their own reference in their unconditional row."""
    conds = [_cond(1), _cond(2)]
    x, t, audio = torch.randn(2, 16, 2, H, W), torch.tensor([500.0]), _audio(2)
    plain, guided = GuidedModel(dit, Guidance()), GuidedModel(dit, Guidance(audio_scale=2.0, emotion=True))
    with torch.no_grad():
        got = guided.many(x, t, conds, [audio, audio], [None, None])
        for i, c in enumerate(conds):
            full = plain(x[i:i + 1], t, c, audio)
            neutral = plain(x[i:i + 1], t, replace(c, emotion=c.reference), torch.zeros_like(audio))
            assert torch.allclose(got[i:i + 1], neutral + 2.0 * (full - neutral), atol=1e-5)
        without = GuidedModel(dit, Guidance(audio_scale=2.0)).many(x, t, conds, [audio, audio], [None, None])
    assert not torch.allclose(got, without, atol=1e-4)  # the emotion image does reach the unconditional branch


def test_noise_correlation_shares_a_fixed_draw_across_blocks_until_reset(dit):
    with pytest.raises(ValueError, match="noise_correlation"):
        CausalOptions(noise_correlation=1.5)
    gen = CausalGenerator(dit, CausalOptions(block_frames=2, steps=(1000, 500), noise_correlation=1.0))
    state = gen.init_state(_cond(), seed=5)
    a, b = gen._noise(state, (1, 16, 2, H, W)), gen._noise(state, (1, 16, 2, H, W))
    assert torch.equal(a, b) and torch.equal(a[:, :, 0], a[:, :, 1])  # all of the variance is the shared draw
    state.reset(seed=6)
    assert not torch.equal(gen._noise(state, (1, 16, 2, H, W)), a)
    half = CausalGenerator(dit, CausalOptions(block_frames=2, steps=(1000, 500), noise_correlation=0.5))
    state = half.init_state(_cond(), seed=5)
    x = torch.stack([half._noise(state, (1, 16, 2, H, W)) for _ in range(200)])  # (200, 1, 16, 2, H, W)
    assert abs(float(x.var()) - 1.0) < 0.1  # unit variance either way
    corr = torch.corrcoef(torch.stack([x[:-1].flatten(), x[1:].flatten()]))[0, 1]
    assert 0.4 < float(corr) < 0.6  # successive blocks share half their variance
