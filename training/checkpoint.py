"""Training state on disk, shared by every trainer: one checkpoint file per run (its modules' and
optimiser's states and the step), replaced atomically, and an append-only JSON-lines log. A run killed
at any point resumes from its last complete checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_checkpoint(path: Path, step: int, **parts) -> None:
    """Save `parts` (name -> anything with `state_dict()`: a module, an optimiser) and `step` to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**{name: part.state_dict() for name, part in parts.items()}, "step": step}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, **parts) -> int:
    """Load `parts`' states from `path`; returns its step, 0 (nothing loaded) when there is no checkpoint."""
    path = Path(path)
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return int(state["step"])


def append_log(path: Path, record: dict) -> None:
    """One JSON line appended to `path` (opened and closed per record: logs are written every few steps)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
