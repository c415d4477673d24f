"""benchmarks/gpu_smoke.py: its code paths run on the CPU at TINY size (--cpu-check) and report as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_smoke

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    """As the GPU machine runs it: the file, from the repository root."""
    return subprocess.run([sys.executable, str(SCRIPT.relative_to(ROOT)), *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=300)


def _main(capsys, *args: str) -> tuple[int, dict]:
    rc = gpu_smoke.main(list(args))
    return rc, json.loads(capsys.readouterr().out)


def test_cpu_check_runs_every_phase_and_reports_json(tmp_path):
    out_file = tmp_path / "smoke.json"
    proc = _run("--cpu-check", "--out", str(out_file))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out_file.read_text()) == report  # --out holds the same report
    assert report["benchmark"] == "gpu_smoke" and report["mode"] == "cpu-check" and report["ok"] is True
    assert report["config"]["dit_preset"] == "tiny" and report["config"]["batches"] == [1, 2]
    phases = report["phases"]
    assert list(phases) == list(gpu_smoke.PHASES)
    assert {name: p["status"] for name, p in phases.items()} == dict.fromkeys(gpu_smoke.PHASES, "ok")
    assert all(v == "ok" for v in phases["env"]["imports"].values())

    causal = phases["dit_causal"]
    assert causal["dit_calls_per_block"] == 5 and causal["video_frames_per_block"] == 12
    for passes in (1, 2):
        r = causal[f"passes_{passes}"]
        assert r["guidance_passes"] == passes and r["finite"] and r["timed_blocks"] == 2
        assert r["block_ms_min"] <= r["block_ms_median"] <= r["block_ms_max"]
        assert r["fps_per_session"] == pytest.approx(12e3 / r["block_ms_median"], rel=1e-3)
    assert causal["passes_2"]["kv_cache_mib"] == 2 * causal["passes_1"]["kv_cache_mib"]  # one cache row per branch

    batched = phases["dit_batched"]
    assert set(batched["per_batch"]) == {"1", "2"}
    for b, r in batched["per_batch"].items():
        assert r["status"] == "ok" and r["finite"]
        assert r["aggregate_fps"] == pytest.approx(int(b) * r["fps_per_session"], rel=1e-3)
        assert r["block_ms_median"] > r["denoise_ms_median"] > 0 and r["clean_pass_ms_median"] > 0
    parity = batched["parity_vs_causal_generator"]
    assert parity["batch"] == 2 and parity["blocks"] > report["config"]["window_frames"] // 3  # the ring wraps
    assert parity["max_abs_diff"] <= 1e-5  # stacked sessions == each alone through CausalGenerator (fp32)
    assert parity["max_abs_value"] > 0.1 and parity["sessions_max_abs_diff"] > 0.1  # real, different outputs

    onnx = phases["vae_onnx"]
    assert onnx["provider"] == onnx["session_providers"][0] == "CPUExecutionProvider"
    assert onnx["frames_shape"] == [1, 3, 4, 32, 32] and onnx["finite"] and onnx["latent_ms_median"] > 0
    assert phases["vae_torch"]["float32"]["frames_shape"] == [1, 3, 4, 32, 32]

    summary = report["summary"]
    assert set(summary["causal"]) == {"passes_1", "passes_2"} and set(summary["batched"]) == {"1", "2"}
    assert summary["onnx_vae"]["provider"] == "CPUExecutionProvider" and summary["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_without_cuda_it_says_why_and_exits_2():
    proc = _run("--phases", "dit_causal")
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["ok"] is False and "no CUDA device" in report["reason"] and "--cpu-check" in report["reason"]
    assert report["phases"]["env"]["cuda_available"] is False and "dit_causal" not in report["phases"]


def test_a_failing_phase_is_reported_and_the_others_still_run(capsys, monkeypatch, tmp_path):
    def broken(s):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_smoke.PHASE_FNS, "vae_torch", broken)
    rc, report = _main(capsys, "--cpu-check", "--phases", "vae_torch,dit_causal", "--out", str(tmp_path / "r.json"))
    assert rc == 1 and report["ok"] is False
    failed = report["phases"]["vae_torch"]
    assert failed["status"] == "error" and "illegal memory access" in failed["error"]
    assert "Traceback" in failed["traceback"] and failed["wall_s"] >= 0
    assert report["phases"]["dit_causal"]["status"] == "ok"
    assert report["summary"]["status"] == {"env": "ok", "vae_torch": "error", "dit_causal": "ok"}


def test_the_wall_budget_skips_what_has_not_started(capsys):
    rc, report = _main(capsys, "--cpu-check", "--budget-s", "0", "--phases", "dit_causal,vae_torch")
    assert rc == 0
    assert report["phases"]["env"]["status"] == "ok"  # always: it explains the other figures
    for name in ("dit_causal", "vae_torch"):
        assert report["phases"][name]["status"] == "skipped" and "budget" in report["phases"][name]["reason"]


@pytest.mark.parametrize("args, reason", [
    (("--phases", "env,warp"), "unknown phases ['warp']"),
    (("--size", "36"), "multiple of 16"),
    (("--batches", "0,2"), "at least 1"),
])
def test_bad_arguments_are_refused_with_a_reason(capsys, args, reason):
    rc, report = _main(capsys, "--cpu-check", *args)
    assert rc == 2 and report["ok"] is False and reason in report["reason"]
