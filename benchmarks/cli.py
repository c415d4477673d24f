"""`avatarcast bench ...`: benchmarks that print JSON, plugged into the `avatarcast` command through the
`avatarcast.commands` entry-point group (pyproject.toml), so the runtime never imports this package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)


@bench_app.command("dit")
def bench_dit(
    blocks: Annotated[int, typer.Option(help="blocks to generate through the KV cache")] = 200,
    preset: Annotated[str, typer.Option(help="DiT preset")] = "tiny",
) -> None:
    """DiT forward throughput and per-block cost with the KV cache vs full recompute."""
    from benchmarks.bench_dit import run

    typer.echo(json.dumps(run(blocks=blocks, preset=preset), indent=2))


@bench_app.command("domain")
def bench_domain(
    identities: Annotated[int, typer.Option(help="held-out drawn identities (4 emotions each)")] = 100,
    pairs: Annotated[int, typer.Option(help="held-out two-face scenes")] = 30,
) -> None:
    """The demo model's domain check: VAE round-trip PSNR of held-out drawn faces vs offline photos."""
    from benchmarks.bench_domain import run

    typer.echo(json.dumps(run(identities, pairs), indent=2))


@bench_app.command("vae")
def bench_vae(
    latents: Annotated[int, typer.Option(help="latent frames in the long RSS stream (3750 = 10 min)")] = 3750,
    steps: Annotated[int, typer.Option(help="timed decode steps per backend and config")] = 20,
    cache_dir: Annotated[Path | None, typer.Option(help="ONNX export cache (default ~/.cache/avatarcast)")] = None,
    threads: Annotated[int | None, typer.Option(help="intra-op threads for both backends")] = None,
) -> None:
    """VAE decode ms per video frame, torch eager vs ONNX Runtime, and RSS over a long stream."""
    from benchmarks.bench_vae import run

    typer.echo(json.dumps(run(stream_latents=latents, steps=steps, cache_dir=cache_dir, threads=threads),
                          indent=2))
