"""`avatarcast train demo` / `avatarcast eval demo` (training/cli.py, reached through the CLI's entry points)."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
from typer.testing import CliRunner

from app.cli import add_command_groups, app

runner = CliRunner()
add_command_groups(app)


def test_train_demo_passes_its_options_into_the_plan(monkeypatch, tmp_path):
    import training.demo as demo

    seen = {}

    def fake_run(plan, budget_s):
        seen.update(plan=plan, budget_s=budget_s)
        return {"stopped_in": "vae"}

    monkeypatch.setattr(demo, "run", fake_run)
    result = runner.invoke(app, ["train", "demo", "--out", str(tmp_path), "--budget-min", "2", "--vae-steps", "7",
                                 "--all-voices-clips", "30", "--voices-steps", "100"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"stopped_in": "vae"}
    plan = seen["plan"]
    assert plan.out == tmp_path and plan.vae_steps == 7 and seen["budget_s"] == 120
    assert plan.all_voices_clips == 30 and plan.voices_steps == 100
    assert plan.base_steps == demo.DemoPlan.base_steps  # what was not given keeps the plan's default


def test_model_card_marks_each_target_met_missed_or_unmeasured(tmp_path):
    from training.demo import TARGETS, write_model_card

    result = {"lipsync_r": 0.82, "identity_psnr_db": 21.5, "lipsync_lag_frames": -1, "rtf": None,
              "latency_ms": {"p50": 380.0, "p95": 610.0}, "emotion_effect": {"per_identity": {"7": 0.4}, "min": 0.4,
                                                                           "order_ok": {"7": True}}}
    card = write_model_card(tmp_path, result, {"vae": "9000 steps"}).read_text()
    rows = {ln.split("`")[1]: ln for ln in card.splitlines() if ln.startswith("| `")}
    assert set(rows) == set(TARGETS)
    assert rows["latency_ms.p50"] == "| `latency_ms.p50` | 380.0 | <= 400.0 | yes |"  # nested values, by path
    assert rows["emotion_effect.min"] == "| `emotion_effect.min` | 0.4 | >= 0.5 | **no** |"
    assert rows["first_frame_s"].endswith("| n/a |")
    assert "p50 / p95: 380.0 / 610.0 ms" in card and "by identity: {'7': 0.4}" in card
    assert rows["lipsync_r"].endswith("| yes |") and rows["identity_psnr_db"].endswith("| **no** |")
    assert rows["lipsync_lag_frames"].endswith("| == 0 | **no** |")  # a frame early misses "lag 0"
    assert rows["rtf"].endswith("| n/a |")
    assert "- vae: 9000 steps" in card and not (tmp_path / "model_card.md.tmp").exists()


def test_training_summary_adds_up_resumed_runs_per_stage():
    from training.demo import training_summary

    logs = [{"stage": "vae", "step": 25, "loss": 0.5, "elapsed_s": 60.0},
            {"stage": "vae", "step": 50, "loss": 0.4, "elapsed_s": 120.0},
            {"stage": "vae", "step": 75, "loss": 0.3, "elapsed_s": 60.0},  # resumed: its clock restarted
            {"stage": "dit_base", "step": 25, "loss": 1.9, "elapsed_s": 30.0}]
    summary = training_summary(logs)
    assert summary["vae"] == "75 steps, final logged loss 0.3, 3 min on 2 CPU cores"
    assert summary["dit_base"].startswith("25 steps, final logged loss 1.9, 0 min")


def test_the_final_dit_is_the_last_stage_that_finished(tmp_path):
    from training.demo import final_dit

    def finish(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"")

    assert final_dit(tmp_path) == tmp_path / "dit_audio"
    for name, expected in (("dit_emotion", "dit_emotion"), ("dit_live", "dit_live"), ("dit_lead2", "dit_lead2"),
                           ("dit_lead10", "dit_lead10"), ("dit_lead1", "dit_lead10")):  # rounds by number
        finish(name)
        assert final_dit(tmp_path) == tmp_path / expected
    (tmp_path / "dit_lead11").mkdir()  # a round still training has no model yet
    assert final_dit(tmp_path) == tmp_path / "dit_lead10"
    (tmp_path / "dit_voices").mkdir()
    assert final_dit(tmp_path) == tmp_path / "dit_lead10"
    (tmp_path / "dit_voices" / "model.safetensors").write_bytes(b"")
    assert final_dit(tmp_path) == tmp_path / "dit_voices"  # the round after the lead rounds


def test_the_voices_round_links_the_main_store_and_reads_every_variant(tmp_path):
    from training.augment import AugmentedFeatures
    from training.demo import link_store
    from training.latents import KeyedFiles

    src, dest = KeyedFiles(tmp_path / "a"), KeyedFiles(tmp_path / "b")
    for key in ("clip_000001", "pair_clip_000002"):
        src.path(key).write_bytes(key.encode())
    dest.path("clip_100000").write_bytes(b"mbrola")
    link_store(src, dest)
    link_store(src, dest)  # again: nothing to do
    assert dest.keys() == ["clip_000001", "clip_100000", "pair_clip_000002"]
    assert dest.path("clip_000001").read_bytes() == b"clip_000001"
    assert dest.path("clip_000001").stat().st_ino == src.path("clip_000001").stat().st_ino  # linked, not copied
    assert not list(dest.root.glob(".*"))

    full = AugmentedFeatures(tmp_path / "aug")
    full.write("clip_000001", np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 1, 2, 3))
    assert full.read("clip_000001").shape[0] == 5
    assert AugmentedFeatures(tmp_path / "aug", variants=3).read("clip_000001").shape[0] == 3


def test_eval_card_refuses_a_result_that_is_not_the_demo_model(monkeypatch, tmp_path):
    import app.render_worker as worker
    import training.evaluate as evaluate

    monkeypatch.setattr(worker, "load_models", lambda name: name)
    monkeypatch.setattr(evaluate, "evaluate", lambda models, speech, cfg, **_: {"model": "tiny"})
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16_000, np.float32), 16_000)
    result = runner.invoke(app, ["eval", "demo", "--model", "tiny", "--audio", str(wav), "--held-out-engine", "none",
                                 "--card"])
    assert result.exit_code != 0 and "describes the shipped demo model" in str(result.exception)


def test_model_card_shows_the_teachers_emotion_lifts_beside_the_generated_ones(tmp_path):
    from training.demo import write_model_card

    result = {"emotion_lift": {"happy": 0.1}, "emotion_lift_teacher": {"happy": 0.3}, "rtf_clips": 0.8,
              "held_out_mbrola": {"clips": 4, "lipsync_r": 0.81, "lipsync_lag_frames": 0},
              "music_under_speech": {"clips": 4, "snr_db": [5.0, 20.0], "lipsync_r": 0.72, "lipsync_lag_frames": 0}}
    card = write_model_card(tmp_path, result, {}).read_text()
    assert "generated {'happy': 0.1}, teacher {'happy': 0.3}" in card and "start-up included): 0.8" in card
    assert "| `held_out_mbrola.lipsync_r` | 0.81 | >= 0.8 | yes |" in card  # a held-out voice: the lip-sync bar
    assert "[5.0, 20.0] dB below it" in card and "lip sync 0.72 at lag 0." in card


def test_rewriting_the_model_card_keeps_its_hand_written_dialogue_section(tmp_path):
    from training.demo import write_model_card

    write_model_card(tmp_path, {"lipsync_r": 0.7}, {})
    card = (tmp_path / "model_card.md").read_text()
    (tmp_path / "model_card.md").write_text(card.replace("## Limits", "## Dialogue\nTwo faces, measured.\n\n## Limits"))
    text = write_model_card(tmp_path, {"lipsync_r": 0.9}, {}).read_text()
    assert text.count("## Dialogue\nTwo faces, measured.\n\n## Limits") == 1 and "| 0.9 |" in text
