"""Live-service load benchmark: N concurrent WebRTC calls over loopback, against the gateway with N engine
worker processes (or the engine in the server's process, --workers 0), random TINY models or the demo model.

Each call is a real aiortc client (no ICE servers, 127.0.0.1 only) sending a speech fixture as its mic
to the live service (HTTP `/offer`, engine, pacer, tracks, VP8) and receiving the avatar back. The
clients run in a process of their own, as browsers would: in the server's process their decoding would
take the GIL from the engine and measure the benchmark instead of the service. Per call it reports the
fps the client received, the server's pipeline latency (mic packet in -> the frame carrying it sent,
p50/p95), the end-to-end audio delay the client measured (cross-correlation of what it sent with what
came back, per 0.5 s window: its median, and its spread max - min, which underruns and late mic audio
widen; `all_audio_lag_steady` when every call's spread stays under AUDIO_LAG_STEADY_MS), and the
pacer's repeated (underrun) and dropped frames. `client_fps` is what the pacer sends (25 whenever the
service is healthy); `new_frame_fps` is how many of those were fresh pictures
from the engine (the rest repeat the last one), over the whole call; `steady_new_frame_fps` the same
from STEADY_AFTER_S on, once the pipeline has filled: below 25 the engine is not keeping up.
`first_frame_ms` is the client's wait from sending its offer to its first video frame. The gateway's
event-loop stalls (`loop_lag_ms`, p99: how late a 10 ms timer woke) are sampled over the steady part, and
so is `cpu_percent`: what the gateway, each worker process and the clients' process used (100 = one core),
next to what the machine has (`cpu_count` x 100), so a run says whether the cores ran out.
`--client-nice` lowers the clients' priority: on a machine this small they compete with the service for
the same cores, which remote browsers would not.
Prints JSON.

    python -m benchmarks.bench_live --sessions 4 --seconds 10                 # one worker process
    python -m benchmarks.bench_live --sessions 1,8,16 --workers 2             # one server per count
    python -m benchmarks.bench_live --sessions 1,2,3 --workers 1 --model demo
    python -m benchmarks.bench_live --compare                                 # one call: in-process vs 1 worker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

STEADY_AFTER_S = 3.0
AUDIO_LAG_STEADY_MS = 600.0  # sync holds: the audio delay moves less than this over a call
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio" / "speech_en_us_male.wav"


def _speech(seconds: float) -> np.ndarray:
    from audio.resample import PcmFormat, resample_audio

    if FIXTURE.exists():
        import soundfile as sf

        x, rate = sf.read(FIXTURE, dtype="float32")
    else:  # a vowel-like tone switched on and off, if the fixture is absent
        rate = 16_000
        t = np.arange(int(seconds * rate)) / rate
        x = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 2.5 * t) > 0)).astype(np.float32)
    x48 = resample_audio(x, PcmFormat(rate), out_rate=48_000)
    reps = int(np.ceil(seconds * 48_000 / x48.size))
    return np.tile(x48, reps)[: int(seconds * 48_000)]


# ---- the clients: their own process, so their decoding does not compete for the server's GIL ----------
async def _clients(url: str, sessions: int, seconds: float, codec: str, conn) -> None:
    import aiohttp

    from streaming.webrtc.testing import LoopbackClient, audio_lag_by_window, loopback_candidates_only

    speech = _speech(seconds)
    clients: list = []
    try:
        with loopback_candidates_only():
            async with aiohttp.ClientSession() as http:
                for _ in range(sessions):
                    client = LoopbackClient(speech, keep_video=False)
                    clients.append(client)
                    body = {"sdp": await client.offer(), "type": "offer", "codec": codec}
                    client.offered_at = time.monotonic()
                    async with http.post(f"{url}/offer", json=body) as resp:
                        answer = await resp.json()
                        if resp.status != 200:
                            raise RuntimeError(f"offer refused: {resp.status} {answer}")
                    await client.accept(answer)
                    client.session_id = answer["session_id"]
            conn.send({"connected": [c.session_id for c in clients]})
            await asyncio.sleep(seconds + 1.5)  # the speech, then the pipeline delay
            report = []
            for client in clients:
                windows = audio_lag_by_window(speech[: int(min(seconds, 6.0) * 48_000)], client.received_audio())
                lags = [w[1] for w in windows if w[2] > 0.5]
                sure = [w[1] for w in windows if w[2] > 0.6]  # the spread: well-matched windows only
                first = client.video_times[0] - client.offered_at if client.video_times else None
                report.append({"session": client.session_id, "client_fps": round(client.fps(skip_s=1.0), 2),
                               "frames_received": len(client.video_times),
                               "first_frame_ms": round(1000 * first, 1) if first is not None else None,
                               "audio_round_trip_ms": round(1000 * statistics.median(lags), 1) if lags else None,
                               "audio_lag_spread_ms": round(1000 * (max(sure) - min(sure)), 1) if sure else None})
            conn.send(report)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the server has its snapshots
    except Exception as exc:  # noqa: BLE001 - reported to the server side, which raises it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        for client in clients:
            await client.close()


def _client_process(url: str, sessions: int, seconds: float, codec: str, conn, nice: int = 0) -> None:
    if nice:  # the load generator yields the cores to the service under test, as remote browsers use none
        os.nice(nice)
    asyncio.run(_clients(url, sessions, seconds, codec, conn))


class _CpuMeter:
    """CPU time of the gateway (this process), the worker processes and the clients' process between
    `start()` and `stop()`, in percent of one core."""

    def __init__(self, workers: list[int], clients: int) -> None:
        import psutil

        self._procs = {"gateway": psutil.Process(), "clients": psutil.Process(clients),
                       **{f"worker_{k}": psutil.Process(pid) for k, pid in enumerate(workers)}}
        self._t0, self._cpu0 = 0.0, {}

    def _cpu(self) -> dict[str, float]:
        import psutil

        out = {}
        for name, proc in self._procs.items():
            try:
                t = proc.cpu_times()
            except psutil.Error:  # a process that ended (a killed worker) drops out
                continue
            out[name] = t.user + t.system
        return out

    def start(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), self._cpu()

    def stop(self) -> dict[str, float]:
        dt, now = time.perf_counter() - self._t0, self._cpu()
        used = {k: round(100 * (now[k] - self._cpu0[k]) / dt, 1) for k in now if k in self._cpu0}
        return {**used, "total": round(sum(used.values()), 1), "machine": 100 * (os.cpu_count() or 1)}


def _fresh_fps(before: dict, after: dict) -> float:
    """Fresh frames per second of call time between two call snapshots: frames the pacer played that it
    did not repeat and the engine did not hold (a session behind real time repeats its last frame)."""
    held = (after["engine"].get("held_frames") or 0) - (before["engine"].get("held_frames") or 0)
    played = after["pacer"]["played"] - before["pacer"]["played"] - held
    # (held frames the pacer dropped late were never played: at 0 the call showed only held frames)
    return max(0.0, round(played / max(1e-9, after["pacer"]["slots"] - before["pacer"]["slots"]) * 25, 2))


# ---- the server: the real HTTP app, the gateway, its engine (workers) and live service ---------------
def _backend(settings, workers: int, model: str, decoder: str, max_batch: int | None = None, nice: int = 0):
    """The in-process engine (workers 0) or a pool of engine worker processes; the engine to stop after."""
    if workers == 0:
        from app.avatars import EngineBackend, prepare_avatars
        from app.render_worker import load_models
        from avatar.engine import AvatarEngine, preset_options

        models = load_models(model)
        batch = {} if max_batch is None else {"max_batch": max_batch}
        engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder=decoder,
                                                     max_sessions=settings.max_sessions,
                                                     threads=settings.compute_threads(), **batch)).start()
        avatars, default = prepare_avatars(engine)
        return EngineBackend(engine, avatars, default), engine
    from app.workers.engine_worker import WorkerSpec
    from app.workers.pool import PoolOptions, WorkerPool

    spec = WorkerSpec(model=model, max_sessions=settings.max_sessions, threads=settings.threads_per_worker(),
                      decoder=decoder, max_batch=max_batch, nice=nice)
    return WorkerPool(spec, PoolOptions(workers=workers)), None


async def _run(sessions: int, seconds: float, decoder: str, codec: str, threads: int, workers: int = 1,
               model: str = "tiny", max_batch: int | None = None, nice: int = 0, client_nice: int = 0) -> dict:
    import multiprocessing

    from aiohttp import web

    from app.server import LOOP_LAG, SERVICE, create_app, service_options
    from app.settings import Settings
    from streaming.webrtc.testing import loopback_candidates_only

    t_start = time.perf_counter()
    per_worker = -(-sessions // max(1, workers))
    settings = Settings(host="127.0.0.1", max_sessions=per_worker, admin_token="bench-live-token-000",
                        engine_threads=threads, workers=str(workers), model=model, calls_per_client=sessions,
                        offers_per_minute=max(12, 2 * sessions))
    backend, engine = _backend(settings, workers, model, decoder, max_batch, nice)
    app = create_app(settings, backend, options=service_options(settings, workers=max(1, workers)))
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()  # a worker pool starts here: its first worker ready
    while workers and any(h.state != "ready" for h in backend.handles):
        await asyncio.sleep(0.1)
    startup_s = time.perf_counter() - t_start
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    service, loop_lag = app[SERVICE], app[LOOP_LAG]
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_client_process, args=(f"http://127.0.0.1:{port}", sessions, seconds, codec, there,
                                                            client_nice))
    loop = asyncio.get_running_loop()
    try:
        with loopback_candidates_only():
            proc.start()
            connected = await loop.run_in_executor(None, here.recv)
            if "error" in connected:
                raise RuntimeError(f"benchmark clients failed: {connected['error']}")
            # steady state: pacer counts from STEADY_AFTER_S into the call to its end (the first
            # second or so is the pipeline filling up, sent as repeated frames)
            await asyncio.sleep(STEADY_AFTER_S)
            early = {sid: service.peers[sid].snapshot() for sid in connected["connected"]
                     if sid in service.peers}
            loop_lag.reset()
            cpu = _CpuMeter([h.link.pid for h in getattr(backend, "handles", []) if h.link and h.link.pid],
                            proc.pid)
            cpu.start()
            clients = await loop.run_in_executor(None, here.recv)
            cpu_percent = cpu.stop()
            if isinstance(clients, dict):
                raise RuntimeError(f"benchmark clients failed: {clients['error']}")
            lag = loop_lag.summary()
            per_session, ended = [], []
            for client in clients:
                if client["session"] not in service.peers or client["session"] not in early:
                    ended.append({**client, **service.ended.get(client["session"], {"reason": "ended early"})})
                    continue  # a call that ended is reported with why, not measured
                snap = service.peers[client["session"]].snapshot()
                per_session.append({
                    **client,
                    "server_fps": snap["video"]["fps"],
                    # new pictures per second of call time: below 25 the engine is not keeping up
                    "new_frame_fps": _fresh_fps({"pacer": {"played": 0, "slots": 0}, "engine": {}}, snap),
                    "steady_new_frame_fps": _fresh_fps(early[client["session"]], snap),
                    "held_frames": snap["engine"].get("held_frames", 0),
                    "latency_ms_p50": snap["latency_ms"]["p50"],
                    "latency_ms_p95": snap["latency_ms"]["p95"],
                    "repeated_frames": snap["pacer"]["repeated"],
                    "dropped_frames": snap["pacer"]["dropped_overflow"] + snap["pacer"]["dropped_late"]
                    + snap["pacer"]["dropped_trim"],
                    "skipped_slots": snap["video"]["skipped"],
                    "restarts": snap["restarts"],
                    "engine_stage_ms": snap["engine"].get("stage_ms"),
                })
            engine_snap = backend.snapshot()
            here.send("done")
            await loop.run_in_executor(None, proc.join, 30)
    finally:
        if proc.is_alive():
            proc.kill()
        await runner.cleanup()  # stops a worker pool
        if engine is not None:
            engine.stop()
    if not per_session:
        raise RuntimeError(f"every call ended before it could be measured: {ended}")
    fps = [s["client_fps"] for s in per_session]
    fresh = [s["steady_new_frame_fps"] for s in per_session]
    latencies = [s["latency_ms_p50"] for s in per_session if s["latency_ms_p50"] is not None]
    first_frames = [s["first_frame_ms"] for s in per_session if s["first_frame_ms"] is not None]
    return {
        "benchmark": "live", "sessions": sessions, "seconds": seconds, "model": engine_snap["model"],
        "workers": workers, "engine": "in the server's process" if workers == 0 else f"{workers} worker processes",
        "max_batch": max_batch or "engine default",
        "worker_nice": nice if workers else None, "client_nice": client_nice,
        "decoder": engine_snap["decoder"], "codec": codec, "cpu_count": os.cpu_count(),
        "engine_threads": settings.compute_threads() if workers == 0 else settings.threads_per_worker(),
        "clients": "separate process, over HTTP /offer",
        "engine_startup_s": round(startup_s, 1),
        "all_sent_at_25fps": all(22.5 <= f <= 27.5 for f in fps),
        "all_generated_at_25fps": all(f >= 22.5 for f in fresh),
        "calls_at_24_fresh_fps": sum(f >= 24.0 for f in fresh),
        "all_audio_lag_steady": all((s["audio_lag_spread_ms"] or AUDIO_LAG_STEADY_MS) < AUDIO_LAG_STEADY_MS
                                    for s in per_session),
        "max_audio_lag_spread_ms": max((s["audio_lag_spread_ms"] or 0.0) for s in per_session),
        "min_client_fps": min(fps), "mean_client_fps": round(float(np.mean(fps)), 2),
        "min_new_frame_fps": min(s["new_frame_fps"] for s in per_session),
        "min_steady_new_frame_fps": min(fresh), "mean_steady_new_frame_fps": round(float(np.mean(fresh)), 2),
        "latency_ms_p50": round(float(np.median(latencies)), 1) if latencies else None,
        "first_frame_ms": round(float(np.median(first_frames)), 1) if first_frames else None,
        "loop_lag_ms": lag,
        "cpu_percent": cpu_percent,
        "latency_budget_ms": engine_snap["latency_budget"],
        "per_session": per_session,
        "ended_calls": ended,
    }


def run(sessions: int = 4, seconds: float = 8.0, decoder: str = "auto", codec: str = "vp8", threads: int = 0,
        workers: int = 1, model: str = "tiny", max_batch: int | None = None, nice: int = 0,
        client_nice: int = 0) -> dict:
    """N concurrent loopback calls for `seconds` each; returns the report (see the module docstring)."""
    return asyncio.run(_run(sessions, seconds, decoder, codec, threads, workers, model, max_batch, nice,
                            client_nice))


def compare(seconds: float = 8.0, decoder: str = "auto", codec: str = "vp8", threads: int = 0,
            model: str = "tiny") -> dict:
    """One call against the engine in the server's process, then against one worker process, same run:
    what moving the engine out of the gateway costs a single call."""
    before = run(1, seconds, decoder, codec, threads, workers=0, model=model)
    after = run(1, seconds, decoder, codec, threads, workers=1, model=model)
    keys = ("latency_ms_p50", "first_frame_ms", "min_steady_new_frame_fps", "engine_startup_s")
    return {"benchmark": "live-compare", "model": after["model"], "seconds": seconds,
            "in_process": {k: before[k] for k in keys}, "one_worker": {k: after[k] for k in keys},
            "runs": [before, after]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="4", help="calls, or a comma-separated list (one server per count)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--decoder", default="auto", choices=["auto", "onnx", "torch"])
    parser.add_argument("--codec", default="vp8", choices=["vp8", "h264"])
    parser.add_argument("--threads", type=int, default=0, help="engine compute threads (0: half the cores, "
                        "as `serve` does)")
    parser.add_argument("--workers", type=int, default=1, help="engine worker processes (0: the engine in the "
                        "server's process)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "demo"])
    parser.add_argument("--compare", action="store_true", help="one call: in-process engine vs one worker")
    parser.add_argument("--max-batch", type=int, default=None, help="sessions per batched DiT call (default: "
                        "the engine's)")
    parser.add_argument("--worker-nice", default="0", help="worker processes' nice increment, or a comma-"
                        "separated list: each count runs once per value, interleaved (0: the gateway's priority)")
    parser.add_argument("--client-nice", default="0", help="the clients' process's nice increment, or a comma-"
                        "separated list as for --worker-nice (e.g. 10: the stand-ins for remote browsers take "
                        "only the CPU the service leaves)")
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(args.seconds, args.decoder, args.codec, args.threads, args.model), indent=2))
        return
    counts = [int(n) for n in args.sessions.split(",")]
    nices = [int(v) for v in args.worker_nice.split(",")]
    client_nices = [int(v) for v in args.client_nice.split(",")]
    reports = [run(n, args.seconds, args.decoder, args.codec, args.threads, args.workers, args.model, args.max_batch,
                   nice, client_nice) for n in counts for nice in nices for client_nice in client_nices]
    print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))


if __name__ == "__main__":
    main()
