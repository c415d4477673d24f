"""Latent grouping against hand-computed tables (OmniAvatar's replicate-frame-0 layout)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.align import (
    faa_tokens,
    group_by_latent,
    latent_gather_index,
    latent_to_video_frames,
    num_latent_frames,
    num_video_frames,
    video_frames_for_block,
    video_to_latent_frame,
)

# Written out by hand from the rule "latent 0 = frame 0 four times, latent j = frames 4j-3 .. 4j".
LATENT_TABLE = {
    0: [0, 0, 0, 0],
    1: [1, 2, 3, 4],
    2: [5, 6, 7, 8],
    3: [9, 10, 11, 12],
    7: [25, 26, 27, 28],
    20: [77, 78, 79, 80],
}

# (start latent, number of latents) -> video frames the block needs
BLOCK_TABLE = {
    (0, 1): [0],
    (0, 3): list(range(0, 9)),  # 9 frames -> 3 latents
    (1, 3): list(range(1, 13)),  # 4s-3 .. 4(s+n)-4 = 1 .. 12
    (3, 3): list(range(9, 21)),  # 9 .. 20
    (5, 2): list(range(17, 25)),
}


@pytest.mark.parametrize("latent, frames", LATENT_TABLE.items())
def test_latent_to_video_frames(latent, frames):
    assert latent_to_video_frames(latent) == frames


@pytest.mark.parametrize("block, frames", BLOCK_TABLE.items())
def test_video_frames_for_block(block, frames):
    assert list(video_frames_for_block(*block)) == frames


def test_video_to_latent_and_counts():
    assert [video_to_latent_frame(v) for v in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [num_latent_frames(t) for t in (1, 5, 9, 81)] == [1, 2, 3, 21]
    assert [num_video_frames(n) for n in (1, 2, 3, 21)] == [1, 5, 9, 81]
    with pytest.raises(ValueError, match="1 \\+ 4k frames \\(nearest: 9 or 13\\)"):
        num_latent_frames(10)
    with pytest.raises(ValueError, match="integer >= 1"):
        num_latent_frames(0)
    with pytest.raises(ValueError, match="integer >= 0"):
        latent_to_video_frames(-1)


def test_group_by_latent_matches_upstream_replication():
    """OmniAvatar: cat(repeat(a[:, :, :1], 3), a) then groups of 4 along time."""
    t, d = 13, 3
    feats = np.arange(t * d, dtype=np.float32).reshape(t, d)
    upstream = np.concatenate([np.repeat(feats[:1], 3, axis=0), feats]).reshape(-1, 4, d)
    got = group_by_latent(feats)
    assert got.shape == (4, 4, d)
    np.testing.assert_array_equal(got, upstream)
    for j in range(4):
        np.testing.assert_array_equal(got[j], feats[LATENT_TABLE[j]])


def test_blocks_concatenate_to_the_whole_clip():
    """Streaming blocks (3 latents each) give the same groups as the whole clip at once."""
    t = num_video_frames(12)
    feats = np.random.default_rng(0).standard_normal((t, 5)).astype(np.float32)
    whole = group_by_latent(feats)
    parts = []
    for s in range(0, 12, 3):
        frames = video_frames_for_block(s, 3)
        parts.append(group_by_latent(feats[frames.start:frames.stop], start_latent=s))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_block_length_is_checked():
    with pytest.raises(ValueError, match="multiple of 4 video frames"):
        group_by_latent(np.zeros((7, 2)), start_latent=2)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        group_by_latent(np.zeros((8, 2)))
    assert group_by_latent(np.zeros((0, 2))).shape == (0, 4, 2)


def test_faa_tokens_layout():
    t = 9
    feats = np.arange(t, dtype=np.float32)[:, None].repeat(2, axis=1)  # value = video frame
    tok = faa_tokens(feats)
    assert tok.shape == (3, 4, 2)
    assert tok[:, :, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    # K tokens per video frame (HunyuanVideo-Avatar: 4 after its projection) -> 4K per latent, frame-major
    multi = np.stack([feats * 10 + k for k in range(4)], axis=1)  # (T, 4, 2)
    tok = faa_tokens(multi)
    assert tok.shape == (3, 16, 2)
    assert tok[1, :, 0].tolist() == [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33, 40, 41, 42, 43]
    with pytest.raises(ValueError, match="T_video, D"):
        faa_tokens(np.zeros(9))


@settings(max_examples=50, deadline=None)
@given(start=st.integers(0, 50), n=st.integers(1, 8))
def test_gather_index_agrees_with_the_table_rule(start, n):
    frames = video_frames_for_block(start, n)
    idx = latent_gather_index(start, n)
    for j in range(n):
        assert [frames.start + i for i in idx[j]] == latent_to_video_frames(start + j)
    assert idx.min() == 0 and idx.max() == len(frames) - 1
