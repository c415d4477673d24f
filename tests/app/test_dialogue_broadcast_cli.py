"""`avatarcast broadcast` with a dialogue: `--audio A --audio B` (one voice per face, the built-in two-face
avatar unless --avatar says otherwise), or one stereo source split with `--speakers 2`; combinations that
cannot work fail before any model loads or a stream starts, with a message that names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from app.avatars import BUILTIN_DUO
from app.cli import app

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
