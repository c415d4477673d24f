"""What a server broadcast may read (streaming/source_policy.py): local files only inside the media
folder, URLs only when enabled and never to loopback, link-local or private addresses unless allowed,
errors that tell nothing about what exists, and an engine session closed on every failure path.

Names resolve through stubs and every server here listens on 127.0.0.x: no test sends a packet
anywhere else. A refused URL is shown never to be connected to by a listener that counts connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streaming.broadcast_sources import AudioDriver, probe_audio
from streaming.broadcasts import BroadcastManager
from streaming.source_policy import (
    FETCH_FAILED,
    HOST_REFUSED,
    NO_FILE,
    NO_MEDIA_DIR,
    NOT_AUDIO,
    URLS_OFF,
    AudioSourceError,
    SourcePolicy,
    is_public_address,
)
from streaming.webrtc.peer import LiveError
from streaming.webrtc.service import LiveService

pytestmark = pytest.mark.timeout(60)
WAV = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "speech_en_us_male.wav"


def _clip(path: Path, seconds: float = 0.2, rate: int = 16_000) -> Path:
    sf.write(path, (0.1 * np.sin(np.arange(int(seconds * rate)) / 7)).astype(np.float32), rate)
    return path


@pytest.fixture
def media(tmp_path) -> Path:
    folder = tmp_path / "media"
    (folder / "talks").mkdir(parents=True)
    _clip(folder / "talks" / "hello.wav")
    (folder / "notes.wav").write_bytes(b"not audio at all " * 64)
    _clip(tmp_path / "outside.wav")
    (folder / "escape.wav").symlink_to(tmp_path / "outside.wav")
    (folder / "inside_link.wav").symlink_to(folder / "talks" / "hello.wav")
    os.mkfifo(folder / "pipe.wav")
    return folder


class Counting(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.x that counts the connections it accepts; `routes` maps a path to
    (status, headers, body) and records each request's Host header."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", routes: dict | None = None) -> None:
        self.connections, self.hosts, self.routes = 0, [], routes or {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hosts.append(self.headers.get("Host"))
                status, headers, body = server.routes.get(self.path, (404, {}, b"missing"))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__((host, 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return True

    @property
    def port(self) -> int:
        return self.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def stub_resolver(table: dict[str, list[str]]):
    """Names resolve only through `table`; anything else fails as an unknown name would."""
    def resolve(host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if host not in table:
            raise OSError(f"unknown name {host}")
        return table[host]
    return resolve


def refused(policy: SourcePolicy, source: str) -> str:
    with pytest.raises(AudioSourceError) as err:
        probe_audio(source, policy)
    return err.value.reason


# ---- local files ---------------------------------------------------------------------------------------------
def test_local_files_are_read_only_inside_the_media_folder_and_refusals_look_alike(media, tmp_path):
    policy = SourcePolicy(media_dir=media)
    assert probe_audio("talks/hello.wav", policy).sample_rate == 16_000  # relative to the folder
    assert probe_audio(str(media / "talks" / "hello.wav"), policy).sample_rate == 16_000  # absolute, inside
    assert probe_audio("inside_link.wav", policy).sample_rate == 16_000  # a link that stays inside
    outside = ["/etc/passwd", "/etc/hostname", str(tmp_path / "outside.wav"), "../outside.wav",
               "talks/../../outside.wav", "escape.wav", "/proc/self/environ", "/dev/zero"]
    missing = ["nothing.wav", "talks/nothing.wav", str(media / "gone.wav"), "/etc/no-such-file"]
    not_files = ["talks", ".", str(media), "pipe.wav"]
    reasons = {source: refused(policy, source) for source in outside + missing + not_files}
    assert set(reasons.values()) == {NO_FILE}, reasons  # one answer: nothing tells what exists
    # a file inside that is not audio: said so, without FFmpeg's words
    assert refused(policy, "notes.wav") == NOT_AUDIO
    # no media folder: no local file at all
    assert refused(SourcePolicy(), str(media / "talks" / "hello.wav")) == NO_MEDIA_DIR
    for bad in ("", "   ", "a\nb.wav", "x\x00.wav"):
        with pytest.raises(AudioSourceError):
            probe_audio(bad, policy)


def test_a_fifo_or_device_swapped_in_after_the_check_is_refused_without_blocking(media):
    policy = SourcePolicy(media_dir=media)
    checked = policy.check("talks/hello.wav")
    (media / "talks" / "hello.wav").unlink()
    os.mkfifo(media / "talks" / "hello.wav")  # nobody ever writes to it: opening it for reading would block
    t0 = time.monotonic()
    with pytest.raises(AudioSourceError, match=NO_FILE):
        probe_audio(checked, policy)
    assert time.monotonic() - t0 < 2


def test_the_command_line_keeps_reading_the_users_own_files(tmp_path):
    assert probe_audio(str(_clip(tmp_path / "mine.wav"))).sample_rate == 16_000  # TRUSTED: anywhere
    with pytest.raises(AudioSourceError, match="no such file"):
        probe_audio(str(tmp_path / "missing.wav"))


# ---- URLs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "10.0.0.7", "172.16.5.4", "192.168.1.1",
                                     "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "fe80::1",
                                     "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::"])
def test_non_public_addresses_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


def test_public_addresses_are_public():
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert is_public_address(ipaddress.ip_address(address)), address


def test_refused_urls_are_never_connected_to():
    resolve = stub_resolver({"sneaky.example": ["127.0.0.1"], "mixed.example": ["93.184.216.34", "127.0.0.1"],
                             "metadata.example": ["169.254.169.254"]})
    with Counting() as listener:
        port = listener.port
        urls = [f"http://127.0.0.1:{port}/a.wav", f"http://sneaky.example:{port}/a.wav",
                f"http://mixed.example:{port}/a.wav", f"http://[::ffff:127.0.0.1]:{port}/a.wav",
                f"http://2130706433:{port}/a.wav", f"http://localhost:{port}/a.wav", "http://metadata.example/a.wav",
                f"http://nowhere.example:{port}/a.wav", f"https://127.0.0.1:{port}/a.wav"]
        off = SourcePolicy(resolve=resolve)  # URLs not enabled at all
        public = SourcePolicy(urls="public", resolve=resolve)
        assert {refused(off, u) for u in urls} == {URLS_OFF}
        assert {refused(public, u) for u in urls} == {HOST_REFUSED}  # unknown and forbidden look alike
        for bad in ("ftp://127.0.0.1/a.wav", "file:///etc/passwd", f"gopher://127.0.0.1:{port}/"):
            with pytest.raises(AudioSourceError, match="unsupported URL scheme"):
                probe_audio(bad, public)
        time.sleep(0.2)
        assert listener.connections == 0


def test_a_url_is_fetched_from_the_checked_address_and_redirects_are_checked_before_they_are_followed():
    """127.0.0.1 stands in for a public address and 127.0.0.2 for a private one (both are loopback)."""
    body = WAV.read_bytes()
    loopback_one = SourcePolicy(urls="public", is_public=lambda ip: str(ip) == "127.0.0.1",
                                resolve=stub_resolver({"audio.example": ["127.0.0.1"],
                                                       "inner.example": ["127.0.0.2"]}))
    with Counting("127.0.0.2", {"/secret.wav": (200, {}, body)}) as private, Counting() as public:
        public.routes.update({
            "/talk.wav": (200, {"Content-Type": "audio/wav"}, body),
            "/to-private": (302, {"Location": f"http://127.0.0.2:{private.port}/secret.wav"}, b""),
            "/to-private-name": (301, {"Location": f"http://inner.example:{private.port}/secret.wav"}, b""),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/to-self": (307, {"Location": "/talk.wav"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/not-audio": (200, {}, b"<html>hello</html>" * 50),
        })
        base = f"http://audio.example:{public.port}"
        # the name is resolved by the stub only: the system resolver does not know audio.example, so
        # this works only because the checked address is the one connected to
        assert probe_audio(f"{base}/talk.wav", loopback_one).sample_rate == 16_000
        assert public.hosts[-1] == f"audio.example:{public.port}"
        assert probe_audio(f"{base}/to-self", loopback_one).sample_rate == 16_000  # a redirect that is allowed
        for path in ("/to-private", "/to-private-name", "/to-file"):
            assert refused(loopback_one, base + path) == HOST_REFUSED, path
        assert refused(loopback_one, f"{base}/loop") == FETCH_FAILED
        assert refused(loopback_one, f"{base}/missing.wav") == FETCH_FAILED  # HTTP 404: no status, no body
        assert refused(loopback_one, f"{base}/not-audio") == NOT_AUDIO
        time.sleep(0.2)
        assert private.connections == 0 and public.connections >= 7


def test_all_allows_private_addresses_and_network_errors_stay_vague():
    everything = SourcePolicy(urls="all")
    with Counting(routes={"/talk.wav": (200, {}, WAV.read_bytes())}) as server:
        assert probe_audio(f"http://127.0.0.1:{server.port}/talk.wav", everything).sample_rate == 16_000
    closed_port = server.port  # closed now: connection refused, said as "cannot be fetched"
    assert refused(everything, f"http://127.0.0.1:{closed_port}/talk.wav") == FETCH_FAILED


def test_settings_name_the_media_folder_and_the_url_rule(tmp_path):
    from app.settings import Settings

    s = Settings.from_env({"AVATARCAST_MEDIA_DIR": str(tmp_path), "AVATARCAST_AUDIO_URLS": "public"})
    assert (s.media_dir, s.audio_urls) == (str(tmp_path), "public")
    assert Settings().media_dir is None and Settings().audio_urls == "off"
    with pytest.raises(ValueError, match="audio_urls"):
        Settings(audio_urls="yes")


# ---- the engine session is closed on every failure path -------------------------------------------------------
class FakeSession:
    def __init__(self) -> None:
        self.closed = False

    def push_audio(self, pcm, sample_rate, speaker=0, channels=1, layout="interleaved") -> None:
        if self.closed:
            raise RuntimeError("closed")

    def end_segment(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class VanishingBackend:
    """Opening a session deletes the audio file: it vanishes between the probe and the driver."""

    default_avatar = "sketch"

    def __init__(self, victim: Path) -> None:
        self.victim, self.sessions = victim, []

    def catalog(self) -> dict[str, list[str]]:
        return {"sketch": ["neutral"]}

    def open(self, avatar, emotion):
        self.victim.unlink()
        self.sessions.append(FakeSession())
        return self.sessions[-1]


async def test_a_file_that_vanishes_after_the_probe_is_a_400_and_frees_the_session(media, tmp_path):
    backend = VanishingBackend(media / "talks" / "hello.wav")
    manager = BroadcastManager(LiveService(backend), tmp_path / "hls", sources=SourcePolicy(media_dir=media))
    with pytest.raises(LiveError) as err:
        await manager.start({"audio": "talks/hello.wav", "to": "show/"})
    assert (err.value.status, err.value.code) == (400, "bad_audio") and NO_FILE in err.value.message
    assert len(backend.sessions) == 1 and backend.sessions[0].closed
    assert manager.entries == {}


async def test_a_file_that_vanishes_while_looping_fails_the_broadcast_and_frees_the_session(media, tmp_path,
                                                                                           backend):
    clip = _clip(media / "loop.wav", seconds=0.3)
    manager = BroadcastManager(LiveService(backend), tmp_path / "hls", sources=SourcePolicy(media_dir=media))
    engine = backend.engine
    before = set(engine.snapshot()["sessions"])
    started = await manager.start({"audio": "loop.wav", "to": "show/", "loop": True})
    entry = manager.get(started["id"])
    await asyncio.sleep(0.2)
    clip.unlink()  # the next play cannot open it
    await asyncio.wait_for(asyncio.shield(entry.task), 20)
    snap = entry.snapshot()
    assert snap["state"] == "failed" and NO_FILE in snap["last_error"], snap
    assert entry.session.closed
    for _ in range(100):  # the engine's worker drops closed sessions on its next pass
        if set(engine.snapshot()["sessions"]) == before:
            break
        await asyncio.sleep(0.05)
    assert set(engine.snapshot()["sessions"]) == before


def test_the_driver_takes_what_the_probe_checked(media):
    policy = SourcePolicy(media_dir=media)
    driver = AudioDriver(FakeSession(), "talks/hello.wav", policy=policy)
    assert driver.source.location == str((media / "talks" / "hello.wav").resolve())
    with pytest.raises(AudioSourceError, match=NO_FILE):
        AudioDriver(FakeSession(), "../outside.wav", policy=policy)


def test_a_url_that_stalls_mid_body_fails_within_the_timeout():
    """Headers, the first bytes of a WAV, then nothing: the read times out, said as "cannot be fetched"."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        head = WAV.read_bytes()[:2000]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + head)
        stop.wait(10)  # stall: never send the rest
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    policy = SourcePolicy(urls="all", timeout_s=0.5)
    t0 = time.monotonic()
    try:
        reason = None
        try:
            source = policy.check(f"http://127.0.0.1:{port}/talk.wav")
            from streaming.broadcast_sources import decode_audio

            for _ in decode_audio(source, policy):
                pass
        except AudioSourceError as err:
            reason = err.reason
    finally:
        stop.set()
        listener.close()
    assert reason == FETCH_FAILED and time.monotonic() - t0 < 5
