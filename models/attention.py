"""Attention: the one place that calls the kernel, and the mask builders for block-causal video.

Tensors here use the (B, L, heads, head_dim) layout of the DiT; `attention` transposes for SDPA.
Token order inside a video is (frame, row, column), so "tokens of frame f" is a contiguous run of
`tokens_per_frame` rows and frame-level masks expand to token-level masks by repetition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(head_dim), no dropout.

    q: (B, Lq, heads, head_dim); k, v: (B, Lk, heads, head_dim).
    key_mask: (B, Lk) bool, True where a key may be attended (per-sample lengths).
    attn_mask: (Lq, Lk) or (B, Lq, Lk) bool, True where attention is allowed (block-causal).
    Returns (B, Lq, heads, head_dim).
    """
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if attn_mask is not None:
        am = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]  # (B|1, 1, Lq, Lk)
        mask = am if mask is None else (mask & am)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # (B, heads, Lq, head_dim)
    return out.transpose(1, 2)


def lengths_to_key_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) valid lengths -> (B, max_len) bool mask of valid keys."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def block_causal_frame_mask(
    num_frames: int,
    block_frames: int,
    sink_frames: int = 0,
    window_frames: int | None = None,
    first_block_frames: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Frame-level block-causal mask, (F, F) bool, True = query frame may attend key frame.

    Frames are grouped into blocks (the first block may have its own size, e.g. a 1-frame reference
    block); a frame attends every frame of its own block and of earlier blocks. With a rolling window,
    only the `window_frames` frames just before its block are kept, plus the first `sink_frames`
    frames of the stream, which stay visible forever. This is exactly what the KV cache computes.
    """
    first = block_frames if first_block_frames is None else first_block_frames
    frame = torch.arange(num_frames, device=device)
    block_start = torch.where(frame < first, 0, first + (frame - first) // block_frames * block_frames)
    block_end = torch.where(frame < first, first, block_start + block_frames).clamp(max=num_frames)
    q_start, q_end = block_start[:, None], block_end[:, None]
    key = frame[None, :]
    allowed = key < q_end
    if window_frames is not None:
        recent = key >= q_start - window_frames
        sink = key < sink_frames
        allowed = allowed & (recent | sink)
    return allowed


def expand_frame_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """(Fq, Fk) frame mask -> (Fq*T, Fk*T) token mask for (frame, row, column) token order."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
