"""One real browser call, for tests/app/test_browser.py: run it inside a loopback-only network namespace.

Starts the live service (real engine, random TINY models) on 127.0.0.1, launches headless Chromium with
fake media devices (a wav file as the microphone), drives the page over the Chrome DevTools Protocol
(aiohttp's websocket client), presses Call, counts decoded frames from the page
(requestVideoFrameCallback), hangs up, and prints one JSON line with what it saw.

    unshare --net sh -c 'ip link set lo up && exec python tests/app/browser_call.py --wav speech.wav'
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = [
    "--headless", "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage",
    "--mute-audio", "--autoplay-policy=no-user-gesture-required", "--window-size=1100,800",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",  # without it Chromium gathers no candidate on a lo-only host
    "--disable-features=WebRtcHideLocalIpsWithMdns",  # aiortc cannot resolve .local candidates
    "--remote-debugging-port=0",
]


class DevTools:
    """Just enough CDP: Runtime.evaluate on one page target."""

    def __init__(self, ws) -> None:
        self.ws, self._ids = ws, itertools.count(1)

    async def evaluate(self, expression: str, gesture: bool = False) -> Any:
        msg_id = next(self._ids)
        await self.ws.send_json({"id": msg_id, "method": "Runtime.evaluate", "params": {
            "expression": expression, "returnByValue": True, "awaitPromise": True, "userGesture": gesture}})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == msg_id:
                if "exceptionDetails" in msg.get("result", {}):
                    raise RuntimeError(f"page error: {msg['result']['exceptionDetails']}")
                return msg["result"]["result"].get("value")

    async def screenshot(self, path: Path) -> None:
        import base64

        msg_id = next(self._ids)
        await self.ws.send_json({"id": msg_id, "method": "Page.captureScreenshot", "params": {"format": "png"}})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == msg_id:
                path.write_bytes(base64.b64decode(msg["result"]["data"]))
                return

    async def poll(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.25)


async def start_server() -> tuple[web.AppRunner, int, Any, Any, list[str]]:
    from app.avatars import EngineBackend, prepare_avatars
    from app.server import SERVICE, create_app
    from app.settings import Settings
    from avatar.engine import AvatarEngine, EngineOptions, ModelBundle

    engine = AvatarEngine(ModelBundle.random("tiny", "tiny"), EngineOptions(max_sessions=2, decoder="torch")).start()
    avatars, default = prepare_avatars(engine)
    app = create_app(Settings(admin_token="browser-test-token-0123"), EngineBackend(engine, avatars, default))
    service = app[SERVICE]
    offers: list[str] = []
    original = service.offer

    async def recording_offer(offer):  # keep the browser's SDP to check its candidates
        offers.append(offer.sdp)
        return await original(offer)

    service.offer = recording_offer
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, port, engine, service, offers


async def launch_chromium(chromium: str, wav: Path, url: str, profile: Path, log) -> tuple[Any, int]:
    flags = CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={wav}", f"--user-data-dir={profile}"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = await asyncio.create_subprocess_exec(chromium, *flags, url, stdout=log, stderr=log)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError("Chromium did not open its DevTools port")
        await asyncio.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False}
    runner, port, engine, service, offers = await start_server()
    profile = Path(tempfile.mkdtemp(prefix="avatarcast-chromium-"))
    log = open(profile / "chromium.log", "wb")
    proc = None
    try:
        proc, devtools_port = await launch_chromium(args.chromium, args.wav, f"http://127.0.0.1:{port}/", profile, log)
        async with ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{devtools_port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = DevTools(ws)
                await cdp.poll("window.avatarcast && window.avatarcast.ready === true", 30, "the page to load")
                await cdp.evaluate("document.getElementById('call').click(); true", gesture=True)
                state = ("JSON.stringify({status: avatarcast.status, frames: avatarcast.framesRendered, "
                         "stats: avatarcast.stats, session: avatarcast.sessionId, "
                         "message: document.getElementById('message').textContent})")
                try:
                    await cdp.poll(f"avatarcast.status === 'error' || avatarcast.framesRendered >= {args.frames}",
                                   args.timeout, f"{args.frames} rendered frames")
                except TimeoutError:
                    out["page"] = json.loads(await cdp.evaluate(state))
                    out["page_pc"] = await cdp.evaluate(
                        "avatarcast.pc && [avatarcast.pc.connectionState, avatarcast.pc.iceConnectionState]")
                    out["server"] = [p.snapshot() for p in service.peers.values()]
                    out["offers"] = offers
                    raise
                first = json.loads(await cdp.evaluate(state))
                t0 = time.monotonic()
                await asyncio.sleep(2.0)
                second = json.loads(await cdp.evaluate(state))
                out["page_fps"] = round((second["frames"] - first["frames"]) / (time.monotonic() - t0), 1)
                if args.screenshot is not None:
                    await cdp.screenshot(args.screenshot)
                out["page"] = second
                peer = service.peers.get(second["session"])
                out["server"] = peer.snapshot() if peer is not None else None
                await cdp.evaluate("document.getElementById('hangup').click(); true", gesture=True)
                deadline = time.monotonic() + 10
                while (service.peers or engine.sessions) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                out["closed_reason"] = peer.end_reason if peer is not None else None
                out["peers_after"], out["engine_sessions_after"] = len(service.peers), len(engine.sessions)
        out["offer_candidates"] = sorted({m.group(1) for sdp in offers
                                          for m in re.finditer(r"a=candidate:\S+ \d+ \w+ \d+ (\S+) ", sdp)})
        out["ok"] = True
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
        log.close()
        out["chromium_log_tail"] = (profile / "chromium.log").read_text(errors="replace")[-1500:]
        shutil.rmtree(profile, ignore_errors=True)
        await runner.cleanup()
        engine.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wav", type=Path, required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--frames", type=int, default=75)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--screenshot", type=Path, default=None, help="save a PNG of the page mid-call")
    from streaming.webrtc.testing import loopback_candidates_only

    with loopback_candidates_only():  # the namespace has only lo, and aioice never offers 127.0.0.1 itself
        result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
