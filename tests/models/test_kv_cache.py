"""Block-causal generation through the KV cache equals the full forward under the matching mask."""

from __future__ import annotations

import pytest
import torch

from models.attention import block_causal_frame_mask
from models.config import TINY
from models.dit import WanDiT

H = W = 4  # latent grid -> 2x2 = 4 tokens per frame
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = WanDiT(TINY).eval()
    with torch.no_grad():  # wake every zero-initialised module so the test covers them
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _inputs(frames, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, frames, H, W, generator=g),
        y=torch.randn(batch, 17, frames, H, W, generator=g),
        audio=torch.randn(batch, frames, 4, TINY.audio_dim, generator=g),
        context=torch.randn(batch, TINY.text_len, TINY.text_dim, generator=g),
        reference=torch.randn(batch, 16, H, W, generator=g),
        emotion=torch.randn(batch, 16, H, W, generator=g),
        face_mask=(torch.rand(batch, 1, H // 2, W // 2, generator=g) > 0.4).float(),
    )


def _call(model, inp, t, sl=slice(None), **kw):
    return model(inp["x"][:, :, sl], t, inp["context"], y=inp["y"][:, :, sl], audio=inp["audio"][:, sl],
                 reference=inp["reference"], emotion=inp["emotion"], face_mask=inp["face_mask"], **kw)


def _cache(model, sink, window, block, batch=1):
    return model.init_cache(batch, H, W, sink_frames=sink, window_frames=window, block_frames=block)


@torch.no_grad()
def test_four_cached_blocks_equal_full_block_causal_forward(model):
    n, blk = 8, 2
    inp = _inputs(n)
    t = torch.tensor([600.0])
    full = _call(model, inp, t, frame_mask=block_causal_frame_mask(n, blk))
    cache = _cache(model, sink=1, window=n, block=blk)
    for j in range(n // blk):
        sl = slice(j * blk, (j + 1) * blk)
        out = _call(model, inp, t, sl, cache=cache, start_frame=j * blk)
        torch.testing.assert_close(out, full[:, :, sl], atol=ATOL, rtol=0)
    # and the block-causal result differs from bidirectional attention, so the mask matters
    assert (full - _call(model, inp, t)).abs().max() > 1e-3


@torch.no_grad()
def test_denoise_passes_then_clean_pass_leave_clean_kv(model):
    """Self-Forcing protocol: noisy passes overwrite the block's slots; the t=0 pass leaves clean K/V.
    Equivalent full forward: earlier frames clean at t=0, the last block noisy (per-frame timesteps)."""
    n, blk = 6, 2
    clean, noisy = _inputs(n, seed=0), _inputs(n, seed=5)
    cache = _cache(model, sink=1, window=n, block=blk)
    for j in range(n // blk - 1):
        sl = slice(j * blk, (j + 1) * blk)
        for step_t in (900.0, 500.0):  # denoising passes on noisy inputs
            _call(model, {**clean, "x": noisy["x"]}, torch.tensor([step_t]), sl, cache=cache, start_frame=j * blk)
        _call(model, clean, torch.tensor([0.0]), sl, cache=cache, start_frame=j * blk)  # clean pass
    last = slice(n - blk, n)
    mixed = {**clean, "x": torch.cat([clean["x"][:, :, : n - blk], noisy["x"][:, :, last]], dim=2)}
    got = _call(model, mixed, torch.tensor([500.0]), last, cache=cache, start_frame=n - blk)
    t_frames = torch.tensor([[0.0] * (n - blk) + [500.0] * blk])
    full = _call(model, mixed, t_frames, frame_mask=block_causal_frame_mask(n, blk))
    torch.testing.assert_close(got, full[:, :, last], atol=ATOL, rtol=0)


@torch.no_grad()
def test_rolling_window_with_sink_equals_windowed_mask(model):
    """Eviction keeps the sink frame; the result equals the sink + local-window mask."""
    n, blk, sink, window = 12, 2, 1, 3
    inp = _inputs(n, seed=2)
    t = torch.tensor([300.0])
    full = _call(model, inp, t, frame_mask=block_causal_frame_mask(n, blk, sink_frames=sink, window_frames=window))
    cache = _cache(model, sink=sink, window=window, block=blk)
    for j in range(n // blk):
        sl = slice(j * blk, (j + 1) * blk)
        out = _call(model, inp, t, sl, cache=cache, start_frame=j * blk)
        torch.testing.assert_close(out, full[:, :, sl], atol=ATOL, rtol=0)
    cache.commit()
    assert cache.history_frames == [0, 9, 10, 11]  # sink frame 0 survives; frames 1..8 were evicted


@torch.no_grad()
def test_reference_block_of_one_frame_then_blocks_of_three(model):
    """A 1-frame first block (the reference, kept as sink) followed by 3-frame blocks."""
    n = 7
    inp = _inputs(n, seed=3)
    t = torch.tensor([250.0])
    full = _call(model, inp, t, frame_mask=block_causal_frame_mask(n, 3, first_block_frames=1))
    cache = _cache(model, sink=1, window=6, block=3)
    for start, size in ((0, 1), (1, 3), (4, 3)):
        sl = slice(start, start + size)
        torch.testing.assert_close(_call(model, inp, t, sl, cache=cache, start_frame=start), full[:, :, sl],
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_appending_a_block_never_changes_earlier_outputs(model):
    inp = _inputs(8, seed=4)
    t = torch.tensor([700.0])
    short = _call(model, {k: v[:, :, :6] if k in ("x", "y") else v for k, v in inp.items()}, t, slice(0, 6),
                  frame_mask=block_causal_frame_mask(6, 2))
    long = _call(model, inp, t, frame_mask=block_causal_frame_mask(8, 2))
    torch.testing.assert_close(long[:, :, :6], short, atol=ATOL, rtol=0)


@torch.no_grad()
def test_two_sessions_on_one_model_do_not_interfere(model):
    a_in, b_in = _inputs(6, seed=10), _inputs(6, seed=11)
    t = torch.tensor([400.0])

    def alone(inp):
        cache = _cache(model, 1, 6, 2)
        return [_call(model, inp, t, slice(s, s + 2), cache=cache, start_frame=s) for s in (0, 2, 4)]

    ref_a, ref_b = alone(a_in), alone(b_in)
    ca, cb = _cache(model, 1, 6, 2), _cache(model, 1, 6, 2)
    for i, s in enumerate((0, 2, 4)):  # interleaved
        out_a = _call(model, a_in, t, slice(s, s + 2), cache=ca, start_frame=s)
        out_b = _call(model, b_in, t, slice(s, s + 2), cache=cb, start_frame=s)
        assert torch.equal(out_a, ref_a[i]) and torch.equal(out_b, ref_b[i])


@torch.no_grad()
def test_batched_sessions_in_one_cache(model):
    """Batch 2 (e.g. CFG branches) through one cache equals each sample alone."""
    inp = _inputs(4, seed=7, batch=2)
    t = torch.tensor([400.0, 400.0])
    cache = _cache(model, 1, 4, 2, batch=2)
    outs = [_call(model, inp, t, slice(s, s + 2), cache=cache, start_frame=s) for s in (0, 2)]
    for bi in range(2):
        one = {k: v[bi:bi + 1] for k, v in inp.items()}
        c1 = _cache(model, 1, 4, 2)
        for s, o in zip((0, 2), outs):
            torch.testing.assert_close(_call(model, one, t[:1], slice(s, s + 2), cache=c1, start_frame=s),
                                       o[bi:bi + 1], atol=ATOL, rtol=0)


def test_cache_protocol_errors(model):
    inp = _inputs(4)
    t = torch.tensor([100.0])
    cache = _cache(model, 1, 2, 2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="expects frame 0"):
            _call(model, inp, t, slice(2, 4), cache=cache, start_frame=2)
        _call(model, inp, t, slice(0, 2), cache=cache, start_frame=0)
        with pytest.raises(ValueError, match="changed length"):
            _call(model, inp, t, slice(0, 1), cache=cache, start_frame=0)
        with pytest.raises(ValueError, match="1..2"):
            _call(model, inp, t, slice(0, 3), cache=cache, start_frame=2)
        with pytest.raises(ValueError, match="frame_lens"):
            _call(model, inp, t, slice(0, 2), cache=cache, start_frame=0, frame_lens=torch.tensor([2]))
    cache.reset()
    assert cache.next_frame == 0 and cache.history_frames == []


@torch.no_grad()
def test_sink_follows_keeps_the_sink_just_before_the_window(model):
    """After many blocks the sink keys equal keys computed fresh at the position just before the history
    (checked at layer 0, whose keys depend on the frame alone), so geometry never drifts with time."""
    n, blk, window = 14, 2, 4
    inp = _inputs(n, seed=8)
    t = torch.tensor([300.0])
    follow = model.init_cache(1, H, W, sink_frames=1, window_frames=window, block_frames=blk, sink_follows=True)
    fixed = _cache(model, sink=1, window=window, block=blk)
    outs = []
    for s in range(0, n, blk):
        sl = slice(s, s + blk)
        a = _call(model, inp, t, sl, cache=follow, start_frame=s)
        b = _call(model, inp, t, sl, cache=fixed, start_frame=s)
        outs.append((s, torch.equal(a, b)))
    # identical while the ring is filling, different once the sink has moved
    assert [eq for s, eq in outs if s < 1 + window] == [True] * 3 and not outs[-1][1]
    assert follow.sink_pos == 12 - window - 1  # last block starts at 12
    keys = {}
    hook = model.blocks[0].self_attn.norm_k.register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    from models.rope import apply_rope, rope_table

    _call(model, inp, t, slice(0, 1), start_frame=follow.sink_pos)  # frame 0 alone at the sink position
    hook.remove()
    k = keys["k"].view(1, 4, TINY.num_heads, TINY.head_dim)
    fresh = apply_rope(k, rope_table(TINY.rope_split, (1, 2, 2), follow.sink_pos, k.device))
    torch.testing.assert_close(follow.k[0, :, :4], fresh, atol=1e-5, rtol=0)


@torch.no_grad()
def test_blocks_far_into_a_stream_run(model):
    """Positions are computed, not looked up: block 2000 works (no table to run off)."""
    cache = _cache(model, sink=1, window=2, block=2)
    cache.next_frame = 4000  # as if 2000 blocks had passed
    inp = _inputs(2)
    out = _call(model, inp, torch.tensor([500.0]), cache=cache, start_frame=4000)
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_a_cache_group_runs_sessions_at_different_frames_as_each_alone(model):
    """Two sessions' caches in one call: one has wrapped its ring with the sink moved, the other's window is
    not yet full (its keys are padded and masked); per-row RoPE puts each row at its own frame."""
    from models.kv_cache import CacheGroup

    inp = [_inputs(8, seed=20), _inputs(8, seed=21)]
    t = torch.tensor([400.0, 400.0])
    follow = dict(sink_frames=1, window_frames=2, block_frames=2, sink_follows=True)
    grouped = [model.init_cache(1, H, W, **follow) for _ in inp]
    alone = [model.init_cache(1, H, W, **follow) for _ in inp]
    history = (3, 1)  # blocks each session has already generated
    for i in range(2):
        for c in (grouped[i], alone[i]):
            for j in range(history[i]):
                _call(model, inp[i], t[:1], slice(2 * j, 2 * j + 2), cache=c, start_frame=2 * j)
    starts = [2 * n for n in history]  # (6, 2)
    def block(d, s):  # session d's inputs for frames [s, s + 2)
        return {**d, "x": d["x"][:, :, s:s + 2], "y": d["y"][:, :, s:s + 2], "audio": d["audio"][:, s:s + 2]}

    both = {k: torch.cat([block(inp[i], starts[i])[k] for i in range(2)]) for k in inp[0]}
    group = CacheGroup(grouped)
    out = _call(model, both, t, cache=group, start_frame=starts)
    assert group.key_mask("cpu").sum(1).tolist() == [(1 + 2 + 2) * 4, (1 + 2 + 2) * 4 - 4]
    for i in range(2):
        want = _call(model, inp[i], t[:1], slice(starts[i], starts[i] + 2), cache=alone[i], start_frame=starts[i])
        torch.testing.assert_close(out[i:i + 1], want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="need a CacheGroup"):
        _call(model, both, t, cache=model.init_cache(2, H, W, **follow), start_frame=starts)
