"""Every user of the shared sampler reproduces its stored goldens (tests/fixtures/sampling): the generation
modes (causal with CFG and a re-noised context pass, overlap chunks, offline and live position-shift
fusion) and the DiT trainer's noise levels, noising and timesteps, bit for bit; the DiT's outputs to
float32 rounding, which differs between CPUs' matmul kernels."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import FIXTURES

_spec = importlib.util.spec_from_file_location("make_goldens", FIXTURES / "sampling" / "make_goldens.py")
goldens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(goldens)


@pytest.mark.parametrize("case", sorted(goldens.CASES))
def test_sampler_user_reproduces_its_golden_bit_for_bit(case):
    assert goldens.mismatches(case) == []
