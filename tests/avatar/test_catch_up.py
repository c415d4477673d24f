"""A live session behind real time holds blocks (`SessionOptions.max_lag_s`) instead of falling further
behind: random TINY models on CPU, an engine slowed down on purpose."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
from avatar.generator import CausalGenerator, CausalOptions, Conditions, Guidance
from avatar.session import SessionOptions
from avatar.types import AvatarFrame, SessionError

OPTS = CausalOptions(block_frames=2, sink_frames=1, window_frames=2, steps=(1000, 500))
RATE = 16_000
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle():
    return ModelBundle.random("tiny", "tiny", seed=0)


def _cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditions(reference=torch.randn(1, 16, 1, 4, 4, generator=g))


def _speech(seconds):
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1.2 + np.sin(2 * np.pi * 3 * t)) / 2.2 + 0.01).astype(np.float32)


def test_a_held_block_costs_one_dit_call_and_moves_the_cursor_like_a_generated_one(bundle):
    gen = CausalGenerator(bundle.dit, CausalOptions(**{**OPTS.__dict__, "guidance": Guidance(audio_scale=2.0)}))
    state = gen.init_state(_cond())
    calls = []
    hook = bundle.dit.register_forward_hook(lambda *_: calls.append(1))
    audio = torch.randn(1, 2, 4, bundle.dit.cfg.audio_dim)
    try:
        with pytest.raises(RuntimeError, match="prefill_reference"):
            gen.hold_block(state, state.cond.reference, audio)
        gen.prefill_reference(state, audio[:, :1])
        calls.clear()
        x = gen.generate_block(state, audio)  # (1, 16, 2, 4, 4)
        generated = len(calls)
        calls.clear()
        held = gen.hold_block(state, x, audio)
    finally:
        hook.remove()
    assert generated == len(OPTS.steps) + 1 and len(calls) == 1  # guidance branches share one batched call
    assert state.next_frame == 5 and held.shape == x.shape
    assert torch.equal(held, x[:, :, -1:].expand_as(x))  # the last latent, held
    assert gen.generate_block(state, audio).shape == x.shape and state.next_frame == 7


async def _live(engine: AvatarEngine, options: SessionOptions, seconds: float) -> tuple[list[AvatarFrame], list, np.ndarray]:
    """Speech fed in 20 ms packets on the clock -> (frames, each frame's lag when it came out, the speech)."""
    s = engine.open_session(_cond(), options)
    speech = _speech(seconds)
    frames, lags = [], []

    async def feed():
        start = time.monotonic()
        for i in range(0, speech.size, 320):
            await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
            s.push_audio(speech[i:i + 320], RATE)

    async def read():
        async for item in s:
            if isinstance(item, SessionError):
                raise AssertionError(item.message)
            if isinstance(item, AvatarFrame):
                frames.append(item)
                lags.append(time.monotonic() - s.t0 - item.pts / 25)
                if s.t0 + item.pts / 25 > feeding_ends + 0.5:
                    return

    feeding_ends = s.t0 + seconds + 0.3
    try:
        await asyncio.wait_for(asyncio.gather(feed(), read()), 120)
    finally:
        s.close()
    return frames, lags, speech


@pytest.mark.parametrize("max_lag_s", [0.8, None])
async def test_a_session_behind_real_time_holds_blocks_and_keeps_every_sample_in_step(bundle, max_lag_s):
    """Each block takes 0.55 s to generate for 0.32 s of media. Without holds the delay grows all along the
    call; with max_lag_s it stays near the bound, the held frames repeat the frame before them, and the
    audio that went in comes out whole and in order either way."""
    engine = AvatarEngine(bundle, EngineOptions(causal=OPTS, decoder="torch", decode_ahead=0)).start()
    generate_unit = engine.generator.generate_unit

    def slow(state, *a, **k):
        if state.next_frame > 0:
            time.sleep(0.55)
        return generate_unit(state, *a, **k)

    engine.generator.generate_unit = slow
    try:
        options = SessionOptions(realtime=True, sample_rate=RATE, max_lag_s=max_lag_s)
        frames, lags, speech = await _live(engine, options, seconds=4.0)
    finally:
        engine.stop()
    out = np.concatenate([f.audio for f in frames])
    spoken = np.flatnonzero(out)
    np.testing.assert_array_equal(out[spoken], speech)  # all of it, in order, none lost or repeated
    assert [f.pts for f in frames] == list(range(len(frames)))
    held = [i for i, f in enumerate(frames) if f.held]
    late = float(np.median(lags[-10:]))
    if max_lag_s is None:
        assert not held and late > 2.5, late  # ~0.7 s of delay added per second of call
        return
    assert held and all(np.array_equal(frames[i].video, frames[i - 1].video) for i in held)
    assert not frames[0].held and any(not f.held for f in frames[held[0]:])  # it goes on generating
    # the bound, plus a block, its audio's lookahead and a slow block's time (0.55 s)
    assert late < max_lag_s + 1.0, late
