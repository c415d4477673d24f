"""Every generation mode reproduces its stored golden latents bit for bit (tests/fixtures/sampling)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "fixtures" / "sampling" / "make_goldens.py"
_spec = importlib.util.spec_from_file_location("make_goldens", _SCRIPT)
goldens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(goldens)


@pytest.mark.parametrize("case", sorted(goldens.GENERATION_CASES))
def test_generation_mode_reproduces_its_golden_bit_for_bit(case):
    assert goldens.mismatches(case) == []
