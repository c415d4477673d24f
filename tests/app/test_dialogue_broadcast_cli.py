"""`avatarcast broadcast` with a dialogue: `--audio A --audio B` (one voice per face, the built-in two-face
avatar unless --avatar says otherwise), or one stereo source split with `--speakers 2`; combinations that
cannot work fail before any model loads or a stream starts, with a message that names the problem.

With the demo model, a broadcast of a two-person turn (the left face speaks, a pause, the right face
answers) into an HLS file, read back with PyAV: the speaking face's mouth moves and the silent one's
changes under a tenth as much, both ways round (random TINY weights move no mouth: the plumbing tests)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from app.avatars import BUILTIN_DUO, BUILTIN_DUO_SEED
from app.cli import app
from app.render_worker import demo_model_available

from helpers import FIXTURES, mouth_boxes, mouth_motion

pytestmark = pytest.mark.timeout(300)
runner = CliRunner()
RATE = 16_000


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARCAST_CACHE", str(tmp_path / "cache"))


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture
def clips(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0, 220), RATE)
    sf.write(tmp_path / "b.wav", tone(0.4, 330), RATE)  # shorter: its face rests after it
    sf.write(tmp_path / "ab.wav", np.stack([tone(1.0, 220), tone(1.0, 330)], axis=1), RATE)
    return tmp_path


def broadcast(*args: str):
    return runner.invoke(app, ["broadcast", *args, "--duration", "1", "--model", "tiny"])


def final_state(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def test_two_files_drive_the_two_face_avatar(clips):
    out = clips / "hls" / "duo.m3u8"
    res = broadcast("--audio", str(clips / "a.wav"), "--audio", str(clips / "b.wav"), "--to", str(out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"avatar {BUILTIN_DUO!r}" in res.output and final_state(res.output)["frames_sent"] == 25
    assert "#EXT-X-ENDLIST" in out.read_text()


def test_one_stereo_source_split_by_channel(clips):
    out = clips / "hls" / "split.m3u8"
    res = broadcast("--audio", str(clips / "ab.wav"), "--speakers", "2", "--to", str(out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"avatar {BUILTIN_DUO!r}" in res.output and final_state(res.output)["frames_sent"] == 25


@pytest.mark.parametrize("args, message", [
    (["--audio", "a.wav", "--speakers", "2"], "it has 1 channel; --speakers 2 from one source needs one channel"),
    (["--audio", "a.wav", "--audio", "b.wav", "--audio", "a.wav"],
     "a three-person call needs a three-face avatar and this server has none"),
    (["--audio", "a.wav", "--audio", "b.wav", "--speakers", "3"], "--speakers is 3 but --audio lists 2 sources"),
])
def test_what_cannot_work_fails_with_a_clear_message(clips, args, message):
    args = [str(clips / a) if a.endswith(".wav") else a for a in args]
    res = broadcast(*args, "--to", str(clips / "hls" / "bad.m3u8"))
    assert res.exit_code != 0 and isinstance(res.exception, ValueError), res.output
    assert message in str(res.exception)
    assert not (clips / "hls" / "bad.m3u8").exists()


def test_a_one_face_avatar_folder_refuses_two_voices(clips):
    made = runner.invoke(app, ["avatar", "new", "--seed", "5", "--out", str(clips / "solo")])
    assert made.exit_code == 0, made.output
    res = broadcast("--audio", str(clips / "a.wav"), "--audio", str(clips / "b.wav"), "--avatar", str(clips / "solo"),
                    "--to", str(clips / "hls" / "solo.m3u8"))
    assert isinstance(res.exception, ValueError)
    assert str(res.exception).startswith("avatar 'solo' has 1 face; a two-person call needs a two-face avatar such "
                                         f"as {BUILTIN_DUO!r}")


def test_a_demo_dialogue_broadcast_moves_only_the_speaking_face(tmp_path):
    """4 s of speech on the left voice, 1 s in which nobody speaks (the last speaker's mouth closes),
    then 4 s on the right voice; broadcast in real time into an HLS playlist and decoded."""
    if not demo_model_available():
        pytest.skip("app/demo_model weights are not in the tree")
    made = runner.invoke(app, ["avatar", "new", "--seed", str(BUILTIN_DUO_SEED), "--faces", "2", "--size", "128",
                               "--out", str(tmp_path / "duo")])
    assert made.exit_code == 0, made.output
    speech, rate = sf.read(FIXTURES / "audio" / "speech_en_us_male.wav", dtype="float32")
    speech = speech[:4 * rate]
    quiet, pause = np.zeros_like(speech), np.zeros(rate, np.float32)
    sf.write(tmp_path / "left.wav", np.concatenate([speech, pause, quiet]), rate)
    sf.write(tmp_path / "right.wav", np.concatenate([quiet, pause, speech]), rate)
    out = tmp_path / "hls" / "duo.m3u8"
    res = runner.invoke(app, ["broadcast", "--audio", str(tmp_path / "left.wav"), "--audio", str(tmp_path / "right.wav"),
                              "--avatar", str(tmp_path / "duo"), "--model", "demo", "--to", str(out),
                              "--duration", "9"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert final_state(res.output)["frames_sent"] == 225
    with av.open(str(out)) as playlist:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in playlist.decode(video=0)])
    assert frames.shape == (225, 128, 256, 3)
    left, right = mouth_boxes(frames.shape[1:3], tmp_path / "duo")
    # a frame the stream repeated (the avatar a little behind real time on a busy machine) changes nothing
    # on either face: only the steps between fresh frames are measured, a few in a hundred are not
    step = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # (T - 1,)
    fresh = np.concatenate([[True], step > 0.025])  # a re-encoded repeat: under 0.02; a fresh frame: 0.03-1
    first, second = frames[10:100][fresh[10:100]], frames[125:225][fresh[125:225]]  # left / right speaking
    if len(first) < 86 or len(second) < 95:
        # far behind real time the session holds whole blocks (every other one, on a loaded 2-core machine):
        # the held frames hide the speaker's motion and the listener's mouth closes late, in a jump, so the
        # figure would measure the holds, not the faces (one such run: 68 fresh frames of 100, 15 %)
        pytest.skip(f"the broadcast fell behind real time: {len(first)} / 90 and {len(second)} / 100 fresh frames")
    motion = {"left speaks": (mouth_motion(first, left), mouth_motion(first, right)),
              "right speaks": (mouth_motion(second, left), mouth_motion(second, right))}
    state = final_state(res.output)
    print(f"\nmouth-region motion (left face, right face): {motion}; fresh frames {len(first)} / 90, "
          f"{len(second)} / 100; repeated by the stream: {state['repeated']}")
    (speaker_l, silent_r), (silent_l, speaker_r) = motion["left speaks"], motion["right speaks"]
    assert speaker_l > 0.5 and speaker_r > 0.5, motion  # the speaking mouth really moves
    assert silent_r <= 0.10 * speaker_l and silent_l <= 0.10 * speaker_r, motion
