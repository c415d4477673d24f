"""Per-session self-attention K/V cache for block-causal generation (Self-Forcing / CausVid rules).

Layout of the preallocated buffers, in frames (each frame is `tokens_per_frame` token rows):

    [ sink (S) | history ring (W) | block in progress (N) ]

* Keys are stored after RoPE, so a frame's absolute temporal position travels with its keys and
  attention is order-free: the ring never has to be shifted.
* Every call for the block in progress writes into the block region, overwriting its own slots; so
  after the last pass of a block (the clean t=0 pass) the block region holds clean K/V.
* Starting the next block commits the previous one: its frames go to the sink while the sink is not
  full (the first frames of a stream, e.g. the reference), otherwise into the ring, evicting the
  oldest history frame. The cost per block is therefore flat however long the session runs.

* With `sink_follows`, the sink keys are moved (RoPE composes) to sit just before the oldest history
  frame at every block, so the model sees the same relative geometry at frame 10 000 as at frame 10:
  sink, window, block, contiguous, as in training sequences. Moves start from the sink keys as first
  committed, so no rounding accumulates however long the stream.

All bookkeeping is host-side Python ints fixed by the block geometry: no `.item()`, no device sync.
The cache also keeps the cross-attention K/V of the session's (fixed) context, computed once.

`CacheGroup` lets one DiT call serve several sessions' caches at once (batched generation): each member
keeps its own ring, sink and positions, and the group stacks what each member lets its rows see,
padding shorter histories (young sessions) and masking the padding out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.rope import move_rope


@dataclass(frozen=True)
class CacheGeometry:
    num_layers: int
    batch: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    sink_frames: int  # frames kept forever (the first frames committed)
    window_frames: int  # most recent committed frames kept besides the sink
    block_frames: int  # largest block that may be in progress
    sink_follows: bool = False  # keep the sink at a fixed distance before the history (see above)
    rope_pairs: tuple[int, int, int] = (0, 0, 0)  # the DiT's RoPE split, needed to move sink keys
    grid_hw: tuple[int, int] = (0, 0)  # token rows and columns of one frame

    @property
    def slots(self) -> int:
        return self.sink_frames + self.window_frames + self.block_frames


class KVCache:
    """Sink + rolling-window K/V for every layer of one DiT, owned by one session."""

    def __init__(self, geometry: CacheGeometry, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        g = geometry
        if g.block_frames < 1 or g.sink_frames < 0 or g.window_frames < 0:
            raise ValueError(f"invalid cache geometry {g}")
        if g.sink_follows and (not all(g.rope_pairs) or g.grid_hw[0] * g.grid_hw[1] != g.tokens_per_frame):
            raise ValueError("sink_follows needs the RoPE split and a token grid matching tokens_per_frame")
        self.geometry = g
        shape = (g.num_layers, g.batch, g.slots * g.tokens_per_frame, g.heads, g.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, slots*T, heads, head_dim)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * g.num_layers
        self.reset()

    # ---- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every frame and the context (buffers are reused, not reallocated)."""
        g = self.geometry
        self.sink_filled = 0
        self.ring_frame: list[int | None] = [None] * g.window_frames  # absolute frame per ring slot
        self.ring_next = 0
        self.next_frame = 0  # first absolute frame index not yet committed
        self.block_start: int | None = None
        self.block_len = 0
        self.sink_pos = 0  # temporal position the sink keys are currently rotated for
        self._sink_k0: torch.Tensor | None = None  # sink keys as committed, at positions 0..S-1
        self.clear_context()

    def clear_context(self) -> None:
        """Drop the cached cross-attention K/V (call when the session's context changes)."""
        self.cross = [None] * self.geometry.num_layers

    @property
    def rows(self) -> int:
        return self.geometry.batch

    @property
    def visible_tokens(self) -> int:
        """Keys the block in progress attends to (sink + filled ring + block), after `begin_block`."""
        return sum(b - a for a, b in self._ranges)

    def key_mask(self, device) -> torch.Tensor | None:
        """Which returned keys are real: all of them, for one cache."""
        return None

    @property
    def history_frames(self) -> list[int]:
        """Absolute indices of the committed frames currently visible (sink first, then ring)."""
        ring = sorted(f for f in self.ring_frame if f is not None)
        return list(range(self.sink_filled)) + ring

    # ---- block protocol -----------------------------------------------------------------------
    def begin_block(self, start_frame: int, num_frames: int) -> None:
        """Declare the frames the next forward pass writes; commits the previous block if it is done.

        Calling again with the same block re-runs it (denoising steps, then the clean pass).
        """
        g = self.geometry
        if num_frames < 1 or num_frames > g.block_frames:
            raise ValueError(f"block of {num_frames} frames; this cache holds 1..{g.block_frames}")
        if self.block_start is not None:
            if start_frame == self.block_start:
                if num_frames != self.block_len:
                    raise ValueError(f"block at frame {start_frame} changed length "
                                     f"{self.block_len} -> {num_frames} between passes")
                return
            self.commit()
        if start_frame != self.next_frame:
            raise ValueError(f"block starts at frame {start_frame}, but the cache expects frame "
                             f"{self.next_frame} next (blocks must be contiguous)")
        self.block_start, self.block_len = start_frame, num_frames
        if g.sink_follows and self._sink_k0 is not None:
            self._move_sink(start_frame - sum(f is not None for f in self.ring_frame) - g.sink_frames)
        self._ranges = self._visible_ranges()

    def _move_sink(self, target: int) -> None:
        """Re-rotate the sink keys (all layers) for temporal positions [target, target + S)."""
        if target == self.sink_pos:
            return
        g, t = self.geometry, self.geometry.tokens_per_frame
        k0 = self._sink_k0.flatten(0, 1)  # (layers*B, S*T, heads, head_dim)
        moved = move_rope(k0, g.rope_pairs, (g.sink_frames, *g.grid_hw), 0, target)
        self.k[:, :, :g.sink_frames * t] = moved.view_as(self._sink_k0)
        self.sink_pos = target

    def commit(self) -> None:
        """Move the block in progress into history (sink first, then the ring)."""
        if self.block_start is None:
            return
        g, t = self.geometry, self.geometry.tokens_per_frame
        block_slot0 = g.sink_frames + g.window_frames
        for j in range(self.block_len):
            if self.sink_filled < g.sink_frames:
                dst = self.sink_filled
                self.sink_filled += 1
            elif g.window_frames:
                dst = g.sink_frames + self.ring_next
                self.ring_frame[self.ring_next] = self.block_start + j
                self.ring_next = (self.ring_next + 1) % g.window_frames
            else:
                continue  # no history kept beyond the sink
            src = block_slot0 + j
            self.k[:, :, dst * t:(dst + 1) * t] = self.k[:, :, src * t:(src + 1) * t]
            self.v[:, :, dst * t:(dst + 1) * t] = self.v[:, :, src * t:(src + 1) * t]
        self.next_frame = self.block_start + self.block_len
        self.block_start, self.block_len = None, 0
        if g.sink_follows and self._sink_k0 is None and g.sink_frames and self.sink_filled == g.sink_frames:
            self._sink_k0 = self.k[:, :, :g.sink_frames * t].clone()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's K/V of the block in progress; return all K/V it may attend to.

        k, v: (B, N*T, heads, head_dim) for the block's N frames. Returns (B, Lk, heads, head_dim).
        """
        if self.block_start is None:
            raise RuntimeError("update() before begin_block()")
        g, t = self.geometry, self.geometry.tokens_per_frame
        b0 = (g.sink_frames + g.window_frames) * t
        n = self.block_len * t
        if k.shape[1] != n:
            raise ValueError(f"block K/V has {k.shape[1]} tokens, expected {n}")
        self.k[layer, :, b0:b0 + n] = k
        self.v[layer, :, b0:b0 + n] = v
        return self._gather(self.k[layer]), self._gather(self.v[layer])

    # ---- internals ----------------------------------------------------------------------------
    def _visible_ranges(self) -> list[tuple[int, int]]:
        """Token ranges of sink, filled ring slots and the block, merged where adjacent."""
        g, t = self.geometry, self.geometry.tokens_per_frame
        ring_filled = sum(f is not None for f in self.ring_frame)  # ring fills slots 0.. in order
        spans = [
            (0, self.sink_filled),
            (g.sink_frames, g.sink_frames + ring_filled),
            (g.sink_frames + g.window_frames, g.sink_frames + g.window_frames + self.block_len),
        ]
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if a == b:
                continue
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return [(a * t, b * t) for a, b in merged]

    def _gather(self, buf: torch.Tensor) -> torch.Tensor:
        if len(self._ranges) == 1:  # steady state: one contiguous view, no copy
            a, b = self._ranges[0]
            return buf[:, a:b]
        return torch.cat([buf[:, a:b] for a, b in self._ranges], dim=1)


class _GroupCross:
    """The group's view of its members' cross-attention K/V: complete only when every member has it."""

    def __init__(self, group: CacheGroup) -> None:
        self.group = group
        self._stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer not in self._stacked:
            parts = [c.cross[layer] for c in self.group.caches]
            if any(p is None for p in parts):
                return None
            self._stacked[layer] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return self._stacked[layer]

    def __setitem__(self, layer: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Computed for every row: members that lacked it keep their rows (the others keep their own)."""
        for c, (a, b) in zip(self.group.caches, self.group.row_spans):
            if c.cross[layer] is None:
                c.cross[layer] = (kv[0][a:b], kv[1][a:b])
        self._stacked[layer] = kv


class CacheGroup:
    """Several sessions' caches behind one batched forward: rows are the members' rows, in order.

    Members may sit at different frames (different RoPE positions, ring offsets, sink moves) and hold
    different amounts of history; `update` writes each member's rows into its own cache and returns
    every row's visible K/V, right-padded with zeros to the longest, with `key_mask` marking the real keys.
    The stacking costs one copy of the visible K/V per layer and pass.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        if not caches:
            raise ValueError("a cache group needs at least one cache")
        g0 = caches[0].geometry
        for c in caches[1:]:
            g = c.geometry
            if (g.num_layers, g.heads, g.head_dim, g.tokens_per_frame) != (
                    g0.num_layers, g0.heads, g0.head_dim, g0.tokens_per_frame):
                raise ValueError(f"caches of different models or frame sizes cannot be grouped: {g0} vs {g}")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one group")
        self.caches = list(caches)
        edges = [0]
        for c in self.caches:
            edges.append(edges[-1] + c.rows)
        self.row_spans = list(zip(edges[:-1], edges[1:]))
        self.cross = _GroupCross(self)
        self._lens: list[int] = []

    @property
    def rows(self) -> int:
        return self.row_spans[-1][1]

    def begin_block(self, start_frames: Sequence[int], num_frames: int) -> None:
        """start_frames: one absolute frame per row (a member's rows share theirs)."""
        if len(start_frames) != self.rows:
            raise ValueError(f"{len(start_frames)} start frames for {self.rows} rows")
        for c, (a, b) in zip(self.caches, self.row_spans):
            if len(set(start_frames[a:b])) != 1:
                raise ValueError(f"rows {a}..{b - 1} share one cache but start at frames {start_frames[a:b]}")
            c.begin_block(start_frames[a], num_frames)
        self._lens = [c.visible_tokens for c in self.caches]

    def key_mask(self, device) -> torch.Tensor | None:
        """(rows, longest) bool, True for a member's real keys; None when every row sees as many."""
        if len(set(self._lens)) == 1:
            return None
        longest = max(self._lens)
        lens = torch.tensor([n for n, (a, b) in zip(self._lens, self.row_spans) for _ in range(b - a)], device=device)
        return torch.arange(longest, device=device)[None, :] < lens[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (rows, N*T, heads, head_dim) -> visible (rows, longest, heads, head_dim), zero-padded."""
        if k.shape[0] != self.rows:
            raise ValueError(f"K/V for {k.shape[0]} rows, the group has {self.rows}")
        parts = [c.update(layer, k[a:b], v[a:b]) for c, (a, b) in zip(self.caches, self.row_spans)]
        longest = max(self._lens)
        if all(n == longest for n in self._lens):
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ko = k.new_zeros(self.rows, longest, *k.shape[2:])
        vo = torch.zeros_like(ko)
        for (pk, pv), (a, b), n in zip(parts, self.row_spans, self._lens):
            ko[a:b, :n] = pk
            vo[a:b, :n] = pv
        return ko, vo
