"""Package-level contracts: torch stays out of the numpy modules; the fixtures are small and sane."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[2]


def test_importing_audio_does_not_import_torch():
    code = ("import sys, audio.buffer, audio.resample, audio.io, audio.align, audio.vad, audio.pcm, "
            "audio.features; from audio.features import MelFeatures; MelFeatures()(__import__('numpy').zeros(640)); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_fixtures_are_small_16k_mono(fixture_meta, audio_fixture_dir):
    assert len(fixture_meta) == 2
    voices = {meta["voice"] for meta in fixture_meta.values()}
    assert len(voices) == 2
    for name, meta in fixture_meta.items():
        path = audio_fixture_dir / name
        info = sf.info(str(path))
        assert path.stat().st_size < 300_000
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, meta["num_samples"])
        pauses = [s for s in meta["segments"] if s["kind"] == "pause"]
        assert len(pauses) >= 4 and all(s["end_ms"] > s["start_ms"] for s in pauses)


def test_benchmark_runs_and_reports_every_front_end():
    from benchmarks.bench_audio import run

    result = run(seconds=0.5, repeats=1)
    fronts = result["front_ends"]
    for name in ("mel", "wav2vec2_tiny", "whisper_tiny"):
        assert fronts[name]["streaming_ms_per_s"] > 0 and fronts[name]["offline_window_ms_per_s"] > 0
    assert fronts["mel"]["lookahead_ms"] == 7.5
    assert "offline_clip_ms_per_s" in fronts["wav2vec2_tiny"]
    assert result["resampler_max_latency_ms"] < 60
