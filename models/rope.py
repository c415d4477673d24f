"""3D rotary position embedding as Wan2.1 builds it: head channels split over (time, height, width).

Adjacent channel pairs are rotated (Wan's complex view), angles pos * 10000^(-2i/d) per axis computed in
float64. Rotations compose, so keys rotated for one temporal position can be moved to another exactly:
the KV cache uses that to keep its sink frames at a fixed distance from the frames being generated.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def rope_table(pairs: tuple[int, int, int], grid: tuple[int, int, int], start_frame: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (F*H*W, 1, head_dim/2) float32, for a token grid whose first frame sits at
    absolute temporal position `start_frame`. Angles pos * 10000^(-2i/d) per axis in float64, as Wan2.1
    builds its tables; computed for any position, so a long stream never runs off the end of a table."""
    f, h, w = grid

    def angles(positions: torch.Tensor, p: int) -> torch.Tensor:
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, 2 * p, 2, dtype=torch.float64) / (2 * p))
        return torch.outer(positions.to(torch.float64), inv)  # (n, p)

    pt, ph, pw = pairs
    at = angles(torch.arange(start_frame, start_frame + f), pt)
    ah, aw = angles(torch.arange(h), ph), angles(torch.arange(w), pw)
    table = torch.cat([
        at.view(f, 1, 1, -1).expand(f, h, w, -1),
        ah.view(1, h, 1, -1).expand(f, h, w, -1),
        aw.view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)  # (L, 1, head_dim/2)
    return torch.cos(table).float().to(device), torch.sin(table).float().to(device)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent channel pairs. x: (B, L, heads, head_dim); the table, (n, 1, head_dim/2) or one per
    row (B, n, 1, head_dim/2), covers the first n tokens of L."""
    cos, sin = rope
    n = cos.shape[-3]
    xf = x[:, :n].float().unflatten(-1, (-1, 2))  # (B, n, heads, head_dim/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)
    return rotated if n == x.shape[1] else torch.cat([rotated, x[:, n:]], dim=1)


def move_rope(x: torch.Tensor, pairs: tuple[int, int, int], grid: tuple[int, int, int], from_frame: int,
              to_frame: int) -> torch.Tensor:
    """Keys rotated for a grid starting at `from_frame` -> rotated as if it started at `to_frame`."""
    if from_frame == to_frame:
        return x
    cos_a, sin_a = rope_table(pairs, grid, from_frame, x.device)
    cos_b, sin_b = rope_table(pairs, grid, to_frame, x.device)
    unrotated = apply_rope(x, (cos_a, -sin_a))  # rotate back by the old angles
    return apply_rope(unrotated, (cos_b, sin_b))
