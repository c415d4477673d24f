"""`avatarcast render --speakers 2`: two voices drive the two faces of a two-person avatar, through the CLI.

The mouth test renders with the embedded demo model (random weights move no mouth); the plumbing tests
(manifests, padding, bad inputs) with random TINY weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from app.avatars import BUILTIN_DUO_SEED, BUILTIN_SEED
from app.cli import app
from app.render_worker import demo_model_available

from helpers import mouth_boxes, mouth_motion

REPO = Path(__file__).resolve().parents[2]
SPEECH = REPO / "tests" / "fixtures" / "audio" / "speech_en_us_male.wav"
TINY = ["--model", "tiny", "--decoder", "torch", "--quiet"]
runner = CliRunner()
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARCAST_CACHE", str(tmp_path / "cache"))  # prepared portraits stay in the test


@pytest.fixture
def duo(tmp_path) -> Path:
    """`avatarcast avatar new --faces 2`: a two-person folder, speaker order in avatar.json."""
    res = runner.invoke(app, ["avatar", "new", "--seed", "1000031", "--faces", "2", "--size", "128",
                              "--out", str(tmp_path / "duo")])
    assert res.exit_code == 0, (res.output, res.exception)
    return tmp_path / "duo"


def _speech(seconds: float) -> tuple[np.ndarray, int]:
    pcm, rate = sf.read(SPEECH, dtype="float32")
    return pcm[:int(seconds * rate)], rate


def _tone(path: Path, seconds: float, rate: int) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def _render(args: list[str], out: Path, *extra: str) -> tuple[int, dict]:
    res = runner.invoke(app, ["render", *args, "--out", str(out), *extra])
    manifest = json.loads((out / "render-manifest.json").read_text())
    return res.exit_code, {Path(r["output"] or r["input"]).stem: r for r in manifest["results"]}


def _decode(mp4: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames (T, H, W, 3), audio (channels, n), rate) of an mp4."""
    with av.open(str(mp4)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(mp4)) as c:
        chunks = [f.to_ndarray() for f in c.decode(audio=0)]
        rate = c.streams.audio[0].rate
    return frames, np.concatenate(chunks, axis=1), rate


def _mouths(frames: np.ndarray, folder: Path) -> tuple[list[float], list[float]]:
    """Per face: (mean absolute frame-to-frame difference in its mouth region; variance of its mouth
    opening, the probe `avatarcast eval demo` measures the FAA leak with)."""
    from training.probes import mouth_opening

    motion, opening = [], []
    for box in mouth_boxes(frames.shape[1:3], folder):
        motion.append(mouth_motion(frames, box))
        opening.append(float(np.var([mouth_opening(f, box) for f in frames])))
    return motion, opening


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> dict[str, tuple[list[float], list[float]]]:
    """A stereo file with speech on the left channel and silence on the right, and the reverse, rendered
    once through the CLI with the demo model and a two-person `avatar new` folder (the identities of the
    built-in sketch-duo) -> per file, per face: (mouth motion, mouth-opening variance)."""
    if not demo_model_available():
        pytest.skip("app/demo_model weights are not in the tree")
    tmp = tmp_path_factory.mktemp("dialogue")
    folder = tmp / "duo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AVATARCAST_CACHE", str(tmp / "cache"))
        res = runner.invoke(app, ["avatar", "new", "--seed", str(BUILTIN_DUO_SEED), "--faces", "2", "--size", "128",
                                  "--out", str(folder)])
        assert res.exit_code == 0, (res.output, res.exception)
        speech, rate = _speech(4.0)
        silence = np.zeros_like(speech)
        sf.write(tmp / "left.wav", np.stack([speech, silence], 1), rate)  # speaker 1 (left face) talks
        sf.write(tmp / "right.wav", np.stack([silence, speech], 1), rate)  # speaker 2 (right face) talks
        code, results = _render([str(tmp / "left.wav"), str(tmp / "right.wav"), "--avatar", str(folder),
                                 "--speakers", "2", "--decoder", "torch", "--quiet"], tmp / "out")
    assert code == 0, results
    measured = {}
    for name in ("left", "right"):
        frames, audio, out_rate = _decode(tmp / "out" / f"{name}.mp4")
        assert frames.shape[1:] == (128, 256, 3)  # two faces side by side: the pair scenes' geometry
        assert results[name]["speakers"] == 2 and "warning" not in results[name]
        assert abs(audio.shape[1] / out_rate - speech.size / rate) < 0.05  # the mix, as long as the input
        measured[name] = _mouths(frames, folder)
    print(f"\nper face (left, right): (mouth motion, opening variance): {measured}")
    return measured


def test_the_speaking_face_moves_its_mouth_and_the_roles_swap_with_the_channels(dialogue):
    (motion_l, open_l), (motion_r, open_r) = dialogue["left"], dialogue["right"]
    assert motion_l[0] > motion_l[1] and motion_r[1] > motion_r[0]
    # the silent face's mouth stays shut: its opening varies under a tenth as much as the speaker's
    assert open_l[1] <= 0.1 * open_l[0] and open_r[0] <= 0.1 * open_r[1], (open_l, open_r)


def test_the_silent_face_s_mouth_region_changes_under_a_tenth_as_much_as_the_speaker_s(dialogue):
    """Over every frame, the first ones included: a stream opens on a settled decoder and the model's own
    drawing of the faces (`FrameDecoder.open_at`), so a silent face does not shimmer into place."""
    (motion_l, _), (motion_r, _) = dialogue["left"], dialogue["right"]
    assert motion_l[1] <= 0.1 * motion_l[0] and motion_r[0] <= 0.1 * motion_r[1], (motion_l, motion_r)


def test_a_manifest_gives_each_speaker_a_file_and_pads_the_shorter_one(tmp_path, duo):
    _tone(tmp_path / "host.wav", 1.2, 16_000)
    _tone(tmp_path / "guest.wav", 0.6, 44_100)  # another rate: resampled to the track's
    with (tmp_path / "talk.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["audio_1", "audio_2", "avatar", "output"],
                                 ["host.wav", "guest.wav", str(duo), "talk.mp4"]])
    code, results = _render([str(tmp_path / "talk.csv"), "--speakers", "2", *TINY], tmp_path / "out")
    assert code == 0, results
    r = results["talk"]
    assert r["status"] == "done" and r["speakers"] == 2 and r["duration_s"] == pytest.approx(1.2, abs=0.01)
    assert [(t["speaker"], Path(t["input"]).name, t["duration_s"], t["padded_s"]) for t in r["tracks"]] == [
        (1, "host.wav", pytest.approx(1.2, abs=0.01), 0.0), (2, "guest.wav", pytest.approx(0.6, abs=0.01),
                                                             pytest.approx(0.6, abs=0.01))]
    assert "speaker 2" in r["warning"] and "padded with silence" in r["warning"]
    frames, audio, rate = _decode(tmp_path / "out" / "talk.mp4")
    assert frames.shape[1:] == (32, 64, 3) and len(frames) == 30  # TINY: 32 px per face; 1.2 s at 25 fps
    mix = audio.mean(0)
    loud = lambda a, b: float(np.sqrt(np.mean(mix[int(a * rate):int(b * rate)] ** 2)))
    assert loud(0.1, 0.5) > 1.5 * loud(0.7, 1.1) > 0  # both tones, then the host alone: the mix


def test_bad_dialogue_inputs_fail_alone_and_say_why(tmp_path, duo):
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.zeros((8000, 2), np.float32) + 0.01, 16_000)
    mono = _tone(tmp_path / "mono.wav", 0.5, 16_000)
    three = tmp_path / "three.wav"
    sf.write(three, np.zeros((8000, 3), np.float32), 16_000)
    code, results = _render([str(stereo), str(mono), str(three), "--avatar", str(duo), "--speakers", "2", *TINY],
                            tmp_path / "out")
    assert code == 1
    assert results["stereo"]["status"] == "done"  # the good input of the batch is rendered
    assert results["mono"]["status"] == "failed" and "mono" in results["mono"]["error"]
    assert "audio_1, audio_2" in results["mono"]["error"]
    assert "has 3 channels and --speakers 2 needs 2" in results["three"]["error"]

    # three speakers on the two-face avatar; two on the one-face built-in avatar
    code, results = _render([str(three), "--avatar", str(duo), "--speakers", "3", *TINY], tmp_path / "three")
    assert code == 1 and f"avatar {duo} has 2 faces, --speakers 3 needs 3" in results["three"]["error"]
    code, results = _render([str(stereo), "--avatar", f"demo:{BUILTIN_SEED}", "--speakers", "2", *TINY],
                            tmp_path / "builtin")
    assert code == 1 and f"demo:{BUILTIN_SEED} has 1 face, --speakers 2 needs 2" in results["stereo"]["error"]
    # never a silent one-speaker render: a two-face avatar with one voice is refused too
    code, results = _render([str(mono), "--avatar", str(duo), *TINY], tmp_path / "one")
    assert code == 1 and "has 2 faces: pass --speakers 2" in results["mono"]["error"]


def test_a_manifest_row_missing_a_speaker_fails_alone(tmp_path):
    _tone(tmp_path / "a.wav", 0.4, 16_000)
    _tone(tmp_path / "b.wav", 0.4, 16_000)
    with (tmp_path / "talk.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["audio_1", "audio_2", "output"], ["a.wav", "b.wav", "both.mp4"],
                                 ["a.wav", "", "half.mp4"]])
    code, results = _render([str(tmp_path / "talk.csv"), "--speakers", "2", *TINY], tmp_path / "out")
    assert code == 1 and results["both"]["status"] == "done"  # no --avatar: the built-in sketch-duo
    assert results["both"]["avatar"].startswith("duo:")
    assert results["half"]["status"] == "failed" and "no audio_2" in results["half"]["error"]


def test_avatar_new_folders_of_either_format_render(tmp_path, duo):
    spec = json.loads((duo / "avatar.json").read_text())
    assert len(spec["faces"]) == 2 and spec["faces"][0][2] <= spec["faces"][1][0]  # speaker order: left to right
    one = tmp_path / "one"
    assert runner.invoke(app, ["avatar", "new", "--seed", "7", "--size", "128", "--out", str(one)]).exit_code == 0
    assert "face_box" in json.loads((one / "avatar.json").read_text())  # the one-face format is unchanged
    clip = _tone(tmp_path / "hi.wav", 0.4, 16_000)
    stereo = tmp_path / "hi2.wav"
    sf.write(stereo, np.zeros((6400, 2), np.float32), 16_000)
    code, results = _render([str(clip), "--avatar", str(one), *TINY], tmp_path / "one-out")
    assert code == 0 and results["hi"]["status"] == "done"
    code, results = _render([str(stereo), "--avatar", str(duo), "--speakers", "2", *TINY], tmp_path / "duo-out")
    assert code == 0 and results["hi2"]["status"] == "done"


def test_fusion_drives_each_face_from_its_own_channel_too(tmp_path, duo):
    stereo = tmp_path / "pair.wav"
    sf.write(stereo, np.stack([np.full(6400, 0.1, np.float32), np.zeros(6400, np.float32)], 1), 16_000)
    code, results = _render([str(stereo), "--avatar", str(duo), "--speakers", "2", "--mode", "fusion", "--steps", "2",
                             *TINY], tmp_path / "out")
    assert code == 0 and results["pair"]["status"] == "done" and results["pair"]["frames"] == 10
    assert _decode(tmp_path / "out" / "pair.mp4")[0].shape[1:] == (32, 64, 3)
