"""Batched generation: several sessions' blocks in one DiT call per pass equal each session run alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avatar.generator import CausalGenerator, CausalOptions, Conditions, Guidance
from models.config import TINY
from models.dit import WanDiT
from models.kv_cache import CacheGroup

H = W = 4  # latents -> 2x2 tokens per frame
ATOL = 1e-5
# 2-pass audio CFG, a window of 2 blocks: it wraps (and the sink moves) from the third block on
OPTS = CausalOptions(block_frames=2, sink_frames=1, window_frames=4, steps=(1000, 750, 500),
                     guidance=Guidance(audio_scale=2.0))


@pytest.fixture(scope="module")
def dit(randomize):
    torch.manual_seed(0)
    return randomize(WanDiT(TINY).eval())


def _avatar(seed: int, chars: int = 1) -> Conditions:
    """A different avatar per seed: reference, emotion reference, face mask, context and motion."""
    g = torch.Generator().manual_seed(seed)
    return Conditions(reference=torch.randn(1, 16, 1, H, W, generator=g),
                      emotion=torch.randn(1, 16, 1, H, W, generator=g),
                      face_mask=(torch.rand(1, chars, H // 2, W // 2, generator=g) > 0.3).float(),
                      context=torch.randn(1, 3 + seed % 4, TINY.text_dim, generator=g),
                      motion=0.1 * (seed % 7))


def _audio(session: int, block: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * session + block)
    return torch.randn(1, frames, 4, TINY.audio_dim, generator=g)


def _alone(gen: CausalGenerator, cond: Conditions, seed: int, session: int, blocks: int) -> list[torch.Tensor]:
    state = gen.init_state(cond, seed=seed)
    gen.prefill_reference(state, _audio(session, 0, 1))
    return [gen.generate_block(state, _audio(session, b + 1, OPTS.block_frames)) for b in range(blocks)]


@torch.no_grad()
@pytest.mark.parametrize("context_sigma", [0.0, 0.05])
def test_sessions_at_different_blocks_batched_equal_each_alone(dit, context_sigma):
    """Three sessions with different avatars join at blocks 0, 2 and 5 of the first one; from then on every
    round is one batched call, so rows sit at different frames, ring offsets and sink positions, and the
    youngest sessions' windows are not yet full (padded keys) while the oldest's has wrapped."""
    gen = CausalGenerator(dit, replace(OPTS, context_sigma=context_sigma))
    joins, rounds = [0, 2, 5], 9
    conds = [_avatar(10 + i) for i in range(3)]
    states, done = [], []
    batched: list[list[torch.Tensor]] = [[] for _ in joins]
    widths = set()
    for r in range(rounds):
        for i, j in enumerate(joins):
            if j == r:  # a new session: its reference prefill runs alone
                st = gen.init_state(conds[i], seed=100 + i)
                gen.prefill_reference(st, _audio(i, 0, 1))
                states.append(st)
                done.append(0)
        audios = [_audio(i, done[i] + 1, OPTS.block_frames) for i in range(len(states))]
        widths.add(tuple(st.next_frame for st in states))
        for i, x in enumerate(gen.generate_blocks(states, audios)):
            batched[i].append(x)
            done[i] += 1
    assert any(len(set(w)) == 3 for w in widths)  # a batch really held three different block indices
    for i, blocks in enumerate(batched):
        alone = _alone(gen, conds[i], 100 + i, i, len(blocks))
        for got, want in zip(blocks, alone):
            assert got.shape == want.shape == (1, 16, OPTS.block_frames, H, W)
            assert (got - want).abs().max() <= ATOL
    # the sessions' outputs really differ (a batch that mixed rows up would show here)
    assert (batched[0][-1] - batched[1][-1]).abs().max() > 1e-2


@torch.no_grad()
def test_one_session_through_the_batched_path_is_bit_identical(dit):
    gen = CausalGenerator(dit, OPTS)
    a, b = gen.init_state(_avatar(3), seed=5), gen.init_state(_avatar(3), seed=5)
    for st in (a, b):
        gen.prefill_reference(st, _audio(0, 0, 1))
    for blk in range(3):
        x = gen.generate_block(a, _audio(0, blk + 1, 2))
        (y,) = gen.generate_blocks([b], [_audio(0, blk + 1, 2)])
        assert torch.equal(x, y)


@torch.no_grad()
def test_batch_keys_separate_what_cannot_share_a_call(dit):
    gen = CausalGenerator(dit, OPTS)
    fresh = gen.init_state(_avatar(1))
    assert gen.batch_key(fresh) is None  # the reference prefill runs alone
    states = [gen.init_state(c) for c in (_avatar(1), _avatar(2), _avatar(3, chars=2),
                                          Conditions(reference=torch.randn(1, 16, 1, H, W)))]
    for st in states:
        st.next_frame = 1
    keys = [gen.batch_key(st) for st in states]
    assert keys[0] == keys[1] and keys[0] != keys[2] and keys[0] != keys[3]
    with pytest.raises(ValueError, match="sessions batched together must all have"):
        gen.model.many(torch.zeros(2, 16, 2, H, W), torch.tensor([500.0]), [states[0].cond, states[3].cond],
                       [_audio(0, 1, 2)] * 2, [None, None])


def test_cache_group_checks_its_members(dit):
    c1 = dit.init_cache(2, H, W, sink_frames=1, window_frames=4, block_frames=2)
    c2 = dit.init_cache(2, 8, 8, sink_frames=1, window_frames=4, block_frames=2)
    with pytest.raises(ValueError, match="different models or frame sizes"):
        CacheGroup([c1, c2])
    with pytest.raises(ValueError, match="appears twice"):
        CacheGroup([c1, c1])
    group = CacheGroup([c1, dit.init_cache(2, H, W, sink_frames=1, window_frames=4, block_frames=2)])
    with pytest.raises(ValueError, match="share one cache but start at frames"):
        group.begin_block([0, 1, 0, 0], 1)


# ---- the engine: a worker that batches ready sessions -----------------------------------------------------
ENGINE_OPTS = CausalOptions(block_frames=2, sink_frames=1, window_frames=2, steps=(1000, 500),
                            guidance=Guidance(audio_scale=2.0))


def _speech(seconds: float, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


async def _run_engine(bundle, max_batch: int, patch=None):
    """Three sessions with different avatars and lengths of speech, opened a little apart; returns each
    session's items and the engine's batch sizes. The engine's first DiT call waits until all three have
    their audio, so session 0 is one block ahead when the others join it, whatever the CPU's speed: the
    next call can batch different block indices."""
    import asyncio
    import threading

    from avatar.engine import AvatarEngine, EngineOptions
    from avatar.session import SessionOptions
    from avatar.types import SegmentEnd, SessionError

    opts = EngineOptions(causal=ENGINE_OPTS, max_sessions=3, decoder="torch", max_batch=max_batch)
    all_pushed = threading.Event()
    pushed = 0
    with AvatarEngine(bundle, opts) as eng:
        if patch:
            patch(eng)
        gen = eng.generator
        blocks, unit = gen.generate_blocks, gen.generate_unit

        def gated(call):
            def run(*a, **k):
                assert all_pushed.wait(60), "the sessions never all pushed their audio"
                return call(*a, **k)
            return run

        gen.generate_blocks, gen.generate_unit = gated(blocks), gated(unit)

        async def speak(i: int):
            await asyncio.sleep(0.15 * i)
            g = torch.Generator().manual_seed(50 + i)
            cond = Conditions(reference=torch.randn(1, 16, 1, 4, 4, generator=g), motion=0.2 * i)
            s = eng.open_session(cond, SessionOptions(realtime=False, seed=i))
            s.push_audio(_speech(0.8 + 0.3 * i, i), 16_000)
            s.end_segment()
            nonlocal pushed
            pushed += 1
            if pushed == 3:
                all_pushed.set()
            items = []
            async for item in s:
                items.append(item)
                if isinstance(item, (SegmentEnd, SessionError)):
                    break
            s.close()
            return items

        out = await asyncio.wait_for(asyncio.gather(*(speak(i) for i in range(3))), 240)
        return out, dict(eng.batch_sizes), eng.failures


@pytest.fixture(scope="module")
def bundle():
    from avatar.engine import ModelBundle

    return ModelBundle.random("tiny", "tiny", seed=0)


@pytest.mark.timeout(600)
async def test_a_batching_engine_streams_what_one_at_a_time_streams(bundle):
    """Same sessions, same seeds: the frames of a batching engine equal an unbatched engine's. Not bit for bit:
    a batched call rounds the last float bits differently (other GEMM shapes, padded+masked keys), so a pixel
    at a uint8 rounding edge may move by one level; the latents themselves agree to 1e-5 (tests above)."""
    import numpy as np

    from avatar.types import AvatarFrame

    alone, sizes1, _ = await _run_engine(bundle, 1)
    batched, sizes3, failures = await _run_engine(bundle, 3)
    # batches really ran: after the gate, session 0 (block 1) and the others (block 0) shared one call
    assert set(sizes1) == {1} and max(sizes3) == 3 and failures == 0
    for a, b in zip(alone, batched):
        fa = [x for x in a if isinstance(x, AvatarFrame)]
        fb = [x for x in b if isinstance(x, AvatarFrame)]
        assert len(fa) == len(fb) >= 20 and [f.pts for f in fb] == list(range(len(fb)))  # order kept
        va, vb = np.stack([f.video for f in fa]).astype(int), np.stack([f.video for f in fb]).astype(int)
        assert np.abs(va - vb).max() <= 1 and (va != vb).mean() < 1e-3
        for x, y in zip(fa, fb):
            np.testing.assert_array_equal(x.audio, y.audio)
    first = [f.video for f in alone[0] if isinstance(f, AvatarFrame)]
    other = [f.video for f in alone[1] if isinstance(f, AvatarFrame)]
    assert np.abs(first[-1].astype(int) - other[-1].astype(int)).max() > 10  # the avatars differ


@pytest.mark.timeout(600)
async def test_a_failure_inside_a_batch_fails_only_the_session_at_fault(bundle):
    """The batched call fails whenever the bad session is in it; re-run one at a time, only that one fails."""
    from avatar.types import AvatarFrame, SegmentEnd, SessionError

    def patch(eng):
        gen = eng.generator
        blocks, unit = gen.generate_blocks, gen.generate_unit

        def is_bad(state):
            return state.cond.motion == pytest.approx(0.2) and state.next_frame >= 5

        def generate_blocks(states, *a, **k):
            if any(is_bad(st) for st in states):
                raise RuntimeError("bad block")
            return blocks(states, *a, **k)

        def generate_unit(state, *a, **k):
            if is_bad(state):
                raise RuntimeError("bad block")
            return unit(state, *a, **k)

        gen.generate_blocks, gen.generate_unit = generate_blocks, generate_unit

    out, sizes, failures = await _run_engine(bundle, 3, patch)
    assert isinstance(out[1][-1], SessionError) and "bad block" in out[1][-1].message
    for i in (0, 2):
        assert isinstance(out[i][-1], SegmentEnd) and sum(isinstance(x, AvatarFrame) for x in out[i]) >= 20
    assert failures == 1 and max(sizes) >= 2


def test_max_batch_is_validated(bundle):
    from avatar.engine import AvatarEngine, EngineOptions

    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        AvatarEngine(bundle, EngineOptions(max_batch=0))


def test_the_first_block_is_one_latent_and_batches_only_with_first_blocks(dit):
    """The stream's first picture waits for the first block (`FrameDecoder.open_at`), so that block is one
    latent whatever `block_frames` is; a session in it cannot share a batched call with one further on."""
    from avatar.generator import Unit

    gen = CausalGenerator(dit, OPTS)
    young, old = gen.init_state(_avatar(1), seed=1), gen.init_state(_avatar(1), seed=2)
    assert gen.batch_key(young) is None  # the reference prefill runs alone
    units = []
    for st in (young, old):
        gen.prefill_reference(st, _audio(0, 0, 1))
    for _ in range(3):
        unit = gen.next_unit(old)
        units.append(unit)
        gen.generate_block(old, _audio(0, 1, unit.count))
    assert units == [Unit(1, 1), Unit(2, 2), Unit(4, 2)]
    assert gen.next_unit(young) == Unit(1, 1) and gen.batch_key(young) != gen.batch_key(old)
    assert CausalGenerator(dit, replace(OPTS, first_block_frames=5)).next_unit(young) == Unit(1, 2)  # at most a block
    with pytest.raises(ValueError, match="first_block_frames"):
        CausalOptions(first_block_frames=0)
