"""Two-person dialogue, live: two voices drive the two faces of a two-face avatar independently.

1. The demo model, loaded and wired as the service does (`scene_backend`: the built-in two-face avatar
   generated at twice the model's width), in a live session with two tracks: speech on speaker 0 and
   silence on speaker 1, then swapped. The speaking face's mouth moves and the silent one's stays still:
   the mouth-opening variance (the demo model card's FAA probe) and the mouth-region motion of the silent
   face are at most 10 % of the speaking face's, both ways round.
2. A broadcast of two audio files of different lengths into an HLS file target (random TINY weights):
   both voices reach the one session, the shorter one goes silent, the stream has picture and sound.
3. What cannot work is refused with a clear error: more voices than faces, an audio file with one
   channel split into two speakers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from app.avatars import BUILTIN_AVATAR, BUILTIN_DUO, EngineBackend
from audio.resample import PcmFormat, resample_audio
from avatar.session import SessionOptions
from avatar.types import AvatarFrame
from streaming.broadcasts import BroadcastManager
from streaming.source_policy import SourcePolicy
from streaming.webrtc.errors import LiveError
from streaming.webrtc.service import LiveService, ServiceOptions

from helpers import FIXTURES, mouth_motion, until

pytestmark = pytest.mark.timeout(600)
SPEECH = FIXTURES / "audio" / "speech_en_gb_female.wav"
RATE = 48_000
PAIR_HW = (128, 256)  # the demo model's two-face scenes: two 128 x 128 faces side by side
SEGMENT_S = 4.0  # each half of the test: one face speaks this long, the other is silent


def speech(seconds: float) -> np.ndarray:
    x, rate = sf.read(SPEECH, dtype="float32")
    return resample_audio(x, PcmFormat(rate), out_rate=RATE)[: int(seconds * RATE)]


# ---- 1. the demo model: the speaking face's mouth moves, the silent one's does not -----------------------
@pytest.fixture(scope="module")
def demo_pair():
    """The embedded demo model as `serve` loads it and the avatars it serves (head motion off, as the
    demo model's FAA figure is measured: a moving head is not a moving mouth), with the built-in
    two-face avatar's mouth boxes in the frames it generates (speaker 0 left)."""
    from app.avatars import BUILTIN_DUO_SEED
    from app.render_worker import demo_model_available, load_models
    from app.workers.scenes import scene_backend
    from avatar.drawn.emotions import rest_state
    from avatar.drawn.face import Identity, render_pair
    from avatar.engine import AvatarEngine, preset_options

    if not demo_model_available():
        pytest.skip("the demo model's weights are not in the tree")
    models = load_models("demo")
    engine = AvatarEngine(models, preset_options(models.dit.cfg.name, decoder="torch", max_sessions=1,
                                                 warmup=False)).start()
    # never held: a test machine decoding two faces with torch is several times slower than real time, and
    # a live session that far behind would show mostly held frames; this measures the frames, not the pace
    live = SessionOptions(realtime=True, sample_rate=RATE, max_lag_s=None)
    backend = scene_backend(engine, motion=0.0, options=live)
    duo = backend.wide[2].avatars[BUILTIN_DUO]
    assert duo.size_hw == PAIR_HW
    ids = [Identity.from_seed(BUILTIN_DUO_SEED + k) for k in range(2)]
    _, infos = render_pair(ids[0], rest_state("neutral"), ids[1], rest_state("neutral"), (256, 512))
    yield backend, [_in_crop(i.mouth_box, i.face_box, box) for i, box in zip(infos, duo.boxes)]
    backend.stop()
    engine.stop()


def _in_crop(mouth, face, box) -> tuple[int, int, int, int]:
    """A mouth box of the drawn scene in the prepared crop, placed by its face's box in both."""
    sx, sy = (box.x1 - box.x0) / (face[2] - face[0]), (box.y1 - box.y0) / (face[3] - face[1])
    return (int(box.x0 + (mouth[0] - face[0]) * sx), int(box.y0 + (mouth[1] - face[1]) * sy),
            int(round(box.x0 + (mouth[2] - face[0]) * sx)), int(round(box.y0 + (mouth[3] - face[1]) * sy)))


def mouth_variance(frames: np.ndarray, box) -> float:
    from training.probes import mouth_opening

    return float(np.var([mouth_opening(f, box) for f in frames]))


async def test_each_voice_moves_only_its_own_face(demo_pair):
    backend, mouths = demo_pair
    talk = speech(SEGMENT_S)
    quiet = np.zeros_like(talk)
    session = backend.open(BUILTIN_DUO, None, speakers=2)  # what a two-person call or broadcast opens
    try:
        for left, right in ((talk, quiet), (quiet, talk)):  # face 0 speaks, then face 1
            session.push_audio(left, RATE, speaker=0)
            session.push_audio(right, RATE, speaker=1)
        n = int(2 * SEGMENT_S * 25)
        frames = []
        async for item in session:
            if isinstance(item, AvatarFrame):
                frames.append(np.asarray(item.video))
                if len(frames) == n:
                    break
    finally:
        session.close()
    video = np.stack(frames)
    half, edge = n // 2, 10  # leave out the frames around the swap (the audio window spans it)
    first, second = video[edge:half - edge], video[half + edge:n - edge]
    var = {(face, part): mouth_variance(clip, mouths[face])
           for face in (0, 1) for part, clip in (("first", first), ("second", second))}
    left_silent = var[0, "second"] / var[1, "second"]  # face 0 silent while face 1 speaks
    right_silent = var[1, "first"] / var[0, "first"]
    motion = {(face, part): mouth_motion(clip, mouths[face])
              for face in (0, 1) for part, clip in (("first", first), ("second", second))}
    print(f"mouth-opening variance {var}; silent / speaking: left face {left_silent:.4f}, "
          f"right face {right_silent:.4f}; mouth-region motion {motion}")
    assert var[0, "first"] > 1e-3 and var[1, "second"] > 1e-3, var  # the speaking mouth really moves
    assert left_silent <= 0.10 and right_silent <= 0.10, var
    # the figure, on the frames as generated (no codec to smooth them): the silent face's
    # mouth-region motion at most 10 % of the speaking one's, both ways round
    assert motion[1, "first"] <= 0.10 * motion[0, "first"] and motion[0, "second"] <= 0.10 * motion[1, "second"], motion


# ---- 2. a broadcast of two files into an HLS file target --------------------------------------------------
class SpeakerSpy:
    """The backend's sessions, with the audio each speaker was given (for the test to look at)."""

    def __init__(self, backend: EngineBackend) -> None:
        self.backend, self.default_avatar = backend, backend.default_avatar
        self.pushed: dict[int, list[float]] = {}  # speaker -> RMS of each push
        self.speakers: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def open(self, avatar: str, emotion: str | None, speakers: int = 1):
        session = self.backend.open(avatar, emotion, speakers)
        self.speakers.append(speakers)
        push = session.push_audio

        def spy(pcm, sample_rate, speaker=0, **kw):
            x = np.asarray(pcm, np.float32)
            self.pushed.setdefault(speaker, []).append(float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0)
            return push(pcm, sample_rate, speaker=speaker, **kw)

        session.push_audio = spy
        return session


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    sf.write(root / "long.wav", speech(2.0), RATE)
    sf.write(root / "short.wav", speech(0.8), RATE)
    sf.write(root / "mono.wav", speech(0.5), RATE)
    return root


async def test_a_broadcast_of_two_files_drives_both_faces_into_an_hls_file(backend, media, tmp_path):
    spy = SpeakerSpy(backend)
    service = LiveService(spy, ServiceOptions(stats_interval_s=0))
    manager = BroadcastManager(service, tmp_path / "hls", sources=SourcePolicy(media_dir=media))
    snap = await manager.start({"to": "duo/", "audio": ["long.wav", "short.wav"], "avatar": BUILTIN_DUO,
                                "duration_s": 3.0})
    assert snap["source"]["speakers"] == 2 and snap["source"]["audio"] == ["long.wav", "short.wav"]
    entry = manager.get(snap["id"])
    await until(lambda: not entry.active, 120, "the broadcast to end after its duration")
    final = entry.snapshot()
    assert (final["state"], final["end_reason"]) == ("stopped", "duration"), final
    assert spy.speakers == [2]
    voices = final["voices"]
    assert voices[0]["pushed_s"] >= 2.0 and voices[1]["pushed_s"] >= 2.0  # the shorter one goes on in silence
    assert voices[1]["silence_s"] > voices[0]["silence_s"] + 0.8, voices
    loud = {k: sum(r > 0.01 for r in v) for k, v in spy.pushed.items()}
    assert loud[0] > 0 and loud[1] > 0, loud  # each file reached its own speaker
    playlist = tmp_path / "hls" / "duo" / "index.m3u8"
    assert playlist.exists()
    segments = sorted(playlist.parent.glob("*.ts"))
    with av.open(str(segments[0])) as ts:
        kinds = {s.type for s in ts.streams}
        frames = sum(1 for _ in ts.decode(video=0))
    assert kinds >= {"video", "audio"} and frames > 10


async def test_a_broadcast_refuses_more_voices_than_faces_and_a_mono_split(backend, media, tmp_path):
    service = LiveService(backend, ServiceOptions(stats_interval_s=0))
    manager = BroadcastManager(service, tmp_path / "hls", sources=SourcePolicy(media_dir=media))
    with pytest.raises(LiveError) as err:
        await manager.start({"to": "a/", "audio": ["long.wav", "short.wav"], "avatar": BUILTIN_AVATAR})
    assert (err.value.status, err.value.code) == (400, "too_few_faces")
    assert err.value.message == (f"avatar {BUILTIN_AVATAR!r} has 1 face; a two-person call needs a two-face "
                                 f"avatar such as {BUILTIN_DUO!r}")
    with pytest.raises(LiveError) as err:
        await manager.start({"to": "b/", "audio": ["long.wav", "short.wav", "mono.wav"], "avatar": BUILTIN_DUO})
    assert err.value.code == "too_few_faces" and "has 2 faces; a three-person call" in err.value.message
    with pytest.raises(LiveError) as err:  # one source split by channel needs a channel per speaker
        await manager.start({"to": "c/", "audio": "mono.wav", "speakers": 2, "avatar": BUILTIN_DUO})
    assert err.value.code == "bad_audio" and "1 channel" in err.value.message
    with pytest.raises(LiveError) as err:
        await manager.start({"to": "d/", "audio": ["long.wav", "../outside.wav"], "avatar": BUILTIN_DUO})
    assert err.value.code == "bad_audio"  # every source passes the media policy
    assert manager.entries == {} and not backend.engine.sessions or all(
        s.closed for s in backend.engine.sessions.values())
    await asyncio.sleep(0)
