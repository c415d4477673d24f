"""The in-process engine (`serve --workers 0`) under supervision: when its worker or decode thread dies,
every call ends with the reason (the SessionError a dead worker process gives its calls; the call's
reopen is refused, so it ends as engine_error) and /healthz answers 503 with the engine dead."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from app.avatars import EngineBackend, prepare_avatars
from app.server import SERVICE, create_app
from app.settings import Settings
from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
from streaming.webrtc.testing import LoopbackClient

from helpers import until

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("thread, method", [("worker", "_batch"), ("decode", "_finish")])
async def test_a_dead_engine_thread_ends_the_calls_and_fails_the_health_check(thread, method, monkeypatch):
    engine = AvatarEngine(ModelBundle.random("tiny", "tiny"), EngineOptions(max_sessions=2, decoder="torch"))
    if thread == "decode":
        assert engine.options.decode_ahead > 0, "the live defaults decode on their own thread"
    engine.start()
    try:
        avatars, default = prepare_avatars(engine)
        settings = Settings(admin_token="test-admin-token-0123456789", max_sessions=2, connect_timeout_s=10)
        async with TestClient(TestServer(create_app(settings, EngineBackend(engine, avatars, default)))) as c:
            service = c.server.app[SERVICE]
            client = LoopbackClient(keep_video=False)
            try:
                answer = await (await c.post("/offer", json={"sdp": await client.offer(), "type": "offer"})).json()
                await client.accept(answer)
                sid = answer["session_id"]
                await until(lambda: service.peers[sid].video.sent > 10, 20, "frames of the call")

                def broken(*args, **kwargs):
                    raise RuntimeError("injected fault")

                monkeypatch.setattr(engine, method, broken)  # the next block kills that thread
                await until(lambda: sid not in service.peers, 20, "the call to end")
                end = service.ended[sid]
                assert end["reason"] == "engine_error", end
                assert f"the engine's {thread} thread stopped (RuntimeError: injected fault)" in end["error"], end
                assert not engine.running
                health = await c.get("/healthz")
                body = await health.json()
                assert health.status == 503 and body["status"] == "down", body
                assert body["workers"][0]["state"] == "dead"
                late = LoopbackClient()
                refused = await c.post("/offer", json={"sdp": await late.offer(), "type": "offer"})
                await late.close()
                assert refused.status == 503 and "thread stopped" in (await refused.json())["message"]
            finally:
                await client.close()
    finally:
        engine.stop()
