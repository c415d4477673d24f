"""The `avatarcast` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Real-time, audio-driven avatar streaming.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.command()
def info() -> None:
    """Print the model presets, torch device and ONNX Runtime providers available here."""
    import onnxruntime as ort
    import torch

    from models.config import DIT_PRESETS

    out = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "dit_presets": {k: {"dim": c.dim, "layers": c.num_layers, "heads": c.num_heads,
                            "in_dim": c.in_dim, "audio_dim": c.audio_dim}
                        for k, c in DIT_PRESETS.items()},
    }
    typer.echo(json.dumps(out, indent=2))


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="checkpoint file or directory")]) -> None:
    """Show what a checkpoint contains and which preset it matches."""
    from models.loading import inspect_checkpoint

    typer.echo(json.dumps(inspect_checkpoint(path), indent=2))


@app.command()
def serve() -> None:
    """Start the live service (WebRTC page, admin API, metrics)."""
    typer.echo("The live service is not built yet; showing this machine's model stack instead.")
    info()


@bench_app.command("dit")
def bench_dit(
    blocks: Annotated[int, typer.Option(help="blocks to generate through the KV cache")] = 200,
    preset: Annotated[str, typer.Option(help="DiT preset")] = "tiny",
) -> None:
    """DiT forward throughput and per-block cost with the KV cache vs full recompute."""
    from benchmarks.bench_dit import run

    typer.echo(json.dumps(run(blocks=blocks, preset=preset), indent=2))


def main() -> None:
    """Entry point: user errors (missing files, bad checkpoints, bad arguments) print one line, exit 2."""
    try:
        app()
    except (FileNotFoundError, ValueError, KeyError) as exc:
        typer.echo(f"avatarcast: error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
