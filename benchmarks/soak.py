"""Soak benchmark: the real `avatarcast serve` under a steady mix of work for a long time, watched for leaks.

The server runs as users run it (the CLI, in a process of its own, with its engine worker processes).
For `--minutes`, this process keeps it busy with:
- calls: `--calls` real aiortc clients (127.0.0.1 only) at a time, each speaking for `--call-s` seconds,
  then hanging up; `--gap-s` later the next one dials;
- broadcasts: every `--broadcast-every-s`, the admin API starts a `--broadcast-s` livestream driven by an
  audio file from the server's media folder into a local nginx-rtmp, and the recording is read back;
- renders: every `--render-every-s`, `avatarcast render` of a short clip, its mp4 read back.

Before the measured part a warm-up (`--warmup-min` of the same load) fills pools and caches; then the
load pauses until the server is idle and the baseline is taken. Every `--sample-s` the server's process
tree (gateway and workers) is sampled: RSS, threads, open file descriptors, and the sessions the admin
API lists. At the end the load stops, the server goes idle, and the final idle sample is compared with
the baseline: `rss_growth_pct`, `threads_delta`, `fds_delta`, `sessions_after`. An error is anything a
user would see fail: an offer refused, a call that gets no picture, a 5xx, a broadcast that fails or
records nothing, a render that exits non-zero or writes an unreadable file, the server exiting.
Prints JSON (and writes it to `--json` if given).

    python -m benchmarks.soak --minutes 30                      # the shipped default model
    python -m benchmarks.soak --minutes 2 --warmup-min 0.5 --model tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio" / "speech_en_us_male.wav"
TOKEN = "soak-admin-token-0123456789abcdef"
MAX_ERRORS_KEPT = 50


@dataclass(frozen=True)
class SoakOptions:
    minutes: float = 30.0
    warmup_min: float = 3.0
    calls: int = 2  # at a time
    call_s: float = 10.0
    gap_s: float = 3.0
    broadcast_every_s: float = 90.0
    broadcast_s: float = 20.0
    render_every_s: float = 120.0
    render_s: float = 3.0
    sample_s: float = 60.0
    model: str = "auto"
    workers: str = "1"
    require_rtmp: bool = False


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0


@dataclass
class SoakState:
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    calls: Tally = field(default_factory=Tally)
    broadcasts: Tally = field(default_factory=Tally)
    renders: Tally = field(default_factory=Tally)
    call_fps: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {text}")


# ---- the server --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _avatarcast() -> list[str]:
    script = Path(sys.executable).parent / "avatarcast"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from app.cli import main; main()"]


def start_server(opts: SoakOptions, port: int, media: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "AVATARCAST_ADMIN_TOKEN": TOKEN, "AVATARCAST_MEDIA_DIR": str(media),
           # the soak is one client dialling again and again: per-client limits are not what it measures
           "AVATARCAST_CALLS_PER_CLIENT": str(opts.calls + 2), "AVATARCAST_OFFERS_PER_MINUTE": "600",
           "AVATARCAST_MAX_SESSIONS": str(opts.calls + 2)}
    with open(log_path, "wb") as log:
        return subprocess.Popen([*_avatarcast(), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", opts.model, "--workers", opts.workers],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(http, url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} while starting")
        try:
            async with http.get(f"{url}/healthz") as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")


def process_tree(pid: int) -> dict:
    """RSS (MiB), threads and open fds of the server and its child processes (the engine workers)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = threads = fds = 0
    for p in procs:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                threads += p.num_threads()
                fds += p.num_fds()
        except psutil.NoSuchProcess:
            continue
    return {"rss_mib": round(rss / 2**20, 1), "threads": threads, "fds": fds, "processes": len(procs)}


async def admin(http, url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    async with http.request(method, f"{url}/admin{path}", json=body,
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def sample(http, url: str, server: subprocess.Popen, state: SoakState, phase: str) -> dict:
    status, body = await admin(http, url, "GET", "/sessions")
    if status >= 500:
        state.error(f"GET /admin/sessions answered {status}")
    row = {"t": round(time.monotonic(), 1), "phase": phase, **process_tree(server.pid),
           "sessions": len(body.get("sessions", [])) if status == 200 else None}
    state.samples.append(row)
    return row


async def wait_idle(http, url: str, server: subprocess.Popen, state: SoakState, timeout_s: float = 60.0) -> dict:
    """Until the admin API lists no session, then a few seconds for the workers to drop them; a sample."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = await admin(http, url, "GET", "/sessions")
        if status == 200 and not body.get("sessions"):
            break
        await asyncio.sleep(1.0)
    else:
        state.error(f"sessions still listed {timeout_s:.0f} s after the load stopped")
    await asyncio.sleep(5.0)
    return await sample(http, url, server, state, "idle")


# ---- the load ----------------------------------------------------------------------------------------------
async def call_loop(http, url: str, speech: np.ndarray, opts: SoakOptions, state: SoakState, stop_at: float,
                    slot: int) -> None:
    from streaming.webrtc.testing import LoopbackClient

    await asyncio.sleep(slot * opts.gap_s)  # stagger the slots
    while time.monotonic() < stop_at:
        client = LoopbackClient(speech, keep_video=False)
        try:
            body = {"sdp": await client.offer(), "type": "offer"}
            async with http.post(f"{url}/offer", json=body) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(f"offer answered {resp.status}: {answer}")
            await client.accept(answer)
            await asyncio.sleep(opts.call_s)
            expected = 25 * max(1.0, opts.call_s - 3.0)  # connecting and the first block take a few seconds
            if len(client.video_times) < 0.25 * expected:
                raise RuntimeError(f"call got {len(client.video_times)} video frames in {opts.call_s:.0f} s")
            state.calls.ok += 1
            state.call_fps.append(client.fps(skip_s=1.0))
        except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
            state.calls.failed += 1
            state.error(f"call: {type(exc).__name__}: {exc}")
        finally:
            await client.close()
        await asyncio.sleep(opts.gap_s)


async def broadcast_loop(http, url: str, rtmp, opts: SoakOptions, state: SoakState, stop_at: float) -> None:
    from streaming.filesink import probe_media

    n = 0
    while time.monotonic() < stop_at:
        n += 1
        key = f"soak{n}"
        t0 = time.monotonic()
        try:
            status, snap = await admin(http, url, "POST", "/broadcast/start",
                                       {"to": rtmp.url(key), "audio": "speech.wav", "loop": True,
                                        "duration_s": opts.broadcast_s})
            if status != 201:
                raise RuntimeError(f"broadcast start answered {status}: {snap}")
            bid = snap["id"]
            while True:
                await asyncio.sleep(1.0)
                status, listing = await admin(http, url, "GET", "/broadcast")
                mine = [b for b in listing.get("broadcasts", []) if b["id"] == bid] if status == 200 else []
                if mine and mine[0]["state"] in ("stopped", "failed"):
                    break
                if time.monotonic() - t0 > opts.broadcast_s + 60:
                    raise RuntimeError(f"broadcast {bid} still {mine[0]['state'] if mine else '?'} after "
                                       f"{opts.broadcast_s + 60:.0f} s")
            if mine[0]["state"] == "failed" or mine[0].get("end_reason") not in ("duration", "source_ended"):
                raise RuntimeError(f"broadcast {bid} ended {mine[0]['state']} ({mine[0].get('end_reason')}): "
                                   f"{mine[0].get('last_error')}")
            await asyncio.sleep(1.0)  # nginx closes the recording
            files = rtmp.recorded(key)
            info = await asyncio.to_thread(probe_media, files[-1]) if files else {"video_frames": 0}
            if info["video_frames"] < 0.5 * 25 * opts.broadcast_s:
                raise RuntimeError(f"broadcast {bid} recorded {info['video_frames']} frames")
            for f in files:
                f.unlink()
            state.broadcasts.ok += 1
        except Exception as exc:  # noqa: BLE001
            state.broadcasts.failed += 1
            state.error(f"broadcast: {type(exc).__name__}: {exc}")
        await asyncio.sleep(max(0.0, t0 + opts.broadcast_every_s - time.monotonic()))


async def render_loop(clip: Path, work: Path, opts: SoakOptions, state: SoakState, stop_at: float) -> None:
    from streaming.filesink import probe_media

    n = 0
    await asyncio.sleep(min(30.0, opts.render_every_s / 2))  # not at the same moment as the first broadcast
    while time.monotonic() < stop_at:
        n += 1
        t0, out = time.monotonic(), work / f"render{n}"
        try:
            proc = await asyncio.create_subprocess_exec(
                *_avatarcast(), "render", str(clip), "--out", str(out), "--model", opts.model,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 600)
            if proc.returncode != 0:
                raise RuntimeError(f"render exited {proc.returncode}: {err.decode(errors='replace')[-300:]}")
            mp4s = list(out.rglob("*.mp4"))
            info = await asyncio.to_thread(probe_media, mp4s[0]) if mp4s else {"video_frames": 0}
            if info["video_frames"] < 25 * opts.render_s - 2:
                raise RuntimeError(f"render wrote {len(mp4s)} mp4 with {info['video_frames']} frames")
            state.renders.ok += 1
        except Exception as exc:  # noqa: BLE001
            state.renders.failed += 1
            state.error(f"render: {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(out, ignore_errors=True)
        await asyncio.sleep(max(0.0, t0 + opts.render_every_s - time.monotonic()))


async def sampler(http, url: str, server: subprocess.Popen, opts: SoakOptions, state: SoakState,
                  stop_at: float) -> None:
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(opts.sample_s, max(0.0, stop_at - time.monotonic())))
        if server.poll() is not None:
            state.error(f"the server exited with {server.returncode}")
            return
        row = await sample(http, url, server, state, "load")
        print(json.dumps(row), file=sys.stderr, flush=True)


async def load(http, url: str, server, rtmp, speech, clip, work, opts: SoakOptions, state: SoakState,
               seconds: float) -> None:
    """Everything at once for `seconds`; returns when every piece of work that started has ended."""
    stop_at = time.monotonic() + seconds
    tasks = [call_loop(http, url, speech, opts, state, stop_at, i) for i in range(opts.calls)]
    tasks.append(render_loop(clip, work, opts, state, stop_at))
    tasks.append(sampler(http, url, server, opts, state, stop_at))
    if rtmp is not None:
        tasks.append(broadcast_loop(http, url, rtmp, opts, state, stop_at))
    await asyncio.gather(*tasks)


# ---- the run -----------------------------------------------------------------------------------------------
def _clip(work: Path) -> tuple[np.ndarray, Path, Path]:
    """The calls' mic audio (48 kHz), the media folder with the broadcasts' file, a short render input."""
    import soundfile as sf

    from audio.resample import PcmFormat, resample_audio

    pcm, rate = sf.read(FIXTURE, dtype="float32")
    media = work / "media"
    media.mkdir()
    shutil.copy(FIXTURE, media / "speech.wav")
    clip = work / "clip.wav"
    sf.write(clip, pcm[: int(3.0 * rate)], rate)
    return resample_audio(pcm, PcmFormat(rate), out_rate=48_000), media, clip


def _rtmp(opts: SoakOptions):
    from benchmarks.nginx_rtmp import NginxRtmp, RtmpUnavailable, find_nginx

    try:
        server = NginxRtmp(find_nginx())
    except RtmpUnavailable as exc:
        if opts.require_rtmp:
            raise
        print(f"broadcasts skipped: {exc}", file=sys.stderr)
        return None
    server.start()
    return server


async def run(opts: SoakOptions) -> dict:
    import aiohttp

    from streaming.webrtc.testing import loopback_candidates_only

    state = SoakState()
    work = Path(tempfile.mkdtemp(prefix="avatarcast-soak-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    speech, media, clip = _clip(work)
    rtmp = _rtmp(opts)
    server = start_server(opts, port, media, work / "server.log")
    t_start = time.monotonic()
    try:
        # the clients gather 127.0.0.1 only (the whole run: patching per call would race between calls)
        with loopback_candidates_only():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                await wait_ready(http, url, server)
                startup_s = time.monotonic() - t_start
                if opts.warmup_min > 0:
                    await load(http, url, server, rtmp, speech, clip, work, opts, state, opts.warmup_min * 60)
                baseline = await wait_idle(http, url, server, state)
                warmup_errors = state.error_count
                await load(http, url, server, rtmp, speech, clip, work, opts, state, opts.minutes * 60)
                final = await wait_idle(http, url, server, state)
                status, workers = await admin(http, url, "GET", "/workers")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = server.wait()
        if rtmp is not None:
            rtmp.remove()
    log_tail = (work / "server.log").read_text(errors="replace")[-2000:]
    tracebacks = (work / "server.log").read_text(errors="replace").count("Traceback")
    shutil.rmtree(work, ignore_errors=True)
    if exit_code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        state.error(f"the server exited with {exit_code} on SIGTERM")
    loaded = [s for s in state.samples if s["phase"] == "load"]
    return {
        "options": asdict(opts),
        "startup_s": round(startup_s, 1),
        "baseline": baseline, "final": final,
        "rss_growth_pct": round(100 * (final["rss_mib"] - baseline["rss_mib"]) / baseline["rss_mib"], 2),
        "rss_peak_mib": max((s["rss_mib"] for s in loaded), default=None),
        "threads_delta": final["threads"] - baseline["threads"],
        "fds_delta": final["fds"] - baseline["fds"],
        "sessions_after": final["sessions"],
        "calls": asdict(state.calls), "broadcasts": asdict(state.broadcasts), "renders": asdict(state.renders),
        "call_fps_p50": round(float(np.median(state.call_fps)), 2) if state.call_fps else None,
        "call_fps_min": round(min(state.call_fps), 2) if state.call_fps else None,
        "errors": state.error_count, "errors_in_warmup": warmup_errors, "error_messages": state.errors,
        "server_tracebacks": tracebacks, "server_exit": exit_code,
        "workers": workers.get("workers") if status == 200 else None,
        "samples": state.samples,
        "server_log_tail": log_tail if state.error_count or tracebacks else "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SoakOptions()
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true", default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = vars(p.parse_args())
    out = args.pop("json")
    result = asyncio.run(run(SoakOptions(**args)))
    text = json.dumps(result, indent=2, default=str)
    if out is not None:
        out.write_text(text)
    print(text)
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
