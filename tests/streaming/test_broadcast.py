"""The livestream: targets, real-time pacing and continuous audio, reconnect with backoff (fake sinks),
then real outputs read back with PyAV: RTMP into a local nginx (Debian's libnginx-mod-rtmp, recording
what it receives, on 127.0.0.1 only), HLS playlists, a server restart mid-stream, the admin API of the
in-process server, and `avatarcast broadcast`.

Without nginx or its rtmp module the RTMP tests skip with the reason, unless AVATARCAST_REQUIRE_RTMP=1
(CI installs both), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from aiohttp.test_utils import TestClient, TestServer
from helpers import until

from app.server import create_app
from app.settings import Settings
from audio.resample import PcmFormat, resample_audio
from avatar.types import AvatarFrame, SegmentEnd, frame_sample_bounds
from benchmarks.nginx_rtmp import NginxRtmp, RtmpUnavailable, find_nginx
from streaming.broadcast import (
    Broadcaster,
    BroadcastOptions,
    Target,
    open_sink,
    parse_target,
)
from streaming.broadcast_sources import (
    AudioDriver,
    AudioSourceError,
    broadcast_audio,
    probe_audio,
)
from streaming.filesink import probe_media
from streaming.webrtc.testing import LoopbackClient

pytestmark = pytest.mark.timeout(120)
FPS, RATE = 25, 48_000
WAV = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "speech_en_us_male.wav"
REQUIRE_RTMP = os.environ.get("AVATARCAST_REQUIRE_RTMP") == "1"
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---- helpers -----------------------------------------------------------------------------------------------
def frame(i: int, hw=(31, 33)) -> AvatarFrame:
    """Odd-sized (the sink pads to even), a 440 Hz tone continuing across frames."""
    a, b = frame_sample_bounds(i, RATE, FPS)
    video = np.full((*hw, 3), (i * 9) % 256, np.uint8)
    video[: hw[0] // 2, :, 1] = 200
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(a, b) / RATE)
    return AvatarFrame(video=video, audio=tone.astype(np.float32), sample_rate=RATE, pts=i, fps=FPS)


async def frames(n: int | None = None, *, paced: bool = False, gap_after: int | None = None, gap_s: float = 0.0):
    """n frames (None: endless) as fast as they are taken, or `paced` like a live source (frame i at
    i / fps), which stalls for `gap_s` before frame `gap_after`."""
    i, t0, gap = 0, time.monotonic(), 0.0
    while n is None or i < n:
        if i == gap_after:
            gap = gap_s
        if paced:
            await asyncio.sleep(max(0.0, t0 + gap + i / FPS - time.monotonic()))
        yield frame(i)
        if i % 5 == 4:
            yield SegmentEnd(segment=0, pts=i)  # ignored by the broadcaster
        i += 1


class FakeSink:
    """Records what would be encoded; `fail_at`: raise a broken pipe at that write (a lost link)."""

    def __init__(self, fail_at: int | None = None, refuse: bool = False, stall_at: int | None = None,
                 stall_s: float = 0.0) -> None:
        self.fail_at, self.refuse, self.stall_at, self.stall_s = fail_at, refuse, stall_at, stall_s
        self.writes: list[tuple[float, AvatarFrame]] = []
        self.frames_written = self.bytes_written = 0
        self.closed = self.aborted = False

    def write(self, f: AvatarFrame) -> None:
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            raise BrokenPipeError(32, "Broken pipe")
        if self.stall_at is not None and len(self.writes) == self.stall_at:
            time.sleep(self.stall_s)  # a write that hangs (a server that stopped reading)
        self.writes.append((time.monotonic(), f))
        self.frames_written += 1
        self.bytes_written += 1000

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def read_back(path: Path | str) -> dict:
    info = probe_media(path)
    info["audio_s"] = info["audio"].size / info["audio_rate"] if info.get("audio_rate") else 0.0
    return info


def reference_audio(seconds: float) -> np.ndarray:
    pcm, rate = sf.read(WAV, dtype="float32")
    return resample_audio(pcm, PcmFormat(rate), out_rate=RATE)[: int(seconds * RATE)]


def best_correlation(decoded: np.ndarray, expected: np.ndarray, max_lag: int = 4096) -> tuple[int, float]:
    """(lag, correlation) of `decoded` against `expected` from 0.25 s on; `decoded` may start late by
    up to `max_lag` samples (AAC priming, if the container does not trim it)."""
    start = RATE // 4
    n = min(expected.size, decoded.size - max_lag) - start
    seg = expected[start:start + n]
    window = decoded[start:start + n + max_lag]
    size = 1 << int(np.ceil(np.log2(window.size + n)))  # cross-correlation by FFT, lags 0..max_lag-1
    scores = np.fft.irfft(np.fft.rfft(window, size) * np.conj(np.fft.rfft(seg, size)), size)[:max_lag]
    lag = int(np.argmax(scores))
    return lag, float(np.corrcoef(decoded[start + lag:start + lag + n], seg)[0, 1])


class RecordingSink:
    """A real sink that also keeps every frame written to it (what the broadcaster sent)."""

    def __init__(self, sink) -> None:
        self.sink, self.frames = sink, []

    def write(self, f: AvatarFrame) -> None:
        self.sink.write(f)
        self.frames.append(f)

    def __getattr__(self, name):
        return getattr(self.sink, name)


# ---- a local RTMP server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtmp():
    try:
        server = NginxRtmp(find_nginx())
    except RtmpUnavailable as exc:
        if REQUIRE_RTMP:
            pytest.fail(f"AVATARCAST_REQUIRE_RTMP=1 but {exc}; CI installs them")
        pytest.skip(f"{exc}; CI installs them")
    server.start()
    try:
        yield server
    finally:
        server.remove()


# ---- targets ------------------------------------------------------------------------------------------------
def test_targets_are_parsed_with_clear_errors_and_stream_keys_masked(tmp_path):
    t = parse_target("rtmp://live.example.org:1935/app/s3cr3t-key")
    assert t == Target("rtmp", "rtmp://live.example.org:1935/app/s3cr3t-key")
    assert t.display == "rtmp://live.example.org:1935/app/***" and "s3cr3t" not in t.display
    assert parse_target("rtmps://a.example/live/k").kind == "rtmp"
    assert parse_target(str(tmp_path / "out.m3u8")) == Target("hls", str(tmp_path / "out.m3u8"))
    assert parse_target(str(tmp_path)) == Target("hls", str(tmp_path / "index.m3u8"))
    for bad, words in [("", "empty"), ("http://example.org/x", "unsupported"), ("rtmp:///live/k", "no host"),
                       ("rtmp://host/live", "application and a stream key"), ("rtmp://host:99999/a/k", "port"),
                       (str(tmp_path / "nope"), "neither")]:
        with pytest.raises(ValueError, match=words):
            parse_target(bad)
    # the server confines HLS to its directory
    assert parse_target("show/", hls_root=tmp_path) == Target("hls", str(tmp_path / "show" / "index.m3u8"))
    with pytest.raises(ValueError, match="inside"):
        parse_target("../escape.m3u8", hls_root=tmp_path)
    with pytest.raises(ValueError, match="inside"):
        parse_target("/etc/x.m3u8", hls_root=tmp_path)


def test_the_broadcast_modules_do_not_import_torch():
    code = ("import sys, streaming.broadcast, streaming.broadcast_sources, streaming.broadcasts; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_audio_sources_are_checked_before_anything_starts(tmp_path):
    assert probe_audio(str(WAV)).sample_rate == 16_000
    (tmp_path / "not_audio.wav").write_bytes(b"hello, this is not audio" * 10)
    for source, words in [(str(tmp_path / "missing.wav"), "no such file"), (str(tmp_path), "not a regular file"),
                          ("ftp://example.org/a.mp3", "unsupported URL scheme"),
                          (str(tmp_path / "not_audio.wav"), "cannot read audio")]:
        with pytest.raises(AudioSourceError, match=words):
            probe_audio(source)


# ---- pacing, continuity, reconnect (fake sinks) ---------------------------------------------------------------
async def test_output_is_paced_in_real_time_with_continuous_audio_and_repeats_on_underrun():
    sink = FakeSink()
    b = Broadcaster("rtmp://127.0.0.1:1/live/k", BroadcastOptions(start_frames=1),
                    sink_factory=lambda target, options, resume: sink)
    t0 = time.monotonic()
    snap = await b.run(frames(30, paced=True, gap_after=20, gap_s=0.4))  # live pace, a 0.4 s stall at frame 20
    wall = time.monotonic() - t0
    # 1. never faster than real time: slot k leaves no earlier than k/fps after the clock's origin
    early = [k for k, (t, _) in enumerate(sink.writes) if t < b.clock.t0 + k / FPS - 0.001]
    assert not early, f"slots sent early: {early}"
    assert 1.3 < wall < 3.0, wall  # 30 frames + ~10 repeated slots = 1.6 s of output
    # 2. one continuous timeline: pts 0..n-1, each slot exactly its 1920 samples; the stall became
    #    repeated pictures with silence, and the frames after it continue the tone
    pts = [f.pts for _, f in sink.writes]
    assert pts == list(range(len(pts)))
    assert all(f.audio.size == 1920 and f.sample_rate == RATE for _, f in sink.writes)
    repeated = [f for _, f in sink.writes if f.idle]
    assert snap["repeated"] == len(repeated) and 5 <= len(repeated) <= 14, snap
    assert all(not f.audio.any() for f in repeated) and all(np.array_equal(f.video, repeated[0].video) for f in repeated)
    spoken = np.concatenate([f.audio for _, f in sink.writes if not f.idle])
    assert np.allclose(spoken, np.concatenate([frame(i).audio for i in range(30)]))
    assert snap["state"] == "stopped" and snap["end_reason"] == "source_ended" and snap["frames_sent"] == len(pts)
    assert sink.closed and snap["dropped"] == {"offline": 0, "late": 0}


async def test_reconnects_with_exponential_backoff_and_counts_everything():
    attempts: list[tuple[float, bool]] = []
    script = [FakeSink(fail_at=10), FakeSink(refuse=True), FakeSink(refuse=True), FakeSink()]

    def factory(target, options, resume):
        attempts.append((time.monotonic(), resume))
        return script[len(attempts) - 1]

    opts = BroadcastOptions(start_frames=1, retry_initial_s=0.1, retry_max_s=1.0, duration_s=2.0, stable_s=0.2)
    b = Broadcaster("rtmp://127.0.0.1:1/live/k", opts, sink_factory=factory)
    snap = await b.run(frames(None))
    assert snap["state"] == "stopped" and snap["end_reason"] == "duration"
    assert (snap["disconnects"], snap["failed_attempts"], snap["reconnects"], snap["connections"]) == (1, 2, 1, 2)
    assert [r for _, r in attempts] == [False, True, True, True]  # reopened as a continuation
    # the first reconnect is immediate; then waits of 0.1 s and 0.2 s (never shorter)
    gaps = [b_ - a_ for (a_, _), (b_, _) in zip(attempts[1:], attempts[2:])]
    assert gaps[0] >= 0.1 - 0.005 and gaps[1] >= 0.2 - 0.005, gaps
    assert snap["dropped"]["offline"] >= 7  # the slots that passed while offline (0.3 s)
    assert snap["frames_sent"] + snap["dropped"]["offline"] == 50  # every slot of the 2 s accounted for
    assert script[0].aborted and script[3].closed and "refused" in snap["last_error"]


async def test_a_stalled_write_skips_forward_instead_of_bursting():
    sink = FakeSink(stall_at=10, stall_s=0.8)
    opts = BroadcastOptions(start_frames=1, max_lag_frames=5, duration_s=2.0)
    b = Broadcaster("rtmp://127.0.0.1:1/live/k", opts, sink_factory=lambda target, options, resume: sink)
    snap = await b.run(frames(None))
    pts = [f.pts for _, f in sink.writes]
    jump = next(i for i in range(1, len(pts)) if pts[i] != pts[i - 1] + 1)
    assert pts[jump - 1] == 10 and 25 <= pts[jump] <= 35, pts  # resumed at the slot due after ~0.8 s
    assert snap["skipped_slots"] == pts[jump] - 11 and snap["dropped"]["late"] == snap["skipped_slots"], snap
    after = [t for t, _ in sink.writes[jump:jump + 10]]
    assert after[-1] - after[0] > 0.3  # no burst: the frames after the stall go out at 25 fps again
    assert snap["state"] == "stopped" and snap["disconnects"] == 0


async def test_a_write_that_hangs_past_the_timeout_counts_as_a_lost_connection():
    script = [FakeSink(stall_at=5, stall_s=1.0), FakeSink()]
    opts = BroadcastOptions(start_frames=1, write_timeout_s=0.3, duration_s=1.6, stable_s=0.1)
    b = Broadcaster("rtmp://127.0.0.1:1/live/k", opts, sink_factory=lambda target, options, resume: script.pop(0))
    snap = await b.run(frames(None))
    assert snap["disconnects"] == 1 and snap["reconnects"] == 1 and "no progress for 0.3 s" in snap["last_error"]
    assert snap["state"] == "stopped" and snap["frames_sent"] > 20, snap


async def test_an_unreachable_server_fails_after_bounded_attempts_with_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    states: list[str] = []
    opts = BroadcastOptions(start_frames=1, retry_initial_s=0.05, max_attempts=3)
    b = Broadcaster(f"rtmp://127.0.0.1:{port}/live/secret-key", opts, on_state=lambda _, st: states.append(st))
    t0 = time.monotonic()
    snap = await asyncio.wait_for(b.run(frames(None)), 20)
    assert snap["state"] == "failed" and snap["end_reason"] == "failed" and snap["failed_attempts"] == 3
    assert "gave up" in snap["last_error"] and "3 failed attempts" in snap["last_error"]
    assert "refused" in snap["last_error"].lower() and "secret-key" not in snap["last_error"], snap["last_error"]
    assert time.monotonic() - t0 >= 0.05 + 0.1 - 0.01  # backed off between the attempts
    assert states[:3] == ["starting", "connecting", "reconnecting"] and states[-1] == "failed"


class FakeSession:
    def __init__(self) -> None:
        self.pushed: list[tuple[float, int, int]] = []  # (time, samples, rate)
        self.segments = 0

    def push_audio(self, pcm, sample_rate, speaker=0, channels=1, layout="interleaved") -> None:
        samples = np.asarray(pcm).size // channels
        self.pushed.append((time.monotonic(), samples, sample_rate))

    def end_segment(self) -> None:
        self.segments += 1


async def test_the_audio_driver_pushes_at_the_wall_clock_pace_loops_and_reads_urls(tmp_path):
    from aiohttp import web

    clip = tmp_path / "clip.wav"
    sf.write(clip, (0.1 * np.sin(np.arange(4410) / 10)).astype(np.float32), 22_050)  # 0.2 s at 22.05 kHz
    # 1. a looped file: its own rate (the session resamples), never more than lead_s ahead of the clock
    session = FakeSession()
    driver = AudioDriver(session, str(clip), loop_audio=True, lead_s=0.3)
    t0 = time.monotonic()
    task = asyncio.ensure_future(driver.run())
    await asyncio.sleep(1.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    total = 0
    for t, n, rate in session.pushed:
        assert rate == 22_050
        total += n
        assert total / rate <= (t - t0) + 0.3 + 0.002, (t - t0, total / rate)  # never more than lead_s ahead
    assert 1.2 + 0.3 - 0.25 <= total / 22_050 <= 1.2 + 0.3 and driver.plays >= 5, (total, driver.plays)
    assert session.segments == driver.plays and driver.silence_s == 0
    # 2. over http, once, then silence at the same pace
    app = web.Application()
    app.router.add_static("/", tmp_path)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("/clip.wav"))
        assert (await asyncio.to_thread(probe_audio, url)).sample_rate == 22_050
        session = FakeSession()
        driver = AudioDriver(session, url, lead_s=0.2)
        task = asyncio.ensure_future(driver.run())
        await asyncio.sleep(0.8)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert driver.plays == 1 and session.segments == 1 and 0.7 <= driver.pushed_s <= 1.05, driver.pushed_s
    assert abs(driver.silence_s - (driver.pushed_s - 0.2)) < 0.01  # everything after the clip is silence


# ---- real outputs ----------------------------------------------------------------------------------------------
async def test_rtmp_broadcast_of_a_speaking_session_reads_back_as_h264_and_aac(rtmp, backend):
    session = backend.open(backend.default_avatar, None)
    sinks: list[RecordingSink] = []

    def recording(target, options, resume):
        sinks.append(RecordingSink(open_sink(target, options, resume=resume)))
        return sinks[-1]

    b = Broadcaster(rtmp.url("speech"), BroadcastOptions(duration_s=4.0, video_bitrate=500_000),
                    sink_factory=recording)
    seen: list[dict] = []

    async def watch():
        while True:
            await asyncio.sleep(0.5)
            seen.append(b.snapshot())

    watcher = asyncio.ensure_future(watch())
    t0 = time.monotonic()
    snap = await broadcast_audio(b, session, AudioDriver(session, str(WAV)))
    wall = time.monotonic() - t0
    watcher.cancel()
    assert snap["state"] == "stopped" and snap["end_reason"] == "duration" and snap["frames_sent"] == 100, snap
    assert wall >= 3.9, wall  # real time: 4 s of output take at least 4 s
    live = [s for s in seen if s["state"] == "live"]
    assert live and max(s["bitrate_kbps"] for s in live) > 0, seen
    await until(lambda: rtmp.recorded("speech"), 5, "the recording")
    info = read_back(rtmp.recorded("speech")[0])
    assert info["format"] == "flv" and info["streams"]["video"]["codec"] == "h264"
    assert info["streams"]["audio"]["codec"] == "aac" and info["audio_rate"] == RATE
    assert info["video_size"][:2] == (32, 32) and abs(info["video_frames"] - 100) <= 2, info
    assert abs(info["audio_s"] - 4.0) < 0.1, info["audio_s"]  # continuous: no gap, no extra
    # what arrived is what was sent (slot for slot, repeats on a slow machine included) ...
    sent = sinks[0].frames
    assert len(sinks) == 1 and [f.pts for f in sent] == list(range(100))
    lag, corr = best_correlation(info["audio"], np.concatenate([f.audio for f in sent]))
    assert corr > 0.95 and lag <= 2048, (lag, corr)
    # ... and what was sent, without the slots repeated while the engine was late, is the speech that
    # drove the avatar at the session's 48 kHz (normally nothing is repeated: snap["repeated"] == 0)
    speech = [f for f in sent if not f.idle]
    assert len(speech) == 100 - snap["repeated"] and len(speech) >= 25, snap["repeated"]
    lag, corr = best_correlation(np.concatenate([f.audio for f in speech]), reference_audio(4.0), max_lag=64)
    assert corr > 0.99 and lag <= 8, (lag, corr)


@pytest.mark.parametrize("segment_type,ext", [("mpegts", ".ts"), ("fmp4", ".m4s")])
async def test_hls_writes_a_playlist_that_pyav_decodes(tmp_path, segment_type, ext):
    out = tmp_path / "hls" / "live.m3u8"
    opts = BroadcastOptions(duration_s=3.0, hls_list_size=0, hls_segment_type=segment_type, hls_time_s=1.0,
                            gop_s=1.0, start_frames=1)
    snap = await Broadcaster(str(out), opts).run(frames(None))
    assert snap["state"] == "stopped" and snap["frames_sent"] == 75, snap
    playlist = out.read_text()
    assert "#EXT-X-ENDLIST" in playlist and playlist.count("#EXTINF") == 3, playlist
    assert len(list(out.parent.glob(f"live*{ext}"))) == 3
    info = read_back(out)
    assert info["streams"]["video"]["codec"] == "h264" and info["streams"]["audio"]["codec"] == "aac"
    assert info["video_frames"] == 75 and info["video_size"][:2] == (32, 34)
    assert abs(info["audio_s"] - 3.0) < 0.1 and abs(info["duration_s"] - 3.0) < 0.1, info


async def test_the_broadcaster_reconnects_when_the_rtmp_server_restarts(rtmp):
    opts = BroadcastOptions(duration_s=6.0, start_frames=1, retry_initial_s=0.2, retry_max_s=0.5, max_attempts=20)
    b = Broadcaster(rtmp.url("restart"), opts)
    run = asyncio.ensure_future(b.run(frames(None)))
    await until(lambda: b.state == "live", 10, "the first connection")
    await asyncio.sleep(1.5)
    await asyncio.to_thread(rtmp.stop)
    await until(lambda: b.state == "reconnecting", 5, "the lost connection to be noticed")
    await asyncio.sleep(0.8)
    await asyncio.to_thread(rtmp.start)
    snap = await asyncio.wait_for(run, 30)
    assert snap["state"] == "stopped" and snap["end_reason"] == "duration", snap
    assert snap["disconnects"] == 1 and snap["reconnects"] == 1 and snap["failed_attempts"] >= 1, snap
    assert snap["frames_sent"] + snap["dropped"]["offline"] == 150
    files = rtmp.recorded("restart")
    assert len(files) == 2, files
    first, second = read_back(files[0]), read_back(files[1])
    for info in (first, second):
        assert info["streams"]["video"]["codec"] == "h264" and info["streams"]["audio"]["codec"] == "aac"
    assert first["video_frames"] >= 30 and second["video_frames"] >= 40, (first["video_frames"], second["video_frames"])
    assert abs(second["audio_s"] - second["video_frames"] / FPS) < 0.15  # the new stream is whole again


# ---- the admin API -------------------------------------------------------------------------------------------
async def test_admin_api_starts_lists_and_stops_broadcasts(rtmp, backend, tmp_path):
    settings = Settings(admin_token=TOKEN, max_sessions=2, idle_timeout_s=20, connect_timeout_s=10,
                        hls_dir=str(tmp_path / "hls"), media_dir=str(WAV.parent))  # audio only from there
    async with TestClient(TestServer(create_app(settings, backend))) as client:
        async def admin(method: str, path: str, **kw):
            resp = await client.request(method, "/admin/broadcast" + path, headers=AUTH, **kw)
            return resp.status, await resp.json()

        # 1. refused clearly, nothing started
        for body, status, code in [
            ({}, 400, "bad_source"), ({"audio": str(WAV)}, 400, "missing_target"),
            ({"audio": str(WAV), "to": "ftp://x/y"}, 400, "bad_target"),
            ({"audio": str(WAV), "to": "../out.m3u8"}, 400, "bad_target"),
            ({"audio": str(WAV), "session_id": "x", "to": "a/"}, 400, "bad_source"),
            ({"session_id": "nope", "to": "a/"}, 404, "unknown_session"),
            ({"audio": str(tmp_path / "missing.wav"), "to": "a/"}, 400, "bad_audio"),
            ({"audio": str(WAV), "to": "a/", "duration_s": -1}, 400, "bad_field"),
            ({"audio": str(WAV), "to": "a/", "avatar": "nobody"}, 400, "unknown_avatar"),
        ]:
            got, answer = await admin("POST", "/start", json=body)
            assert (got, answer["error"]) == (status, code), (body, answer)
        assert (await client.get("/admin/broadcast")).status == 401
        assert (await admin("POST", "/stop", json={"id": "b999"}))[1]["error"] == "unknown_broadcast"
        assert (await admin("GET", ""))[1]["broadcasts"] == []

        # 2. a speech file to RTMP: listed live with a bitrate, stopped cleanly
        status, started = await admin("POST", "/start", json={"audio": str(WAV), "to": rtmp.url("admin"),
                                                              "video_bitrate_kbps": 400})
        assert status == 201 and started["source"]["type"] == "audio" and started["target"].endswith("/***")
        bid = started["id"]
        listed: dict = {}

        async def refresh():
            listed.update(next(b for b in (await admin("GET", ""))[1]["broadcasts"] if b["id"] == bid))
            return listed

        for _ in range(100):
            if (await refresh())["state"] == "live" and listed["frames_sent"] > 25 and listed["bitrate_kbps"] > 0:
                break
            await asyncio.sleep(0.1)
        assert listed["state"] == "live" and listed["bitrate_kbps"] > 0 and listed["reconnects"] == 0, listed
        status, answer = await admin("POST", "/start", json={"audio": str(WAV), "to": rtmp.url("admin")})
        assert (status, answer["error"]) == (409, "target_busy")
        status, stopped = await admin("POST", "/stop", json={"id": bid})
        assert status == 200 and stopped["state"] == "stopped" and stopped["end_reason"] == "stopped", stopped
        assert stopped["audio"]["pushed_s"] > 1.0
        await until(lambda: rtmp.recorded("admin"), 5, "the recording")
        info = read_back(rtmp.recorded("admin")[0])
        assert info["streams"]["video"]["codec"] == "h264" and info["video_frames"] >= 25

        # 3. a live call to HLS: what the caller sees, until stopped
        peer = LoopbackClient(keep_video=True)
        resp = await client.post("/offer", json={"sdp": await peer.offer(), "type": "offer"})
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        await peer.accept(answer)
        try:
            await until(lambda: len(peer.video) >= 10, 20, "the call's first frames")
            status, started = await admin("POST", "/start", json={"session_id": answer["session_id"],
                                                                  "to": "call/"})
            assert status == 201 and started["source"] == {"type": "session", "session_id": answer["session_id"]}
            for _ in range(100):
                snap = next(b for b in (await admin("GET", ""))[1]["broadcasts"] if b["id"] == started["id"])
                if snap["frames_sent"] >= 50:
                    break
                await asyncio.sleep(0.1)
            status, stopped = await admin("POST", "/stop", json={"id": started["id"]})
            assert stopped["state"] == "stopped" and stopped["frames_sent"] >= 50, stopped
            call = await (await client.get(f"/sessions/{answer['session_id']}")).json()
            assert call["state"] == "connected" and call["video"]["fps"] > 5, call  # the call went on
            # 4. a call that ends ends its broadcast (the stream is finished, not cut)
            status, second = await admin("POST", "/start", json={"session_id": answer["session_id"],
                                                                 "to": "call2/"})
            assert status == 201
            await asyncio.sleep(1.0)
            assert (await client.post(f"/sessions/{answer['session_id']}/bye")).status == 200
            ended: dict = {}
            for _ in range(100):
                ended = next(b for b in (await admin("GET", ""))[1]["broadcasts"] if b["id"] == second["id"])
                if ended["state"] == "stopped":
                    break
                await asyncio.sleep(0.1)
            assert ended["state"] == "stopped" and ended["end_reason"] == "source_ended", ended
            assert "#EXT-X-ENDLIST" in (tmp_path / "hls" / "call2" / "index.m3u8").read_text()
        finally:
            await peer.close()
        info = read_back(tmp_path / "hls" / "call" / "index.m3u8")
        assert info["video_frames"] == stopped["frames_sent"] and info["streams"]["audio"]["codec"] == "aac"
        assert abs(info["audio_s"] - info["video_frames"] / FPS) < 0.15


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_broadcasts_an_audio_file_to_hls(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    out = tmp_path / "cli" / "show.m3u8"
    res = CliRunner().invoke(app, ["broadcast", "--audio", str(WAV), "--to", str(out), "--duration", "3",
                                   "--model", "tiny"])
    assert res.exit_code == 0, res.output
    assert '"state": "stopped"' in res.output and '"frames_sent": 75' in res.output
    info = read_back(out)
    assert info["video_frames"] == 75 and info["streams"]["audio"]["codec"] == "aac"
    assert abs(info["audio_s"] - 3.0) < 0.1
    bad = CliRunner().invoke(app, ["broadcast", "--audio", str(WAV), "--to", "rtmp://host/only-app"])
    assert bad.exit_code != 0 and "application and a stream key" in str(bad.exception)
