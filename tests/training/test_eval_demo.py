"""`avatarcast eval demo`: its metrics on the teacher itself, and the whole path on a random TINY model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audio.io import read_audio
from training.dataset import HELD_OUT_IDENTITY_BASE, make_clip, make_pair_clip
from training.evaluate import KEYS, lipsync, mean_psnr, openings, seam_ratio, unit_starts
from training.probes import mouth_corner_lift

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "speech_en_us_male.wav"
ID = HELD_OUT_IDENTITY_BASE + 11


@pytest.fixture(scope="module")
def speech():
    return read_audio(FIXTURE)[: 16_000 * 4]


@pytest.fixture(scope="module")
def teacher(speech):
    return make_clip(speech, ID, size=(128, 128), blinks=False)


def test_the_teacher_scores_perfect_lipsync_and_identity(teacher):
    opening = openings(teacher.frames, teacher.mouth_boxes[0])
    r, lag = lipsync(opening, teacher.states[0, :, 0])
    assert r > 0.95 and lag == 0
    assert mean_psnr(teacher.frames, teacher.frames) > 90  # identical frames: the PSNR cap
    late = np.concatenate([opening[:2] * 0, opening[:-2]])  # a mouth two frames late
    assert lipsync(late, teacher.states[0, :, 0])[1] == 2


def test_seam_ratio_sees_jumps_at_unit_starts_only(teacher):
    frames = teacher.frames.astype(np.float32)
    starts = list(range(1, len(frames), 12))
    assert 0.5 < seam_ratio(frames, starts) < 2.0  # smooth teacher video: no seams
    jumpy = frames.copy()
    for k, s in enumerate(starts):
        jumpy[s:] += 8.0 * (-1) ** k  # a brightness step at every unit start
    assert seam_ratio(jumpy, starts) > 2.0


def test_unit_starts_follow_each_generation_mode():
    from avatar.chunking import LiveFusionOptions, OverlapOptions
    from avatar.engine import EngineOptions
    from avatar.generator import CausalOptions

    assert unit_starts(EngineOptions(causal=CausalOptions(block_frames=3)), 40) == [1, 13, 25, 37]
    assert unit_starts(EngineOptions(mode="overlap", overlap=OverlapOptions(chunk_frames=4, overlap_frames=1)),
                       40) == [13, 25, 37]
    assert unit_starts(EngineOptions(mode="fusion", fusion=LiveFusionOptions(block_frames=2)), 30) == [9, 17, 25]


def test_teacher_emotions_and_the_silent_face_pass_their_probes(speech):
    lifts = {}
    for emotion in ("happy", "neutral", "sad"):
        clip = make_clip(speech, ID, emotion=emotion, size=(128, 128), blinks=False)
        lifts[emotion] = np.mean([mouth_corner_lift(f, tuple(b)) for f, b in zip(clip.frames, clip.mouth_boxes[0])])
    assert lifts["happy"] > lifts["neutral"] > lifts["sad"]
    pair = make_pair_clip(speech, np.zeros_like(speech), ID, ID + 1, size=(128, 256), blinks=False)
    a, b = openings(pair.frames, pair.mouth_boxes[0]), openings(pair.frames, pair.mouth_boxes[1])
    assert b.var() <= 0.01 * a.var()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_demo_runs_end_to_end_on_a_random_tiny_model(tmp_path):
    """Every key comes out with a number of the right kind; a random model is not expected to pass."""
    from typer.testing import CliRunner

    from app.cli import add_command_groups
    from app.cli import app as cli

    add_command_groups(cli)  # `eval` is an entry-point group: the bare app has only the runtime's commands

    short = tmp_path / "short.wav"
    import soundfile as sf

    sf.write(short, read_audio(FIXTURE)[: 16_000 * 2], 16_000)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(cli, ["eval", "demo", "--model", "tiny", "--audio", str(short), "--stream", "6",
                                   "--drift-window", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(KEYS) <= set(result)
    assert result["lipsync_r"] is None or -1 <= result["lipsync_r"] <= 1
    assert isinstance(result["emotion_order_ok"], bool) and isinstance(result["lipsync_lag_frames"], int)
    assert result["faa_leak"] is None or result["faa_leak"] >= 0
    for key in ("identity_psnr_db", "seam_ratio", "drift_db", "rtf", "first_frame_s"):
        assert np.isfinite(result[key]), key
    assert 0 < result["first_frame_s"] < 30 and result["rtf"] > 0 and result["rtf_clips"] > 0
    assert set(result["emotion_lift_teacher"]) == {"happy", "neutral", "sad"}
    bad = CliRunner().invoke(cli, ["eval", "demo", "--stream", "3", "--drift-window", "2"])
    assert bad.exit_code != 0 and "must be longer" in str(bad.exception)
