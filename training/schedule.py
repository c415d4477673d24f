"""The learning-rate schedule every training stage uses."""

from __future__ import annotations

import math


def warmup_cosine(peak: float, step: int, steps: int, first_step: int = 0, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `peak` down to a tenth of it, over the
    stage's own steps [first_step, steps) (a later stage of a curriculum warms up again)."""
    done, span = step - first_step, max(1, steps - first_step)
    return float(peak * min(1.0, (done + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done / span))))
