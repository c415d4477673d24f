"""Abuse limits of `avatarcast serve` over the real engine (random TINY models), loopback only: calls and
offers per remote address (429 + Retry-After; offers that never finish ICE free their slot at the connect
timeout), a maximum call length, avatar/emotion changes per call, SDP size and count bounds checked
before parsing, and a bearer token that is not UTF-8."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from app.server import SERVICE, create_app
from app.settings import Settings
from streaming.webrtc.peer import MAX_CANDIDATES, MAX_MEDIA_LINES, MAX_SDP_CHARS
from streaming.webrtc.testing import LoopbackClient

from helpers import until

pytestmark = pytest.mark.timeout(120)
TOKEN = "test-admin-token-0123456789"


def limited(**changes) -> Settings:
    return Settings(admin_token=TOKEN, max_sessions=2, idle_timeout_s=10, connect_timeout_s=10).with_(**changes)


async def expect_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"] == code and body["message"], body
    return body


async def post_offer(client: TestClient, peer: LoopbackClient, **fields):
    return await client.post("/offer", json={"sdp": await peer.offer(), "type": "offer", **fields})


async def test_calls_per_client_and_an_offer_that_never_connects_frees_its_slot(backend):
    async with TestClient(TestServer(create_app(limited(calls_per_client=1, connect_timeout_s=1.0), backend))) as c:
        service = c.server.app[SERVICE]
        silent, second, third = LoopbackClient(), LoopbackClient(), LoopbackClient()
        try:
            first = await post_offer(c, silent)  # never applies the answer: ICE never starts
            assert first.status == 200, await first.text()
            refused = await post_offer(c, second)
            await expect_error(refused, 429, "too_many_calls")
            assert int(refused.headers["Retry-After"]) >= 1
            await until(lambda: not service.peers, 10, "the connect timeout to free the slot")
            assert service.ended[(await first.json())["session_id"]]["reason"] == "connect_timeout"
            again = await post_offer(c, third)
            assert again.status == 200, await again.text()
        finally:
            for p in (silent, second, third):
                await p.close()


async def test_offers_per_minute_are_limited_per_client(backend):
    async with TestClient(TestServer(create_app(limited(offers_per_minute=3), backend))) as c:
        for _ in range(3):  # refused offers count: a client cannot spin on bad ones
            await expect_error(await c.post("/offer", json={"sdp": "v=0 garbage", "type": "offer"}), 400, "bad_sdp")
        refused = await c.post("/offer", json={"sdp": "v=0 garbage", "type": "offer"})
        await expect_error(refused, 429, "too_many_offers")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_a_call_ends_at_its_maximum_length_and_changes_are_rate_limited(backend):
    settings = limited(max_call_s=2.5, conditions_per_minute=2)
    async with TestClient(TestServer(create_app(settings, backend))) as c:
        service = c.server.app[SERVICE]
        peer = LoopbackClient(keep_video=False)
        try:
            resp = await post_offer(c, peer)
            answer = await resp.json()
            await peer.accept(answer)
            sid = answer["session_id"]
            await until(lambda: service.peers[sid].state == "connected", 10, "the call to connect")
            route = f"/sessions/{sid}/conditions"
            for emotion in ("happy", None):
                assert (await c.post(route, json={"emotion": emotion})).status in (200, 202)
            refused = await c.post(route, json={"emotion": "sad"})
            await expect_error(refused, 429, "too_many_changes")
            assert int(refused.headers["Retry-After"]) >= 1
            await until(lambda: sid not in service.peers, 10, "the call to reach its maximum length")
            assert service.ended[sid]["reason"] == "max_duration"
        finally:
            await peer.close()


def _offer_with(sdp: str, *, candidates: int = 0, media: int = 0) -> str:
    """A real offer plus `candidates` extra candidate lines in its first m-section and `media` extra m-lines."""
    head, sep, rest = sdp.partition("\r\nm=")
    lines = "".join(f"a=candidate:{i} 1 udp 2130706431 127.0.0.1 {10000 + i} typ host\r\n" for i in range(candidates))
    first, sep2, tail = rest.partition("\r\n")
    extra = "".join(f"m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=mid:x{i}\r\n" for i in range(media))
    return head + sep + first + sep2 + lines + tail + extra


async def test_sdp_bounds_are_checked_before_parsing(backend):
    async with TestClient(TestServer(create_app(limited(max_body_bytes=1024 * 1024), backend))) as c:
        service = c.server.app[SERVICE]
        peer = LoopbackClient()
        try:
            sdp = await peer.offer()
            many = _offer_with(sdp, candidates=4000)
            assert len(many) > MAX_SDP_CHARS
            await expect_error(await c.post("/offer", json={"sdp": many, "type": "offer"}), 413, "sdp_too_large")
            cands = _offer_with(sdp, candidates=MAX_CANDIDATES + 1)
            await expect_error(await c.post("/offer", json={"sdp": cands, "type": "offer"}), 400,
                               "too_many_candidates")
            media = _offer_with(sdp, media=MAX_MEDIA_LINES)
            await expect_error(await c.post("/offer", json={"sdp": media, "type": "offer"}), 400, "too_many_media")
            assert not service.peers
        finally:
            await peer.close()


async def test_a_bearer_token_that_is_not_utf8_is_401(backend):
    async with TestClient(TestServer(create_app(limited(), backend))) as c:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
        writer.write(b"GET /admin/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        assert b"invalid_token" in answer


async def test_admin_metrics_under_session_churn_never_fails(backend, engine):
    """The engine's worker thread deletes closed sessions while /admin/metrics reads them on the loop."""
    async with TestClient(TestServer(create_app(limited(), backend))) as c:
        statuses = []
        for _ in range(150):
            sessions = [backend.open(backend.default_avatar, None) for _ in range(2)]
            resp = await c.get("/admin/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            statuses.append(resp.status)
            for s in sessions:
                s.close()
            await asyncio.sleep(0)
        assert set(statuses) == {200}
        await until(lambda: not engine.sessions, 10, "the closed sessions to be dropped")


def test_limit_and_ice_host_settings_from_env():
    env = {"AVATARCAST_CALLS_PER_CLIENT": "3", "AVATARCAST_OFFERS_PER_MINUTE": "30", "AVATARCAST_MAX_CALL_S": "60",
           "AVATARCAST_CONDITIONS_PER_MINUTE": "5"}
    s = Settings.from_env(env)
    assert (s.calls_per_client, s.offers_per_minute, s.max_call_s, s.conditions_per_minute) == (3, 30, 60.0, 5)
    assert Settings().candidate_hosts() == ("127.0.0.1",)  # bound to loopback: offers it
    assert Settings(host="::1").candidate_hosts() == ("::1",) and Settings(host="localhost").candidate_hosts() == (
        "127.0.0.1",)
    assert Settings(host="0.0.0.0").candidate_hosts() == ()  # the LAN: aioice's own addresses
    assert Settings.from_env({"AVATARCAST_ICE_HOSTS": ""}).candidate_hosts() == ()  # told: none
    assert Settings.from_env({"AVATARCAST_HOST": "0.0.0.0", "AVATARCAST_ICE_HOSTS": "127.0.0.1, ::1"}).candidate_hosts() \
        == ("127.0.0.1", "::1")
    for bad, words in [({"AVATARCAST_ICE_HOSTS": "example.org"}, "IP addresses"),
                       ({"AVATARCAST_CALLS_PER_CLIENT": "0"}, "at least 1"),
                       ({"AVATARCAST_MAX_CALL_S": "-1"}, "max_call_s")]:
        with pytest.raises(ValueError, match=words):
            Settings.from_env(bad)
