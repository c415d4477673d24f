"""The gateway with two engine workers as Ray actors, for tests/app/test_workers_ray.py: run it inside a
loopback-only network namespace (Ray binds nothing but 127.0.0.1 there).

Starts a local Ray cluster, the live service over a `WorkerPool` of two Ray actors (random TINY models),
makes two real aiortc calls over loopback, kills one actor's process with SIGKILL mid-call, and
watches: the other call keeps making frames, a new call succeeds, the killed actor is restarted and takes
a call again, and every slot is free once the calls end. Prints one JSON line with what it saw.

    unshare --net sh -c 'ip link set lo up && exec python tests/app/ray_workers_call.py'
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


async def until(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def run() -> dict[str, Any]:
    import ray
    from aiohttp import ClientSession, web

    from app.server import SERVICE, create_app, service_options
    from app.settings import Settings
    from app.workers.engine_worker import WorkerSpec
    from app.workers.pool import PoolOptions, WorkerPool
    from streaming.webrtc.testing import LoopbackClient

    out: dict[str, Any] = {"ok": False}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out["nodes"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    pool = WorkerPool(WorkerSpec(model="tiny", max_sessions=2, threads=1, decoder="torch", heartbeat_s=0.25),
                      PoolOptions(workers=2, backend="ray", heartbeat_timeout_s=3.0, backoff_s=0.5, tick_s=0.05))
    settings = Settings(admin_token="ray-workers-test-token-01", max_sessions=2, idle_timeout_s=30,
                        connect_timeout_s=20, calls_per_client=8)
    app = create_app(settings, pool, options=service_options(settings, workers=2))
    service = app[SERVICE]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    auth = {"Authorization": f"Bearer {settings.admin_token}"}
    peers: list[LoopbackClient] = []

    def frames(sid: str) -> int:
        return service.get(sid).snapshot()["engine"].get("frames", 0)

    def worker_of(sid: str):
        return next(h for h in pool.handles if h.id == service.get(sid).session.worker_id)

    try:
        async with ClientSession() as http:
            async def call() -> str:
                peer = LoopbackClient(keep_video=False)
                peers.append(peer)
                async with http.post(f"{url}/offer", json={"sdp": await peer.offer(), "type": "offer"}) as resp:
                    answer = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"offer refused: {resp.status} {answer}")
                await peer.accept(answer)
                return answer["session_id"]

            async def admin_workers() -> list[dict]:
                async with http.get(f"{url}/admin/workers", headers=auth) as resp:
                    return (await resp.json())["workers"]

            await until(lambda: all(h.state == "ready" for h in pool.handles), 120, "both actors ready")
            out["workers_before"] = await admin_workers()
            a, b = await call(), await call()
            await until(lambda: frames(a) > 12 and frames(b) > 12, 30, "frames on both calls")
            wa, wb = worker_of(a), worker_of(b)
            out["calls_on_distinct_workers"] = wa is not wb
            killed_pid = wa.info["pid"]
            before_b = frames(b)
            os.kill(killed_pid, signal.SIGKILL)
            out["noticed_s"] = round(await until(lambda: wa.state == "dead", 10, "the killed actor noticed"), 3)
            # The other call's frames over the next 2 s, sampled every 50 ms: the property is that they keep
            # coming (no long stall), not a rate; the healthy worker takes on the moved call meanwhile.
            last_n, last_t, stall, t_end = before_b, time.monotonic(), 0.0, time.monotonic() + 2.0
            while (now := time.monotonic()) < t_end:
                if (n := frames(b)) > last_n:
                    last_n, last_t = n, now
                stall = max(stall, now - last_t)
                await asyncio.sleep(0.05)
            out["other_call_frames_in_2s"] = frames(b) - before_b
            out["other_call_longest_stall_s"] = round(max(stall, time.monotonic() - last_t), 3)
            out["other_call_restarts"] = service.get(b).restarts
            out["moved_call"] = {"restarts": service.get(a).restarts, "error": service.get(a).error,
                                 "now_on_healthy_worker": worker_of(a) is wb}
            await until(lambda: frames(a) > 12, 20, "frames again on the moved call")
            out["restart_s"] = round(await until(lambda: wa.state == "ready", 120, "the actor's restart"), 1)
            c = await call()
            out["new_call_on_restarted_worker"] = worker_of(c) is wa
            await until(lambda: frames(c) > 12, 30, "frames from the restarted actor")
            out["workers_after_restart"] = await admin_workers()
            out["killed_pid"] = killed_pid
            for sid in (a, b, c):
                async with http.post(f"{url}/sessions/{sid}/bye") as resp:
                    assert resp.status == 200
            await until(lambda: not any(h.sessions for h in pool.handles), 5, "every slot free")
            out["workers_at_end"] = await admin_workers()
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["workers"] = pool.workers()
    finally:
        for peer in peers:
            await peer.close()
        await runner.cleanup()
        ray.shutdown()
    return out


def main() -> None:
    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    main()
