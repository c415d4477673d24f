"""`avatarcast console`: the Textual operator console, a client of the admin API only.

1. Against a real in-process server (random TINY models) and a real loopback aiortc call: the session
   shows up in the table, changing its emotion reaches the server, ending it (after the confirm modal)
   removes it there, and a livestream of the call to HLS starts, goes live and stops.
2. The server down at start, killed mid-run, and a bad token: the console says so, keeps running, and
   recovers when the server comes back.
3. Snapshot tests (pytest-textual-snapshot) of every screen and state from fixed fake snapshots, wide
   and narrow; pure panel functions and client error mapping; the console never imports the engine.
4. The contract: the fake client's answers (and the fake data below) and a real server's answers, over a
   real call, pass the same schema (streaming/api_schema.py), so the fake cannot drift from the server.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import sys
from datetime import timezone
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from rich.console import Console
from textual import events
from textual.widgets import DataTable, Input, OptionList, Static
from typer.testing import CliRunner

from pydantic import TypeAdapter, ValidationError

from app.console.app import ConfirmScreen, ConsoleApp, EventLog, PickerScreen, TargetScreen
from app.console.client import (AdminClient, AdminError, ConsoleSnapshot, FakeAdminClient, error_from_response,
                                parse_sse)
from app.console.panels import (Sparkline, dropped_frames, emotion_choices, real_time_factor, redact_url,
                                session_cells, update_history, workers_panel)
from streaming import api_schema as schema

from helpers import until

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC: fixed event times for snapshots
WIDE, NARROW = (160, 45), (80, 30)


# ---- helpers -------------------------------------------------------------------------------------------
def text_of(widget: Static) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(widget.content)
    return console.export_text()


def log_text(app: ConsoleApp) -> str:
    """The event log's entries as plain text, one a line (before wrapping to the widget's width)."""
    return "\n".join(entry.plain for entry in app.query_one("#log", EventLog).entries)


async def press(app: ConsoleApp, *keys: str) -> None:
    """Keys as the terminal sends them, without Pilot's wait for an idle process: with the engine busy in
    this same process, every `pilot.press` key would wait its full one-second idle timeout."""
    chars = {"enter": "\r", "escape": "\x1b"}
    for key in keys:
        app.post_message(events.Key(key, chars.get(key, key if len(key) == 1 else None)))
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fixed fake data (the admin API's exact shapes, see app/admin.py and streaming/webrtc/peer.py) ------
def fake_session(sid: str, *, emotion: str | None = "neutral", paused: bool = False, pending: dict | None = None,
                 fps: float = 24.98, p50: float = 182.0, level: int = 3, dropped_late: int = 0, age_s: float = 754.2,
                 codec: str = "VP8", mode: str = "voice", seed: float = 1.0) -> dict:
    return {
        "id": sid, "state": "connected", "connection": "connected", "end_reason": None, "error": None,
        "avatar": "sketch", "emotion": emotion, "mode": mode, "codec": codec, "paused": paused, "swaps": 1,
        "restarts": 0, "pending": pending, "age_s": age_s, "created": T0 - age_s,
        "video": {"sent": int(age_s * 25), "fps": fps, "skipped": 0},
        "audio": {"sent": int(age_s * 50), "skipped_samples": 0},
        "mic": {"frames": int(age_s * 50), "seconds": age_s, "rejected": 0, "last_packet_s_ago": 0.02,
                "ignored_while_paused": 0, "silence_pushed_s": 0.4},
        "pacer": {"level": level, "started": True, "pushed": 18000, "slots": 18000, "played": 17990,
                  "repeated": 10, "dropped_overflow": 0, "dropped_late": dropped_late, "dropped_trim": 0,
                  "max_level": 9},
        "latency_ms": {"p50": p50, "p95": p50 + 41.5, "last": p50 + 3.0}, "speaking": True,
        "speakers": 1, "dialogue": None,
        "engine": {"session": f"s{int(seed)}", "frames": 18000, "idle_frames": 200, "blocks": 1500,
                   "dropped_input_samples": 0, "dropped_frames": 0, "held_frames": 48,
                   "stage_ms": {"features": 1.2 * seed, "denoise": 38.4 * seed, "decode": 21.7 * seed,
                                "block": 61.3 * seed, "wait": 352.0 * seed, "pacing": 24.5 * seed}},
    }


WORKER_RATES = [  # a worker pool's workers as /admin/metrics' engine carries them
    {"id": "w1", "pid": 4242, "host": "gpu-a", "state": "ready", "sessions": 2, "restarts": 1, "max_sessions": 4,
     "fps": 49.6, "block_ms": 61.3, "load": 0.41, "last_error": "killed by SIGKILL"},
    {"id": "w2", "pid": None, "host": "gpu-b", "state": "starting", "sessions": 0, "restarts": 3, "max_sessions": 4,
     "fps": None, "block_ms": None, "load": None, "last_error": "no heartbeat for 5.2 s (wedged)"}]
WORKERS = {"workers": [{k: w[k] for k in ("id", "pid", "host", "state", "sessions", "restarts")}
                       for w in WORKER_RATES]}  # GET /admin/workers
ENGINE_STATS = {"model": "random-tiny", "mode": "causal", "device": "cuda:0", "decoder": "CUDAExecutionProvider",
                "warmup_ms": 2299.5, "failures": 0,
                "latency_budget": {"block_ms": 480.0, "lookahead_ms": 7.5, "features_ms": 1.2, "denoise_ms": 38.4,
                                   "decode_ms": 21.7, "total_ms": 548.8},
                "sessions": {"s1": {"frames": 18000, "idle_frames": 200, "blocks": 1500, "next_pts": 18000,
                                    "dropped_input_samples": 0, "dropped_frames": 0, "held_frames": 48}},
                "workers": WORKER_RATES}  # /admin/metrics' engine
ENGINE = {**{k: v for k, v in ENGINE_STATS.items() if k != "workers"}, "checkpoint": "/models/demo/dit.safetensors", "sessions": 2, "rtf": 0.127,
          "memory": {"rss_bytes": 1_932_735_283, "cuda_allocated_bytes": 3_221_225_472,
                     "cuda_reserved_bytes": 4_294_967_296}}  # GET /admin/engine
NO_BROADCAST = {"available": False, "status": 501, "message": "broadcasting is not configured on this server"}
LIVE_BROADCAST = {"max_broadcasts": 2, "broadcasts": [
    {"id": "b1", "source": {"type": "session", "session_id": "k3Jd9sPq2LmX7aBc"}, "created": T0 + 20,
     "target": "rtmp://live.example.org/app/sk_l…", "kind": "rtmp", "state": "live", "end_reason": None,
     "last_error": None, "frames_sent": 12000, "seconds_sent": 480.0, "bitrate_kbps": 2480.4,
     "video_bitrate_kbps": 2500, "reconnects": 1, "disconnects": 1, "buffered": 2},
    {"id": "b2", "source": {"type": "audio", "audio": "/srv/promo.wav"}, "created": T0 + 25,
     "target": "broadcasts/show/index.m3u8", "kind": "hls", "state": "reconnecting", "end_reason": None,
     "last_error": "connection reset by peer", "frames_sent": 900, "seconds_sent": 36.0, "bitrate_kbps": 0.0,
     "video_bitrate_kbps": 2500, "reconnects": 3, "disconnects": 3, "buffered": 0}]}


def fake_snapshot(sessions: list[dict], broadcast: dict = NO_BROADCAST) -> dict:
    return {"metrics": {"sessions": sessions, "max_sessions": 4, "uptime_s": 5421.0, "subscribers": 1,
                        "engine": ENGINE_STATS},
            "engine": ENGINE, "broadcast": broadcast, "workers": WORKERS}


TWO_SESSIONS = [fake_session("k3Jd9sPq2LmX7aBc", emotion="happy", seed=1.0),
                fake_session("Zt81mQwErT5yUi0p", emotion="neutral", paused=True, fps=25.0, p50=0.0, level=0,
                             dropped_late=7, age_s=61.0, codec="H264", mode="file", seed=1.3,
                             pending={"avatar": "sketch", "emotion": "sad"})]
EVENTS = [{"id": 1, "type": "session_opened", "time": T0 + 1, "session": "k3Jd9sPq2LmX7aBc", "avatar": "sketch",
           "emotion": "neutral", "mode": "voice", "codec": "VP8"},
          {"id": 2, "type": "session_connected", "time": T0 + 2, "session": "k3Jd9sPq2LmX7aBc", "connect_ms": 412.5},
          {"id": 3, "type": "conditions_requested", "time": T0 + 9, "session": "k3Jd9sPq2LmX7aBc",
           "avatar": "sketch", "emotion": "happy"},
          {"id": 4, "type": "conditions_changed", "time": T0 + 10, "session": "k3Jd9sPq2LmX7aBc",
           "avatar": "sketch", "emotion": "happy", "engine_session": "s1"},
          {"id": 5, "type": "session_paused", "time": T0 + 30, "session": "Zt81mQwErT5yUi0p", "dropped_frames": 4},
          {"id": 6, "type": "stats", "time": T0 + 31, "sessions": []}]


def fake_app(*snapshots, events=EVENTS, history: int = 0) -> ConsoleApp:
    """A console over scripted data; `history` extra varied snapshots fill the sparklines first."""
    script: list = []
    for i in range(history):
        wobble = [dict(s, video={**s["video"], "fps": s["video"]["fps"] - (i * 7 % 5) * 0.6},
                       latency_ms={**s["latency_ms"], "p50": s["latency_ms"]["p50"] + (i * 13 % 9) * 6},
                       engine={**s["engine"], "stage_ms": {k: v * (1 + (i * (j + 3) % 7) / 10)
                                                           for j, (k, v) in enumerate(s["engine"]["stage_ms"].items())}})
                  for s in snapshots[0]["metrics"]["sessions"]]
        script.append(fake_snapshot(wobble, snapshots[0]["broadcast"]))
    return ConsoleApp(FakeAdminClient([*script, *snapshots], events=events, repeat_last=False), poll_s=0.01,
                      retry_s=2.0, tz=timezone.utc)


async def settle(pilot) -> None:
    """Until the console has asked for every scripted snapshot (the next request then never answers, so
    the screen holds still) and shown the scripted events."""
    app, client = pilot.app, pilot.app.client
    await until(lambda: client.polls > len(client.snapshots) and app.link.state != "connecting", 10,
                "every scripted snapshot")
    await until(lambda: len(app.query_one("#log", EventLog).entries) >= len(app.client.scripted_events) - 1, 5,
                "the scripted events")
    await pilot.pause(0.05)


# ---- 1. a real server, a real call (engine and backend: tests/conftest.py) ----------------------------
class Server:
    """`avatarcast serve`'s app on a fixed loopback port that can be stopped and started again."""

    def __init__(self, backend, port: int, hls_dir: Path) -> None:
        self.backend, self.port, self.hls_dir, self.runner = backend, port, hls_dir, None
        self.url = f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        from app.server import create_app
        from app.settings import Settings

        settings = Settings(admin_token=TOKEN, max_sessions=2, idle_timeout_s=10, connect_timeout_s=10,
                            hls_dir=str(self.hls_dir))
        self.runner = web.AppRunner(create_app(settings, self.backend), shutdown_timeout=2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def admin(self, method: str, path: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession(headers=AUTH) as s, s.request(method, self.url + path) as r:
            return r.status, await r.json()


@pytest.fixture
async def server(backend, tmp_path):
    srv = Server(backend, free_port(), tmp_path / "hls")  # on 127.0.0.1: it offers that candidate itself
    await srv.start()
    yield srv
    await srv.stop()


async def start_call(url: str):
    from streaming.webrtc.testing import LoopbackClient

    peer = LoopbackClient(keep_video=False)
    async with aiohttp.ClientSession() as s, s.post(url + "/offer", json={"sdp": await peer.offer(),
                                                                          "type": "offer"}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    await peer.accept(answer)
    return peer, answer["session_id"]


async def test_console_shows_and_controls_a_live_call(server, backend):
    peer, sid = await start_call(server.url)
    app = ConsoleApp(AdminClient(server.url, TOKEN), poll_s=0.2, retry_s=0.3, tz=timezone.utc)
    try:
        async with app.run_test(size=WIDE):
            table = app.query_one("#sessions", DataTable)
            # 1. the call appears, with its numbers, and the engine and broadcast panels fill in
            await until(lambda: sid in table.rows, 10, "the session in the table")
            # moving frames, not a rate: the 25 fps target is bench_live's (a loaded CPU slows the loop)
            await until(lambda: float(str(table.get_cell(sid, "fps"))) > 5, 10, "the call's frame rate")
            assert str(table.get_cell(sid, "avatar")) == "sketch" and str(table.get_cell(sid, "state")) == "connected"
            engine = text_of(app.query_one("#engine", Static))
            assert "random-tiny" in engine and "cpu" in engine and "torch" in engine and "RSS" in engine
            assert "0 running of 2" in text_of(app.query_one("#broadcast", Static))
            workers = text_of(app.query_one("#workers", Static))  # the in-process engine is the one worker
            assert "1 ready of 1" in workers and "engine ready · 1 sessions" in workers and f"pid {os.getpid()}" in workers
            await until(lambda: app.link.events == "live", 5, "the event stream")
            assert app.selected == sid and sid in text_of(app.query_one("#detail", Static))

            # 2. change the emotion through the picker: the server applies it
            await press(app, "m")
            await until(lambda: isinstance(app.screen, PickerScreen), 5, "the emotion picker")
            picker = app.screen
            happy = next(i for i, (_, value) in enumerate(picker.choices) if value == ("sketch", "happy"))
            options = picker.query_one(OptionList)
            await until(lambda: options.highlighted == picker.current, 5, "the picker on the current choice")
            steps = happy - picker.current  # it opens on the current one: (sketch, no emotion)
            await press(app, *(["down"] * steps if steps > 0 else ["up"] * -steps))
            await until(lambda: options.highlighted == happy, 5, "the cursor on sketch · happy")
            await press(app, "enter")
            await until(lambda: not isinstance(app.screen, PickerScreen), 5, "the picker to close")
            for _ in range(100):  # the admin API shows it (applied at once: the call is silent)
                status, body = await server.admin("GET", f"/admin/sessions/{sid}")
                if body.get("emotion") == "happy":
                    break
                await asyncio.sleep(0.1)
            assert status == 200 and body["emotion"] == "happy" and body["swaps"] == 1, (body, log_text(app))
            await until(lambda: "happy" in str(table.get_cell(sid, "emotion")), 10, "the new emotion in the table")
            await until(lambda: "conditions_changed" in log_text(app), 5, "the change in the event log")

            # 3. livestream the call to HLS, watch it go live, stop it (after confirming)
            panel = lambda: text_of(app.query_one("#broadcast", Static))  # noqa: E731
            await press(app, "b")
            await until(lambda: isinstance(app.screen, TargetScreen), 5, "the target prompt")
            await press(app, *"console.m3u8", "enter")
            await until(lambda: "b1 live" in panel(), 20, "the broadcast to go live")
            assert f"session {sid}" in panel() and "1 running of 2" in panel()
            await press(app, "B")
            await until(lambda: isinstance(app.screen, ConfirmScreen), 5, "the confirm modal")
            await press(app, "y")
            await until(lambda: "b1 stopped" in panel(), 20, "the broadcast to stop")
            status, body = await server.admin("GET", "/admin/broadcast")
            assert status == 200 and [b["state"] for b in body["broadcasts"]] == ["stopped"], body
            assert (server.hls_dir / "console.m3u8").is_file() and "broadcast_ended" in log_text(app)

            # 4. end the session: a confirm modal, then it is gone on the server and from the table
            await press(app, "e")
            await until(lambda: isinstance(app.screen, ConfirmScreen), 5, "the confirm modal")
            await press(app, "y")
            await until(lambda: sid not in table.rows, 10, "the row to go")
            status, body = await server.admin("GET", "/admin/sessions")
            assert status == 200 and body["sessions"] == []
            assert f"ended session {sid}" in log_text(app) and "session_closed" in log_text(app)
            assert app.link.state == "connected" and app.is_running
    finally:
        await peer.close()


async def test_server_down_at_start_comes_up_then_is_killed_and_returns(backend, tmp_path):
    srv = Server(backend, free_port(), tmp_path)
    app = ConsoleApp(AdminClient(srv.url, TOKEN), poll_s=0.2, retry_s=0.3, tz=timezone.utc)
    status = lambda: text_of(app.query_one("#status", Static))  # noqa: E731
    async with app.run_test(size=(120, 30)):
        # down at start
        await until(lambda: app.link.state == "disconnected", 5, "the disconnected state")
        assert "disconnected — retrying" in status() and "connection refused" in status()
        # it comes up: connected, events flowing
        await srv.start()
        await until(lambda: app.link.state == "connected" and app.link.events == "live", 10, "the connection")
        assert "connected" in status() and "0/2 sessions" in status()
        # killed mid-run (the aiohttp runner stopped): the console says so and keeps going
        await srv.stop()
        await until(lambda: app.link.state == "disconnected", 10, "the loss to be noticed")
        assert "disconnected — retrying" in status() and app.is_running
        assert "server_shutdown" in log_text(app)
        # and recovers once more
        await srv.start()
        await until(lambda: app.link.state == "connected" and app.link.events == "live", 10, "the reconnection")
        assert "reconnected to the server" in log_text(app)
    await srv.stop()


async def test_a_bad_token_is_reported_and_the_console_keeps_running(server):
    app = ConsoleApp(AdminClient(server.url, "not-the-token-at-all"), poll_s=0.2, retry_s=0.2, tz=timezone.utc)
    async with app.run_test(size=(120, 30)) as pilot:
        await until(lambda: app.link.state == "auth", 5, "the token to be refused")
        await asyncio.sleep(0.6)  # a few retries later, still running and still saying why
        assert "bad token: the admin token is wrong (HTTP 401)" in text_of(app.query_one("#status", Static))
        assert "bad token" in log_text(app) and app.is_running and app.link.events == "retrying"
        await pilot.press("e")  # no session: a warning, no crash
        await pilot.press("r")
        await pilot.pause(0.1)
        assert app.is_running and app.link.state == "auth"


# ---- 2. actions and errors over scripted data ----------------------------------------------------------
async def test_actions_reach_the_client_and_server_errors_are_shown():
    app = fake_app(fake_snapshot(TWO_SESSIONS, LIVE_BROADCAST))
    client: FakeAdminClient = app.client  # type: ignore[assignment]
    live, paused = (s["id"] for s in TWO_SESSIONS)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot)
        await pilot.press("p")  # the first row is live: pause it
        await until(lambda: ("pause", live) in client.calls, 5, "the pause")
        await pilot.press("down", "p")  # the second row is paused: resume it
        await until(lambda: ("resume", paused) in client.calls, 5, "the resume")
        await pilot.press("e", "n")  # end, then cancel: nothing sent
        await pilot.pause(0.1)
        assert not any(c[0] == "end_session" for c in client.calls)
        # a server error is shown (status, message), not swallowed
        client.fail["pause"] = AdminError("server", "server error: the engine failed", 500, "internal_error")
        await pilot.press("up", "p")
        await until(lambda: f"pause {live} failed: server error: the engine failed (HTTP 500)" in log_text(app),
                    5, "the error in the log")
        # broadcast the selected session: a target is asked for, then sent
        await pilot.press("b")
        await until(lambda: isinstance(app.screen, TargetScreen), 5, "the target prompt")
        await pilot.press(*"show.m3u8", "enter")
        await until(lambda: ("start_broadcast", "show.m3u8", live) in client.calls, 5, "the start")
        client.fail["start_broadcast"] = error_from_response(501, NO_BROADCAST)
        await pilot.press("b")
        await until(lambda: isinstance(app.screen, TargetScreen), 5, "the target prompt")
        assert app.screen.query_one(Input).value == "show.m3u8"  # offered again
        await pilot.press("enter")
        await until(lambda: "broadcast not available" in log_text(app), 5, "the 501 to be explained")
        # stop: the selected session's broadcast, after confirming
        await pilot.press("B")
        await until(lambda: isinstance(app.screen, ConfirmScreen), 5, "the confirm modal")
        await pilot.press("y")
        await until(lambda: ("stop_broadcast", "b1") in client.calls, 5, "the stop after confirming")
        assert app.is_running


# ---- 3. snapshots of every screen, wide and narrow -----------------------------------------------------
async def _open_picker(pilot) -> None:
    await settle(pilot)
    await pilot.press("m")
    await until(lambda: isinstance(pilot.app.screen, PickerScreen), 5, "the picker")
    await pilot.pause(0.05)


async def _open_target(pilot) -> None:
    await settle(pilot)
    await pilot.press("b")
    await until(lambda: isinstance(pilot.app.screen, TargetScreen), 5, "the target prompt")
    await pilot.press(*"rtmp://live.example.org/app/")
    await pilot.pause(0.05)


async def _open_confirm(pilot) -> None:
    await settle(pilot)
    await pilot.press("e")
    await until(lambda: isinstance(pilot.app.screen, ConfirmScreen), 5, "the confirm modal")
    await pilot.pause(0.05)


SCREENS = {
    "live": (lambda: fake_app(fake_snapshot(TWO_SESSIONS), history=40), settle),
    "broadcasting": (lambda: fake_app(fake_snapshot(TWO_SESSIONS[:1], LIVE_BROADCAST), history=8),
                     settle),
    "empty": (lambda: fake_app(fake_snapshot([]), events=[]), settle),
    "disconnected": (lambda: fake_app(AdminError("connection", "cannot connect to fake://avatarcast: connection "
                                                 "refused (is `avatarcast serve` running there?)"), events=[]), settle),
    "bad_token": (lambda: fake_app(error_from_response(401, {"error": "invalid_token",
                                                             "message": "the admin token is wrong"}), events=[]),
                  settle),
    "killed_mid_run": (lambda: fake_app(fake_snapshot(TWO_SESSIONS), AdminError(
        "connection", "cannot connect to fake://avatarcast: connection refused (is `avatarcast serve` running "
                      "there?)"), history=7), settle),
    "confirm_end": (lambda: fake_app(fake_snapshot(TWO_SESSIONS), history=7), _open_confirm),
    "emotion_picker": (lambda: fake_app(fake_snapshot(TWO_SESSIONS), history=7), _open_picker),
    "broadcast_target": (lambda: fake_app(fake_snapshot(TWO_SESSIONS), history=7), _open_target),
}


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["wide", "narrow"])
@pytest.mark.parametrize("screen", list(SCREENS))
def test_snapshots(snap_compare, screen, size):
    make_app, run_before = SCREENS[screen]
    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


# ---- 4. pure parts --------------------------------------------------------------------------------------
def test_panels_are_pure_functions_of_snapshot_data():
    live, paused = TWO_SESSIONS
    cells = session_cells(paused)
    assert str(cells["state"]) == "paused" and str(cells["emotion"]) == "neutral → sad"
    assert str(cells["peer"]) == "H264 file" and str(cells["uptime"]) == "1m 01s" and str(cells["dropped"]) == "7"
    assert dropped_frames(live) == 0 and str(session_cells(live)["latency"]) == "182 ms"
    h = update_history({}, fake_snapshot(TWO_SESSIONS)["metrics"], limit=3)
    for _ in range(4):
        h = update_history(h, fake_snapshot(TWO_SESSIONS)["metrics"], limit=3)
    assert h[live["id"]]["fps"] == [24.98] * 3 and h[live["id"]]["denoise"] == [38.4] * 3
    assert h[live["id"]]["wait"] == [352.0] * 3 and h[live["id"]]["pacing"] == [24.5] * 3  # audio wait, gateway
    assert update_history(h, fake_snapshot(TWO_SESSIONS[:1])["metrics"]).keys() == {live["id"]}  # ended: dropped
    assert real_time_factor({"latency_budget": ENGINE["latency_budget"]}) == round(61.3 / 480, 3)
    assert real_time_factor({"latency_budget": {"block_ms": 480.0}}) is None
    assert redact_url("rtmp://u:pw@live.example.org:1935/app/sk_live_SECRET") == "rtmp://live.example.org:1935/app/•••"
    choices = emotion_choices({"zed": ["calm"], "sketch": ["happy", "sad"]}, "sketch", "sad")
    assert [c[1:] for c in choices] == [("sketch", "happy"), ("sketch", "sad"), ("sketch", None),
                                        ("zed", "calm"), ("zed", None)]
    assert choices[1][0].endswith("●")
    panel = Console(width=60, record=True, file=open("/dev/null", "w"))
    panel.print(workers_panel(WORKERS, ENGINE_STATS))
    shown = panel.export_text()
    assert "1 ready of 2" in shown and "w1 ready · 2 sessions · restarts 1" in shown
    assert "pid 4242 on gpu-a · 49.6 fps · block 61 ms" in shown and "w2 starting · 0 sessions · restarts 3" in shown
    assert "pid – on gpu-b" in shown and "killed by SIGKILL" not in shown  # a ready worker's old error is history
    panel.print(workers_panel({"available": False, "message": "no such route", "status": 404}))
    assert "workers not reported" in panel.export_text()
    bars = Console(width=20, record=True, file=open("/dev/null", "w"))
    bars.print(Sparkline([0, 1, 2, 4, 8]), width=8)
    assert Sparkline([24.9, 25.0, 12.5]).bars(3) == "██▁" and Sparkline([24.9, 25.0]).bars(8) == "██"
    assert bars.export_text().rstrip("\n") == "   ▁▂▃▅█"  # 0, 1/8, 2/8, 4/8, 8/8 of 7 steps, rounded


def test_client_errors_and_events_are_parsed():
    cases = {(401, "missing_token"): ("auth", "no admin token was sent"), (401, "invalid_token"): ("auth", "bad token"),
             (403, "forbidden"): ("forbidden", "forbidden"), (501, "not_available"): ("not_available", "nope"),
             (503, "at_capacity"): ("server", "server error"), (404, "unknown_session"): ("request", "nope")}
    for (status, code), (kind, words) in cases.items():
        err = error_from_response(status, {"error": code, "message": "nope"})
        assert err.kind == kind and words in str(err) and f"HTTP {status}" in str(err), (status, str(err))
    assert error_from_response(502, None, "Bad Gateway").message == "server error: Bad Gateway"
    assert parse_sse(["id: 3", "event: stats", 'data: {"id":3,"type":"stats"}']) == {"id": 3, "type": "stats"}
    assert parse_sse([": keep-alive"]) is None and parse_sse(["data: {not json"]) is None


def test_the_console_never_imports_the_engine():
    code = ("import sys, app.cli, app.console.app, app.console.client, app.console.panels; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'avatar', 'models', 'torch', 'aiortc'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_cli_command(monkeypatch):
    from app.cli import app as cli

    runner = CliRunner()
    res = runner.invoke(cli, ["console", "--help"])
    assert res.exit_code == 0 and "--url" in res.output and "--token" in res.output
    monkeypatch.delenv("AVATARCAST_ADMIN_TOKEN", raising=False)
    res = runner.invoke(cli, ["console"])
    assert res.exit_code != 0 and "admin token" in str(res.exception)
    started = []
    monkeypatch.setattr("app.console.app.run_console", lambda url, token, poll_s: started.append((url, token)))
    monkeypatch.setenv("AVATARCAST_ADMIN_TOKEN", TOKEN)
    res = runner.invoke(cli, ["console", "--url", "http://10.0.0.2:9000"])
    assert res.exit_code == 0, res.output
    assert started == [("http://10.0.0.2:9000", TOKEN)]


# ---- 5. the contract: fake answers and real answers through one schema -----------------------------------
@functools.cache
def _adapter(shape) -> TypeAdapter:
    return TypeAdapter(shape)


def conforms(shape, payload) -> None:
    """Raises ValidationError naming the field unless `payload` has `shape` (strict types; a closed shape
    admits no other key)."""
    _adapter(shape).validate_python(payload, strict=True)


def conforms_event(event: dict) -> None:
    conforms(schema.EVENTS.get(event["type"], schema.Event), event)


async def test_the_fake_client_answers_in_the_servers_schema():
    for snap in (fake_snapshot(TWO_SESSIONS, LIVE_BROADCAST), fake_snapshot([])):
        conforms(ConsoleSnapshot, snap)
    for event in EVENTS:
        conforms_event(event)
    client = FakeAdminClient([fake_snapshot(TWO_SESSIONS, LIVE_BROADCAST)])
    live = TWO_SESSIONS[0]["id"]
    conforms(ConsoleSnapshot, await client.snapshot())
    conforms(schema.AvatarCatalog, await client.avatars())
    conforms(schema.ConditionsAnswer, await client.set_conditions(live, "sketch", "sad"))
    conforms(schema.PauseAnswer, await client.pause(live))
    conforms(schema.PauseAnswer, await client.resume(live))
    started = await client.start_broadcast("show.m3u8", live)
    conforms(schema.BroadcastReport, started)
    for bid in (started["id"], "b1"):  # one it started, one from the scripted snapshot
        conforms(schema.BroadcastReport, await client.stop_broadcast(bid))
    conforms(schema.SessionEnded, await client.end_session(live))
    # the check bites: a field the server never sends, or one it always sends missing, is refused
    for wrong in ({**ENGINE, "path": "/models/demo"}, {k: v for k, v in ENGINE.items() if k != "checkpoint"}):
        with pytest.raises(ValidationError):
            conforms(schema.EngineInfo, wrong)
    with pytest.raises(ValidationError, match="video.fps"):
        conforms(schema.SessionReport, {**TWO_SESSIONS[0], "video": {"sent": 1, "fps": "25", "skipped": 0}})


async def test_the_real_server_answers_in_the_same_schema(server):
    client = AdminClient(server.url, TOKEN)
    events: list[dict] = []

    async def follow() -> None:
        async for event in client.events():
            events.append(event)

    follower = asyncio.ensure_future(follow())
    await until(lambda: events and events[0]["type"] == "hello", 5, "the hello event")
    peer, sid = await start_call(server.url)
    try:
        async def report() -> dict:
            return next(s for s in (await client.snapshot())["metrics"]["sessions"] if s["id"] == sid)

        for _ in range(200):  # until frames flow, so every number of the call is in
            s = await report()
            if s["video"]["sent"] > 10 and s["mic"] and s["latency_ms"]["p50"] is not None:
                break
            await asyncio.sleep(0.1)
        conforms(ConsoleSnapshot, await client.snapshot())
        conforms(schema.AvatarCatalog, await client.avatars())
        conforms(schema.ConditionsAnswer, await client.set_conditions(sid, "sketch", "happy"))
        async with aiohttp.ClientSession() as page:  # the page's own routes answer in the same shapes
            async with page.post(f"{server.url}/sessions/{sid}/conditions", json={"emotion": "sad"}) as r:
                conforms(schema.ConditionsAnswer, await r.json())
            async with page.get(f"{server.url}/sessions/{sid}") as r:
                conforms(schema.SessionReport, await r.json())
        conforms(schema.PauseAnswer, await client.pause(sid))
        conforms(schema.PauseAnswer, await client.resume(sid))
        started = await client.start_broadcast("contract.m3u8", sid)
        conforms(schema.BroadcastReport, started)
        await until(lambda: any(e["type"] == "broadcast_state" for e in events), 20, "the broadcast to start")
        snap = await client.snapshot()
        conforms(ConsoleSnapshot, snap)
        assert snap["broadcast"]["broadcasts"] and snap["engine"]["checkpoint"] is None  # random weights
        conforms(schema.BroadcastReport, await client.stop_broadcast(started["id"]))
        conforms(schema.SessionEnded, await client.end_session(sid))
        seen = lambda: {e["type"] for e in events}  # noqa: E731
        await until(lambda: {"session_closed", "stats", "broadcast_ended"} <= seen(), 10, "the last events")
        for event in events:
            conforms_event(event)
        assert {e["type"] for e in EVENTS} <= seen()  # every kind of event the fake plays, checked live
    finally:
        follower.cancel()
        await client.close()
        await peer.close()
