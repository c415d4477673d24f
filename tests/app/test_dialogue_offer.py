"""Two-person calls through POST /offer, over real aiortc loopback peers (127.0.0.1, no ICE servers), on
the built-in two-face avatar (random TINY weights: these tests check where each voice goes, the mouth
figures are tests/streaming/test_dialogue_live.py's):
1. the caller is speaker 1 and a file of the media folder (listed by GET /media) speaker 2;
2. a stereo caller split: left = speaker 1, right = speaker 2;
3. what cannot work is a clear 400 before any session opens: more voices than faces, a second voice
   outside the media folder (the same answer whether or not that file exists), a mono offer asked to
   split, a second voice and a split together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from aiohttp.test_utils import TestClient, TestServer

from app.avatars import BUILTIN_AVATAR, BUILTIN_DUO
from app.server import create_app
from app.settings import Settings
from audio.resample import PcmFormat, resample_audio
from streaming.webrtc.testing import LoopbackClient

from helpers import FIXTURES, until

pytestmark = pytest.mark.timeout(180)
RATE = 48_000
LOUD = 0.01  # RMS of a push that carries speech (silence and codec noise stay far below)


def speech(seconds: float) -> np.ndarray:
    x, rate = sf.read(FIXTURES / "audio" / "speech_en_gb_female.wav", dtype="float32")
    return resample_audio(x, PcmFormat(rate), out_rate=RATE)[: int(seconds * RATE)]


class SpeakerSpy:
    """The served backend, counting the loud pushes each speaker of its sessions gets."""

    def __init__(self, backend) -> None:
        self.backend, self.default_avatar = backend, backend.default_avatar
        self.loud: dict[int, int] = {}
        self.quiet: dict[int, int] = {}
        self.opened: list[tuple[str, int]] = []

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def open(self, avatar: str, emotion: str | None, speakers: int = 1):
        session = self.backend.open(avatar, emotion, speakers)
        self.opened.append((avatar, speakers))
        push = session.push_audio

        def spy(pcm, sample_rate, speaker=0, **kw):
            x = np.asarray(pcm, np.float32) / (32768.0 if np.asarray(pcm).dtype == np.int16 else 1.0)
            counts = self.loud if x.size and np.sqrt(np.mean(x ** 2)) > LOUD else self.quiet
            counts[speaker] = counts.get(speaker, 0) + 1
            return push(pcm, sample_rate, speaker=speaker, **kw)

        session.push_audio = spy
        return session


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "voices").mkdir(parents=True)
    sf.write(root / "voices" / "guest.wav", speech(3.0), RATE)
    sf.write(tmp_path / "secret.wav", speech(0.5), RATE)  # beside the media folder, not in it
    return root


@pytest.fixture
async def served(backend, media):
    spy = SpeakerSpy(backend)
    settings = Settings(admin_token="t" * 32, max_sessions=2, idle_timeout_s=10, connect_timeout_s=10,
                        media_dir=str(media), calls_per_client=4)
    async with TestClient(TestServer(create_app(settings, spy))) as client:
        yield client, spy


async def offer(client: TestClient, peer: LoopbackClient, **fields):
    return await client.post("/offer", json={"sdp": await peer.offer(), "type": "offer", **fields})


async def test_the_caller_and_a_media_file_drive_the_two_faces(served):
    client, spy = served
    assert (await (await client.get("/media")).json()) == {"files": ["voices/guest.wav"]}
    assert (await (await client.get("/config")).json())["faces"][BUILTIN_DUO] == 2
    peer = LoopbackClient(speech(3.0))
    resp = await offer(client, peer, avatar=BUILTIN_DUO, speakers=2, second_voice="voices/guest.wav")
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["speakers"] == 2 and answer["avatar"] == BUILTIN_DUO
    await peer.accept(answer)
    sid = answer["session_id"]
    await until(lambda: len(peer.video) >= 25 and spy.loud.get(0, 0) > 20 and spy.loud.get(1, 0) > 5, 60,
                "frames, the caller's speech on speaker 1 and the file on speaker 2")
    snap = await (await client.get(f"/sessions/{sid}")).json()
    assert snap["speakers"] == 2 and snap["dialogue"]["stereo_split"] is False
    voice = snap["dialogue"]["second_voice"]
    assert voice["source"] == "voices/guest.wav" and voice["pushed_s"] > 0.5 and voice["error"] is None
    assert spy.opened == [(BUILTIN_DUO, 2)]
    assert peer.video[-1].shape[:2] == tuple(spy.engine.models.frame_hw)
    await client.post(f"/sessions/{sid}/bye")
    await peer.close()


async def test_a_stereo_caller_is_split_left_to_speaker_one_right_to_speaker_two(served):
    client, spy = served
    left = speech(3.0)
    peer = LoopbackClient(np.stack([left, np.zeros_like(left)], axis=1))  # the guest is silent
    resp = await offer(client, peer, avatar=BUILTIN_DUO, speakers=2, stereo_split=True)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    await peer.accept(answer)
    await until(lambda: spy.loud.get(0, 0) > 40, 60, "the caller's speech on speaker 1")
    assert spy.loud.get(1, 0) == 0 and spy.quiet.get(1, 0) > 40, (spy.loud, spy.quiet)
    snap = await (await client.get(f"/sessions/{answer['session_id']}")).json()
    assert snap["dialogue"] == {"stereo_split": True, "second_voice": None}
    await client.post(f"/sessions/{answer['session_id']}/bye")
    await peer.close()


async def test_combinations_that_cannot_work_are_clear_400s(served, media):
    client, spy = served
    peer = LoopbackClient()
    sdp = await peer.offer()

    async def refused(code: str, **fields) -> str:
        resp = await client.post("/offer", json={"sdp": sdp, "type": "offer", **fields})
        body = await resp.json()
        assert (resp.status, body["error"]) == (400, code), body
        return body["message"]

    message = await refused("too_few_faces", avatar=BUILTIN_AVATAR, speakers=2, second_voice="voices/guest.wav")
    assert message == f"avatar {BUILTIN_AVATAR!r} has 1 face; a two-person call needs a two-face avatar such as " \
                      f"{BUILTIN_DUO!r}"
    message = await refused("too_few_faces", avatar=BUILTIN_DUO, speakers=3, second_voice="voices/guest.wav")
    assert message.startswith(f"avatar {BUILTIN_DUO!r} has 2 faces; a three-person call needs a three-face avatar")
    # outside the media folder: the same answer for a file that exists and one that does not
    there = await refused("bad_second_voice", avatar=BUILTIN_DUO, speakers=2, second_voice="../secret.wav")
    absent = await refused("bad_second_voice", avatar=BUILTIN_DUO, speakers=2, second_voice="../nothing.wav")
    assert there.replace("secret", "X") == absent.replace("nothing", "X")
    assert (media.parent / "secret.wav").exists()
    await refused("bad_second_voice", avatar=BUILTIN_DUO, speakers=2, second_voice="http://127.0.0.1/a.wav")
    mono = await refused("mono_caller", avatar=BUILTIN_DUO, speakers=2, stereo_split=True)
    assert "mono" in mono and "second_voice" in mono
    await refused("bad_dialogue", avatar=BUILTIN_DUO, speakers=2)
    await refused("bad_dialogue", avatar=BUILTIN_DUO, speakers=2, stereo_split=True, second_voice="voices/guest.wav")
    await refused("bad_dialogue", avatar=BUILTIN_DUO, second_voice="voices/guest.wav")
    await refused("bad_field", avatar=BUILTIN_DUO, speakers="two")
    assert spy.opened == []  # every refusal came before any engine session
    await peer.close()
    await asyncio.sleep(0)


async def test_a_worker_process_serves_the_two_faces_with_one_voice_each():
    """The same through an engine worker process: Open carries the speakers, each Push its speaker; the
    two-face avatar comes out twice the model's width (its faces at the model's size, side by side)."""
    from app.workers.engine_worker import WorkerSpec
    from app.workers.pool import PoolOptions, WorkerPool
    from avatar.types import AvatarFrame
    from streaming.webrtc.errors import LiveError

    pool = WorkerPool(WorkerSpec(model="tiny", threads=1, decoder="torch", heartbeat_s=0.25, warmup=False),
                      PoolOptions(workers=1, tick_s=0.05))
    await pool.start()
    try:
        assert pool.faces() == {BUILTIN_AVATAR: 1, BUILTIN_DUO: 2}
        assert pool.avatar_warnings() == {}  # the worker's hello: TINY weights declare no domain to be out of
        with pytest.raises(LiveError) as err:
            pool.open(BUILTIN_AVATAR, None, speakers=2)
        assert err.value.code == "too_few_faces"
        session = pool.open(BUILTIN_DUO, None, speakers=2)
        with pytest.raises(ValueError, match="speaker 2 outside 0..1"):
            session.push_audio(np.zeros(480, np.float32), RATE, speaker=2)
        session.push_audio(speech(1.0), RATE, speaker=1)
        frames = []
        async for item in session:
            if isinstance(item, AvatarFrame):
                frames.append(item)
                if len(frames) == 25:
                    break
        session.close()
        h, w = pool.info["frame_hw"]
        assert frames[-1].video.shape == (h, 2 * w, 3)
        assert max(float(np.abs(f.audio).max()) for f in frames) > 0.05  # speaker 2's voice comes back out
    finally:
        await pool.stop()
