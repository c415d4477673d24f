"""The `avatarcast` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import json
import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)

app = typer.Typer(help="Real-time, audio-driven avatar streaming.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

# Command groups that live outside the runtime (`avatarcast train`/`eval` in training/, `avatarcast bench`
# in benchmarks/) register here as entry points, so the runtime never imports them.
COMMAND_GROUPS = "avatarcast.commands"


@app.command()
def info() -> None:
    """Print the model presets, torch device and ONNX Runtime providers available here."""
    import onnxruntime as ort
    import torch

    from avatar.engine import PRESET_DEFAULTS, preset_options
    from models.config import DIT_PRESETS

    def generation(preset: str) -> dict:
        o = preset_options(preset)
        steps = {"causal": len(o.causal.steps), "overlap": o.overlap.steps, "fusion": o.fusion.steps}[o.mode]
        return {"mode": o.mode, "steps": steps}

    out = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "dit_presets": {k: {"dim": c.dim, "layers": c.num_layers, "heads": c.num_heads,
                            "in_dim": c.in_dim, "audio_dim": c.audio_dim}
                        for k, c in DIT_PRESETS.items()},
        "generation_defaults": {k: generation(k) for k in PRESET_DEFAULTS},
    }
    typer.echo(json.dumps(out, indent=2))


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="checkpoint file or directory")]) -> None:
    """Show what a checkpoint contains and which preset it matches."""
    from models.loading import inspect_checkpoint

    typer.echo(json.dumps(inspect_checkpoint(path), indent=2))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on (env AVATARCAST_HOST; default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (env AVATARCAST_PORT; default 8080)")] = None,
    avatar: Annotated[Path | None, typer.Option(help="portrait image or `avatar new` folder (default: the built-in drawn avatar)")] = None,
    max_sessions: Annotated[int | None, typer.Option(help="concurrent calls per engine worker (env AVATARCAST_MAX_SESSIONS; default 4)")] = None,
    workers: Annotated[str | None, typer.Option(help="engine worker processes, or 'ray' for Ray actors, or 0 for the engine in the server's process (env AVATARCAST_WORKERS; default 1)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="with --workers ray: the cluster to join, e.g. 10.0.0.5:6379 (env AVATARCAST_RAY_ADDRESS; default: start Ray here)")] = None,
    ray_workers: Annotated[int | None, typer.Option(help="with --workers ray: actors to start (env AVATARCAST_RAY_WORKERS; default one per GPU, 1 without GPUs)")] = None,
    model: Annotated[str | None, typer.Option(help="auto | demo | tiny (random TINY weights) (env AVATARCAST_MODEL; default auto: the demo model)")] = None,
) -> None:
    """Start the live service: the call page, POST /offer, the admin API under /admin, /metrics; the engine
    runs in worker processes (--workers N) or Ray actors (--workers ray)."""
    from app.server import run_server
    from app.settings import Settings

    if avatar is not None and not avatar.exists():
        raise FileNotFoundError(f"{avatar}: no such portrait file or avatar folder")
    settings = Settings.from_env(host=host, port=port, avatar=str(avatar) if avatar else None,
                                 max_sessions=max_sessions, workers=workers, ray_address=ray_address,
                                 ray_workers=ray_workers, model=model)
    run_server(settings, echo=typer.echo)


@app.command("export-onnx")
def export_onnx(
    vae: Annotated[str, typer.Option(help="Wan2.1_VAE.pth, diffusers VAE dir, our .safetensors, "
                                          "or a preset name (tiny, demo, wan2.1) for random weights")],
    height: Annotated[int, typer.Option(help="video height in pixels (multiple of 8)")],
    width: Annotated[int, typer.Option(help="video width in pixels (multiple of 8)")],
    out: Annotated[Path, typer.Option(help="steady-state graph; the first-frame graph is written as "
                                           "<stem>.first.onnx beside it")],
    batch: Annotated[int, typer.Option(help="streams decoded together")] = 1,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
) -> None:
    """Export the streaming VAE decoder (caches as graph inputs/outputs) to ONNX for one resolution."""
    from models.config import VAE_PRESETS
    from models.onnx_vae import export_decoder, weights_hash
    from models.vae_loading import load_vae, random_vae

    model = load_vae(vae) if Path(vae).exists() or vae not in VAE_PRESETS else random_vae(VAE_PRESETS[vae])
    f = model.cfg.spatial_factor
    if height <= 0 or width <= 0 or height % f or width % f:
        raise typer.BadParameter(f"height and width must be positive multiples of {f}, got {height}x{width}")
    step, first = export_decoder(model, height // f, width // f, out, batch=batch, opset=opset)
    typer.echo(json.dumps({
        "step_graph": str(step), "first_graph": str(first), "config": model.cfg.name,
        "video": [height, width], "latent": [height // f, width // f], "batch": batch, "opset": opset,
        "caches": len(model.decoder.cache_shapes(batch, height // f, width // f)),
        "weights_sha256": weights_hash(model),
    }, indent=2))


@app.command()
def render(
    inputs: Annotated[list[str], typer.Argument(help="audio files, directories, globs, or CSV manifests "
                                                     "(columns: audio, avatar, emotion, output; for dialogue "
                                                     "audio_1 .. audio_N in place of audio)")],
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    avatar: Annotated[str | None, typer.Option(help="portrait image, `avatar new` folder, demo:SEED (stylised "
                                                    "identity SEED of the demo face renderer) or duo:SEED (two "
                                                    "faces: SEED and SEED+1); default: the built-in drawn avatar "
                                                    "`serve` uses (with --speakers 2: sketch-duo)")] = None,
    emotion: Annotated[str | None, typer.Option(help="emotion reference image; for demo:SEED avatars one of "
                                                     "neutral, happy, sad, surprised; for a folder one of its "
                                                     "emotions")] = None,
    mode: Annotated[str, typer.Option(help="causal | overlap | fusion (position-shift fusion, offline)")] = "causal",
    model: Annotated[str, typer.Option(help="auto (the demo model when shipped, else tiny) | demo | tiny "
                                            "(random TINY weights)")] = "auto",
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model preset's, listed by "
                                                   "`avatarcast info`: demo causal 3, tiny causal 4, overlap "
                                                   "and fusion 25)")] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    sample_rate: Annotated[int, typer.Option(help="audio track sample rate")] = 48_000,
    crf: Annotated[int, typer.Option(help="H.264 quality (libx264 CRF, lower is better)")] = 18,
    decoder: Annotated[str, typer.Option(help="VAE decoder: auto | onnx | torch")] = "auto",
    jobs: Annotated[int, typer.Option(help="files rendered at once (worker processes or Ray actors)")] = 1,
    threads: Annotated[int | None, typer.Option(help="torch threads per worker (1 helps on a busy CPU)")] = None,
    backend: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one)")] = None,
    force: Annotated[bool, typer.Option("--force", help="re-render outputs that are already done")] = False,
    manifest: Annotated[Path | None, typer.Option(help="results JSON (default: OUT/render-manifest.json)")] = None,
    allow_outside_out: Annotated[bool, typer.Option("--allow-outside-out", help="let a CSV manifest's output "
                                                    "column name files outside --out")] = False,
    max_duration: Annotated[float, typer.Option(help="longest input in seconds; longer ones fail before "
                                                     "decoding")] = 4 * 3600.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress; failures on stderr")] = False,
    json_lines: Annotated[bool, typer.Option("--json-lines", help="progress and results as JSON lines")] = False,
    speakers: Annotated[int, typer.Option(help="voices, one per face of a multi-face avatar (left to right): "
                                               "each input an N-channel file or a CSV row with audio_1 .. "
                                               "audio_N; default avatar for 2: the built-in sketch-duo")] = 1,
) -> None:
    """Render audio files to talking-avatar mp4s (H.264 + AAC): resumable, locally or on Ray."""
    from app.render import exit_code, render_batch
    from app.render_progress import make_reporter
    from app.render_worker import RenderSettings, resolve_model

    settings = RenderSettings(model=resolve_model(model), mode=mode, steps=steps, seed=seed,
                              sample_rate=sample_rate, crf=crf, decoder=decoder, max_duration_s=max_duration,
                              speakers=speakers)
    result = render_batch(inputs, out, avatar=avatar, emotion=emotion, settings=settings, jobs=jobs, backend=backend,
                          address=address, threads=threads, force=force, manifest_path=manifest,
                          reporter=make_reporter(quiet=quiet, json_lines=json_lines),
                          allow_outside_out=allow_outside_out)
    raise typer.Exit(exit_code(result))


@app.command()
def console(
    url: Annotated[str, typer.Option(help="the server's address")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="admin token (env AVATARCAST_ADMIN_TOKEN; printed by "
                                                   "`avatarcast serve` at start)")] = None,
    poll: Annotated[float, typer.Option(help="seconds between refreshes")] = 1.0,
) -> None:
    """Operator console (TUI): live sessions, engine health, broadcast, events; end, pause, change emotion."""
    import os

    from app.console.app import run_console

    token = token or os.environ.get("AVATARCAST_ADMIN_TOKEN")
    if not token:
        raise ValueError("the console needs the admin token: --token or AVATARCAST_ADMIN_TOKEN "
                         "(`avatarcast serve` prints it at start)")
    if not url.startswith(("http://", "https://")) or poll <= 0:
        raise ValueError(f"--url must start with http:// or https:// (got {url!r}) and --poll must be positive")
    run_console(url, token, poll_s=poll)


@app.command()
def broadcast(
    audio: Annotated[list[str], typer.Option(help="audio file or http(s) URL that drives the avatar (any rate; "
                                                  "the session resamples); give it once per face for a dialogue "
                                                  "(the first drives the left face)")],
    to: Annotated[str, typer.Option(help="rtmp[s]://HOST/APP/KEY, an HLS playlist (.m3u8) or an HLS directory")],
    avatar: Annotated[Path | None, typer.Option(help="portrait image or `avatar new` folder (default: the built-in drawn avatar)")] = None,
    emotion: Annotated[str | None, typer.Option(help="emotion reference of the avatar (built-in: neutral, happy, "
                                                     "sad, surprised)")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds to stream; default: until Ctrl-C (idle frames "
                                                        "after the audio)")] = None,
    loop: Annotated[bool, typer.Option("--loop", help="play the audio again at its end")] = False,
    video_bitrate: Annotated[int, typer.Option(help="H.264 bitrate, kbit/s")] = 2500,
    max_attempts: Annotated[int, typer.Option(help="failed connection attempts in a row before giving up")] = 6,
    model: Annotated[str, typer.Option(help="auto (the demo model when shipped, else tiny) | demo | tiny")] = "auto",
    speakers: Annotated[int | None, typer.Option(help="voices, one per face; with one --audio, its channel i "
                                                      "drives face i (default: one per --audio)")] = None,
) -> None:
    """Livestream the avatar driven by an audio file or URL to RTMP (FLV) or HLS, in real time."""
    from app.broadcast import BroadcastRequest, run_broadcast

    if duration is not None and duration <= 0:
        raise ValueError(f"--duration must be positive, got {duration}")
    request = BroadcastRequest(audio=tuple(audio), to=to, avatar=avatar, emotion=emotion, duration_s=duration,
                               loop=loop, model=model, video_bitrate_kbps=video_bitrate, max_attempts=max_attempts,
                               speakers=speakers)
    raise typer.Exit(run_broadcast(request, echo=typer.echo, status=lambda line: typer.echo(line, err=True)))


@app.command("livekit-worker")
def livekit_worker(
    url: Annotated[str | None, typer.Option(envvar="LIVEKIT_URL", help="LiveKit server URL")] = None,
    token: Annotated[str | None, typer.Option(envvar="AVATARCAST_LIVEKIT_TOKEN", help="the avatar's access token "
                                              "(what the agent's AvatarSession mints)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LIVEKIT_API_KEY", help="mint the token here instead")] = None,
    api_secret: Annotated[str | None, typer.Option(envvar="LIVEKIT_API_SECRET", help="with --api-key")] = None,
    room: Annotated[str | None, typer.Option(help="room to join (with --api-key/--api-secret)")] = None,
    agent_identity: Annotated[str | None, typer.Option(help="the agent whose speech to play and on whose behalf "
                                                            "to publish (default: the first agent)")] = None,
    identity: Annotated[str, typer.Option(help="the avatar's participant identity")] = "avatarcast-avatar",
    avatar: Annotated[str | None, typer.Option(help="portrait image or `avatar new` folder (default: the built-in drawn avatar)")] = None,
    emotion: Annotated[str | None, typer.Option(help="emotion reference of the avatar")] = None,
    model: Annotated[str, typer.Option(help="auto (the demo model when shipped, else tiny) | demo | tiny")] = "auto",
    sample_rate: Annotated[int, typer.Option(help="the avatar's audio track rate")] = 24_000,
) -> None:
    """Join a LiveKit room as a voice agent's avatar: its speech in over data streams, synced audio + video out
    (needs the livekit extra)."""
    from app.integrations.livekit import worker_command

    worker_command(url=url, token=token, api_key=api_key, api_secret=api_secret, room=room,
                   agent_identity=agent_identity, identity=identity, model=model, avatar=avatar, emotion=emotion,
                   sample_rate=sample_rate)


avatar_app = typer.Typer(help="Avatars: create stylised ones.", no_args_is_help=True)
app.add_typer(avatar_app, name="avatar")


@avatar_app.command("new")
def avatar_new(
    seed: Annotated[int, typer.Option(help="identity seed of the demo face renderer (any integer >= 0)")],
    out: Annotated[Path | None, typer.Option(help="folder to create (default: ./avatar-SEED)")] = None,
    size: Annotated[int, typer.Option(help="portrait height in pixels (one face: square; two: twice as wide)")] = 256,
    faces: Annotated[int, typer.Option(help="1, or 2 for a two-person scene (identities SEED and SEED+1, left to "
                                            "right = speakers 1 and 2) for `render --speakers 2`")] = 1,
) -> None:
    """Create a stylised avatar folder (one portrait per emotion + avatar.json) for `serve --avatar`."""
    from app.avatars import write_avatar_dir

    if size < 64:
        raise ValueError(f"--size must be at least 64 pixels, got {size}")
    folder = write_avatar_dir(seed, out or Path(f"avatar-{seed}"), size, faces=faces)
    typer.echo(json.dumps({"avatar": str(folder), "seed": seed, "faces": faces,
                           "files": sorted(p.name for p in folder.iterdir())}))


def add_command_groups(target: typer.Typer) -> None:
    """Add every installed `avatarcast.commands` group; one that fails to import is skipped with a warning
    (the runtime's own commands must keep working without training or benchmark dependencies)."""
    present = {group.name for group in target.registered_groups}
    for ep in entry_points(group=COMMAND_GROUPS):
        if ep.name in present:
            continue
        try:
            target.add_typer(ep.load(), name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
            log.warning("avatarcast: command group %r (%s) not available: %s", ep.name, ep.value, exc)


def run_app(target: typer.Typer, prog: str = "avatarcast") -> None:
    """Run a command group; user errors (missing files, bad checkpoints, bad arguments) print one line, exit 2."""
    try:
        target(prog_name=prog)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        typer.echo(f"{prog}: error: {exc}", err=True)
        raise SystemExit(2) from None


def main() -> None:
    """Entry point: the runtime's commands plus the installed command groups."""
    add_command_groups(app)
    run_app(app)


if __name__ == "__main__":
    main()
