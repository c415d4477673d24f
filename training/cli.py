"""`avatarcast train ...` and `avatarcast eval ...`: the training package's command groups.

They plug into the `avatarcast` command through the `avatarcast.commands` entry-point group
(pyproject.toml), so the runtime never imports this package; `python -m training` runs them alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(help="Train models with our own stack (resumable).", no_args_is_help=True)
eval_app = typer.Typer(help="Measured quality of a model (JSON).", no_args_is_help=True)


@train_app.command("demo")
def train_demo(
    out: Annotated[Path, typer.Option(help="working folder: corpus, clips, checkpoints")] = Path("runs/demo"),
    budget_min: Annotated[float | None, typer.Option(help="stop (resumably) after this many minutes")] = None,
    vae_image_steps: Annotated[int | None, typer.Option(help="VAE steps on single frames")] = None,
    vae_steps: Annotated[int | None, typer.Option(help="VAE steps to the end of the clip stage")] = None,
    vae_decoder_steps: Annotated[int | None, typer.Option(help="VAE steps to the end of the first decoder "
                                                               "stage")] = None,
    base_steps: Annotated[int | None, typer.Option(help="DiT base stage steps")] = None,
    audio_steps: Annotated[int | None, typer.Option(help="DiT audio stage steps")] = None,
    emotion_steps: Annotated[int | None, typer.Option(help="DiT emotion stage steps (0: none)")] = None,
    latent_clips: Annotated[int | None, typer.Option(help="single-face clips to encode (+ a quarter as many "
                                                          "two-face ones)")] = None,
    all_voices_clips: Annotated[int | None, typer.Option(help="clips of every espeak-ng voice and variant, for "
                                                              "the voices round")] = None,
    voices_steps: Annotated[int | None, typer.Option(help="steps of the voices round on all the corpus's "
                                                          "families (0: none)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """The embedded demo model end to end: corpus, teacher clips, VAE, latents, DiT base, audio path,
    emotion module, export into app/demo_model. Rerun it to continue where it stopped."""
    import dataclasses
    import logging

    from training.demo import DemoPlan, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    given = dict(vae_image_steps=vae_image_steps, vae_steps=vae_steps, vae_decoder_steps=vae_decoder_steps,
                 base_steps=base_steps, audio_steps=audio_steps, emotion_steps=emotion_steps,
                 latent_clips=latent_clips, all_voices_clips=all_voices_clips, voices_steps=voices_steps,
                 threads=threads)
    plan = dataclasses.replace(DemoPlan(out=out), **{k: v for k, v in given.items() if v is not None})
    typer.echo(json.dumps(run(plan, None if budget_min is None else budget_min * 60), indent=2))


@eval_app.command("demo")
def eval_demo(
    model: Annotated[str, typer.Option(help="model to measure: auto (the demo model when shipped) | demo | "
                                            "tiny")] = "auto",
    audio: Annotated[list[Path] | None, typer.Option(help="held-out speech files (repeatable)")] = None,
    corpus: Annotated[Path, typer.Option(help="demo corpus whose held-out clips are used without --audio")] =
        Path("runs/demo/corpus"),
    clips: Annotated[int, typer.Option(help="held-out corpus clips to use (lip sync from one clip to the "
                                                  "next spreads by 0.05: fewer is a noisy verdict)")] = 8,
    stream: Annotated[float, typer.Option(help="seconds of the drift stream")] = 300.0,
    drift_window: Annotated[float, typer.Option(help="seconds compared at the stream's start and end")] = 60.0,
    latency: Annotated[float, typer.Option(help="seconds of speech fed in real time to a live session for "
                                                "latency_ms")] = 12.0,
    held_out_engine: Annotated[str, typer.Option(help="speech engine no training clip came from, for "
                                                      "held_out_engine's lip sync: flite (installed with apt-get "
                                                      "if missing) | none")] = "flite",
    engine_clips: Annotated[int, typer.Option(help="clips of the held-out engine (one voice each, in turn)")] = 8,
    mbrola_clips: Annotated[int, typer.Option(help="held-out mbrola clips of the corpus (a voice never trained "
                                                   "on; none in the corpus: skipped)")] = 12,
    music_clips: Annotated[int, typer.Option(help="held-out clips spoken again over music (0: skip)")] = 4,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    card: Annotated[bool, typer.Option(help="write the shipped model's model_card.md from this result")] = False,
) -> None:
    """Lip sync, identity, seams, drift, emotion, FAA leak, speed and live latency vs the teacher, on held-out
    data."""
    from app.render_worker import DEMO_MODEL_DIR, load_models
    from audio.io import read_audio
    from training.demo import write_model_card
    from training.evaluate import EvalConfig, evaluate, held_out_speech

    if stream <= 2 * drift_window:
        raise ValueError(f"--stream ({stream} s) must be longer than twice --drift-window ({drift_window} s)")
    if latency <= 0:
        raise ValueError(f"--latency ({latency} s) must be positive")
    if held_out_engine not in ("flite", "none"):
        raise ValueError(f"--held-out-engine must be flite or none, not {held_out_engine!r}")
    speech = [read_audio(p) for p in audio] if audio else held_out_speech(corpus, clips)
    other, unavailable = None, None
    if held_out_engine == "flite":
        from training.corpus import ToolUnavailable
        from training.engines import flite_held_out_speech

        try:
            other = ("flite", flite_held_out_speech(engine_clips))
        except ToolUnavailable as exc:  # the rest of the eval still runs; the JSON says why this part did not
            unavailable = {"engine": "flite", "error": str(exc)}
    voices = {}
    if mbrola_clips and not audio:
        try:
            voices["mbrola"] = held_out_speech(corpus, mbrola_clips, engine="mbrola")
        except ValueError:  # a corpus built before the mbrola clips: the rest of the eval still runs
            pass
    result = evaluate(load_models(model), speech, EvalConfig(stream_s=stream, drift_window_s=drift_window,
                                                             latency_s=latency, music_clips=music_clips),
                      held_out_engine=other, held_out_voices=voices)
    if unavailable is not None:
        result["held_out_engine"] = unavailable
    text = json.dumps(result, indent=2)
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    typer.echo(text)
    if card:
        if result.get("model") != "demo":
            raise ValueError(f"--card describes the shipped demo model; this result is for {result.get('model')!r}")
        summary = DEMO_MODEL_DIR / "training.json"
        training = json.loads(summary.read_text()) if summary.exists() else {}
        typer.echo(f"wrote {write_model_card(DEMO_MODEL_DIR, result, training)}")


def main() -> None:
    """`python -m training train demo ...` / `python -m training eval demo ...`, with the CLI's error handling."""
    from app.cli import run_app

    group = typer.Typer(help="Train and evaluate the demo model.", no_args_is_help=True,
                        pretty_exceptions_enable=False)
    group.add_typer(train_app, name="train")
    group.add_typer(eval_app, name="eval")
    run_app(group, prog="python -m training")
