"""Real calls against the real `avatarcast serve`, for tests/app/test_browser.py: run it inside a
loopback-only network namespace, where aioice finds no address at all (it leaves loopback out), so a
call connects only if the server offers 127.0.0.1 itself. Nothing is patched, in this process or the
server's.

Starts `avatarcast serve --host 127.0.0.1` (random TINY models, the engine in the server's process) as
a subprocess; then
1. an aiortc client (`LoopbackClient`) calls it and counts the frames it receives;
2. headless Chromium with fake media devices (a wav file as the microphone) opens the page, driven
   over the Chrome DevTools Protocol (aiohttp's websocket client), presses Call, counts decoded frames
   from the page (requestVideoFrameCallback) and hangs up;
the server's side of each call is read from its admin API. Prints one JSON line with what it saw.

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
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

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


TOKEN = "browser-test-token-0123"
CANDIDATE = re.compile(r"a=candidate:\S+ \d+ \w+ \d+ (\S+) ")


def candidates(sdp: str | None) -> list[str]:
    return sorted({m.group(1) for m in CANDIDATE.finditer(sdp or "")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server(log, media_dir: Path | None = None) -> tuple[Any, str]:
    """`avatarcast serve` on 127.0.0.1 (no ICE hosts configured: it must see the loopback bind itself)."""
    port = free_port()
    cli = Path(sys.executable).with_name("avatarcast")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-c", "from app.cli import main; main()"]
    env = {**os.environ, "AVATARCAST_ADMIN_TOKEN": TOKEN, "AVATARCAST_MODEL": "tiny", "AVATARCAST_WORKERS": "0",
           "AVATARCAST_MAX_SESSIONS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("AVATARCAST_ICE_HOSTS", None)
    if media_dir is not None:  # the files a two-person call may take as its second voice
        env["AVATARCAST_MEDIA_DIR"] = str(media_dir)
    proc = await asyncio.create_subprocess_exec(*cmd, "serve", "--host", "127.0.0.1", "--port", str(port),
                                                stdout=log, stderr=log, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    async with ClientSession() as http:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"avatarcast serve exited with {proc.returncode}")
            try:
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return proc, url
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("avatarcast serve did not answer /healthz within 120 s")
            await asyncio.sleep(0.25)


class Admin:
    def __init__(self, http: ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            return resp.status, await resp.json()


async def aiortc_call(url: str, admin: Admin, frames: int, timeout: float) -> dict[str, Any]:
    """A plain aiortc peer (it offers its own 127.0.0.1 candidate, as the page's browser does)."""
    from streaming.webrtc.testing import LoopbackClient

    out: dict[str, Any] = {}
    client = LoopbackClient(keep_video=False)
    try:
        async with admin.http.post(f"{url}/offer", json={"sdp": await client.offer(), "type": "offer"}) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        out["answer_candidates"] = candidates(answer["sdp"])
        await client.accept(answer)
        deadline = time.monotonic() + timeout
        while len(client.video_times) < frames and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        out["frames"], out["connection"] = len(client.video_times), client.pc.connectionState
        out["server"] = (await admin.get(f"/admin/sessions/{answer['session_id']}"))[1]
        async with admin.http.post(f"{url}/sessions/{answer['session_id']}/bye") as resp:
            out["bye"] = resp.status
    finally:
        await client.close()
    return out


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
    out: dict[str, Any] = {"ok": False, "interfaces": sorted(name for _, name in socket.if_nameindex())}
    profile = Path(tempfile.mkdtemp(prefix="avatarcast-chromium-"))
    log = open(profile / "chromium.log", "wb")
    server_log = open(profile / "server.log", "wb")
    proc = server = None
    try:
        media = None
        if args.dialogue:
            media = profile / "media"
            media.mkdir()
            shutil.copy(args.wav, media / "guest.wav")
        server, url = await start_server(server_log, media)
        async with ClientSession() as http:
            admin = Admin(http, url)
            if not args.dialogue:
                out["aiortc"] = await aiortc_call(url, admin, args.frames, args.timeout)
            proc, devtools_port = await launch_chromium(args.chromium, args.wav, f"{url}/", profile, log)
            targets = await (await http.get(f"http://127.0.0.1:{devtools_port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = DevTools(ws)
                await cdp.poll("window.avatarcast && window.avatarcast.ready === true", 30, "the page to load")
                if args.dialogue:  # the two-face avatar, the caller on the left, a server file on the right
                    await cdp.evaluate("(() => { const a = document.getElementById('avatar-select'); "
                                       "a.value = 'sketch-duo'; a.dispatchEvent(new Event('change')); "
                                       "const r = document.querySelector('input[name=voices][value=file]'); "
                                       "r.checked = true; r.dispatchEvent(new Event('change')); return true; })()")
                    await cdp.poll("document.getElementById('voice-select').options.length > 0", 10,
                                   "the media folder's files in the second-voice picker")
                await cdp.evaluate("document.getElementById('call').click(); true", gesture=True)
                state = ("JSON.stringify({status: avatarcast.status, frames: avatarcast.framesRendered, "
                         "stats: avatarcast.stats, session: avatarcast.sessionId, "
                         "message: document.getElementById('message').textContent})")
                sdps = ("JSON.stringify(avatarcast.pc && [avatarcast.pc.localDescription && "
                        "avatarcast.pc.localDescription.sdp, avatarcast.pc.remoteDescription && "
                        "avatarcast.pc.remoteDescription.sdp])")
                try:
                    await cdp.poll(f"avatarcast.status === 'error' || avatarcast.framesRendered >= {args.frames}",
                                   args.timeout, f"{args.frames} rendered frames")
                except TimeoutError:
                    out["page"] = json.loads(await cdp.evaluate(state))
                    out["page_pc"] = await cdp.evaluate(
                        "avatarcast.pc && [avatarcast.pc.connectionState, avatarcast.pc.iceConnectionState]")
                    out["server"] = (await admin.get("/admin/sessions"))[1]
                    out["sdps"] = await cdp.evaluate(sdps)
                    raise
                offer_sdp, answer_sdp = json.loads(await cdp.evaluate(sdps))
                out["offer_candidates"], out["answer_candidates"] = candidates(offer_sdp), candidates(answer_sdp)
                first = json.loads(await cdp.evaluate(state))
                t0 = time.monotonic()
                await asyncio.sleep(2.0)
                second = json.loads(await cdp.evaluate(state))
                out["page_fps"] = round((second["frames"] - first["frames"]) / (time.monotonic() - t0), 1)
                if args.screenshot is not None:
                    await cdp.screenshot(args.screenshot)
                out["page"] = second
                sid = second["session"]
                status, snap = await admin.get(f"/admin/sessions/{sid}")
                out["server"] = snap if status == 200 else None
                await cdp.evaluate("document.getElementById('hangup').click(); true", gesture=True)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    sessions = (await admin.get("/admin/sessions"))[1]["sessions"]
                    engine = (await admin.get("/admin/engine"))[1]
                    if not sessions and not engine["sessions"]:
                        break
                    await asyncio.sleep(0.1)
                async with http.get(f"{url}/sessions/{sid}") as resp:  # an ended call: 410 with its reason
                    out["closed_reason"] = (await resp.json()).get("reason")
                out["peers_after"], out["engine_sessions_after"] = len(sessions), engine["sessions"]
        out["ok"] = True
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for p in (proc, server):
            if p is not None and p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), 15)
                except asyncio.TimeoutError:
                    p.kill()
        log.close()
        server_log.close()
        out["chromium_log_tail"] = (profile / "chromium.log").read_text(errors="replace")[-1500:]
        out["server_log_tail"] = (profile / "server.log").read_text(errors="replace")[-1500:]
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wav", type=Path, required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--frames", type=int, default=75)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--screenshot", type=Path, default=None, help="save a PNG of the page mid-call")
    parser.add_argument("--dialogue", action="store_true", help="a two-person call: sketch-duo, a media file as "
                                                                 "the second voice")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
