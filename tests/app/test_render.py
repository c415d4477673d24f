"""`avatarcast render` end to end with random TINY models (CPU): mp4s read back with PyAV, resume after a
kill, bad inputs in a batch, fusion on long clips, CSV manifests, and the Ray backend on loopback."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import scipy.signal
import soundfile as sf
from typer.testing import CliRunner

from app.cli import app
from app.render import InProcessBackend, expand_inputs, render_batch
from app.render_progress import QuietReporter
from app.render_worker import RenderSettings
from audio.io import read_audio
from avatar.types import frames_for_samples
from streaming.filesink import probe_media

REPO = Path(__file__).resolve().parents[2]
SPEECH = sorted((REPO / "tests" / "fixtures" / "audio").glob("*.wav"))
RATE = 48_000
FAST = RenderSettings(decoder="torch")  # causal, default steps; torch decoder: no ONNX export in tests
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARCAST_CACHE", str(tmp_path / "cache"))  # prepared portraits stay in the test


@pytest.fixture(scope="module")
def local():
    """One in-process renderer for every test that renders with FAST settings (models load once)."""
    backend = InProcessBackend(FAST)
    yield backend
    backend.close()


def _speech_like(path: Path, seconds: float, rate: int = 16_000, seed: int = 0) -> Path:
    """Voiced syllables (harmonics of a wandering pitch, noise-modulated) with pauses: aperiodic, like speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + seed), 0, None) ** 0.5
    pcm = 0.25 * envelope * voiced * (1 + 0.2 * rng.standard_normal(t.size))
    sf.write(path, pcm.astype(np.float32), rate, subtype="PCM_16")
    return path


def _speech_inputs(tmp_path: Path) -> list[Path]:
    """The committed speech fixtures, or synthetic speech-like clips of similar length when absent."""
    if SPEECH:
        return SPEECH
    return [_speech_like(tmp_path / f"speech_{i}.wav", s, seed=i) for i, s in enumerate((6.5, 8.6))]


def _check_mp4(mp4: Path, audio_in: Path) -> dict:
    """The output's streams, timing and audio against the input (resampled to the track's rate)."""
    ref = read_audio(audio_in, sample_rate=RATE)
    info = probe_media(mp4)
    v, a = info["streams"]["video"], info["streams"]["audio"]
    frames = frames_for_samples(ref.size, RATE, 25)
    assert (v["codec"], a["codec"]) == ("h264", "aac") and info["video_size"][2] == "yuv420p"
    assert info["video_frames"] == frames
    assert v["start_s"] == a["start_s"] == 0 and info["first_video_s"] == info["first_audio_s"] == 0
    assert abs(v["duration_s"] - frames / 25) < 1e-6
    assert abs(a["duration_s"] - ref.size / RATE) < 1 / 25 and abs(info["duration_s"] - ref.size / RATE) < 1 / 25
    out = info["audio"]
    xc = scipy.signal.correlate(out, ref, mode="full", method="fft")
    lags = np.arange(-ref.size + 1, out.size)
    near = np.abs(lags) <= 2048  # the AAC priming delay, if the edit list did not remove it
    lag = int(lags[near][np.argmax(xc[near])])
    n = min(ref.size, out.size - lag)
    corr = np.corrcoef(out[lag:lag + n], ref[:n])[0, 1]
    assert abs(lag) <= 1 and corr >= 0.99, (lag, corr)
    return info


def _results(manifest: dict) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in manifest["results"]}


def test_speech_fixtures_render_to_synced_mp4s_and_a_rerun_skips_them(tmp_path, local, monkeypatch):
    inputs = _speech_inputs(tmp_path)
    out = tmp_path / "out"
    manifest = render_batch([str(p) for p in inputs], out, avatar="demo:3", settings=FAST, backend=local,
                            reporter=QuietReporter())
    assert manifest["summary"] == {**manifest["summary"], "files": 2, "done": 2, "failed": 0}
    for p in inputs:
        r = _results(manifest)[p.name]
        mp4 = out / f"{p.stem}.mp4"
        info = _check_mp4(mp4, p)
        assert r["frames"] == info["video_frames"] and r["rtf"] > 0 and r["error"] is None
        assert json.loads((out / f"{p.stem}.mp4.render.json").read_text())["result"]["frames"] == r["frames"]
    assert json.loads((out / "render-manifest.json").read_text())["results"] == manifest["results"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")}

    def no_models(*args, **kwargs):
        raise AssertionError("a rerun of finished files loaded the models")

    monkeypatch.setattr("app.render_worker.Renderer", no_models)  # the rerun's own local backend
    again = render_batch([str(p) for p in inputs], out, avatar="demo:3", settings=FAST, reporter=QuietReporter())
    assert [r["status"] for r in again["results"]] == ["skipped", "skipped"]
    assert [r["frames"] for r in again["results"]] == [r["frames"] for r in manifest["results"]]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == before


def test_resume_matches_input_bytes_and_settings_unless_forced(tmp_path, local):
    a, b = _speech_like(tmp_path / "a.wav", 0.6, seed=1), _speech_like(tmp_path / "b.wav", 0.5, seed=2)
    out, inputs = tmp_path / "out", [str(a), str(b)]

    def run(**kw):
        kw = {"avatar": "demo:0", "settings": FAST, "backend": local, **kw}
        return {k: r["status"] for k, r in _results(render_batch(inputs, out, reporter=QuietReporter(), **kw)).items()}

    assert run() == {"a.wav": "done", "b.wav": "done"}
    _speech_like(b, 0.5, seed=5)  # new audio under the same name
    assert run() == {"a.wav": "skipped", "b.wav": "done"}
    assert run(force=True) == {"a.wav": "done", "b.wav": "done"}
    assert run(avatar="demo:1") == {"a.wav": "done", "b.wav": "done"}  # another avatar
    other = RenderSettings(decoder="torch", steps=2)
    assert run(settings=other, backend="local") == {"a.wav": "done", "b.wav": "done"}  # other settings
    assert run(settings=other, backend="local") == {"a.wav": "skipped", "b.wav": "skipped"}


def test_a_killed_render_leaves_no_partial_mp4_and_the_rerun_renders_only_the_rest(tmp_path, local):
    short = _speech_like(tmp_path / "first.wav", 0.8)
    long = _speech_like(tmp_path / "second.wav", 8.0, seed=3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "app.cli", "render", str(short), str(long), "--out", str(out), "--avatar", "demo:0",
           "--model", "tiny", "--decoder", "torch", "--threads", "1", "--json-lines"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed_at = None
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "progress" and event["index"] == 1 and 0 < event["frames"] < event["frames_total"]:
                proc.send_signal(signal.SIGKILL)  # mid-file: frames of `second` are in its temporary file
                killed_at = event["frames"]
                break
            assert time.monotonic() < deadline, "no progress on the second file"
    finally:
        proc.kill()
        proc.wait(30)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in out.iterdir())
    assert "first.mp4" in names and "second.mp4" not in names and "second.mp4.render.json" not in names
    assert all(n.startswith(".second.mp4.") and n.endswith(".partial") for n in names if "second" in n)
    _check_mp4(out / "first.mp4", short)
    # no manifest yet, but the journal has every result the dead batch finished, each line whole
    assert "render-manifest.json" not in names
    lines = [json.loads(line) for line in (out / "render-manifest.json.journal").read_text().splitlines()]
    assert lines[0]["journal"] == 1 and [(Path(r["input"]).name, r["status"]) for r in lines[1:]] == [
        ("first.wav", "done")]

    manifest = render_batch([str(short), str(long)], out, avatar="demo:0", settings=FAST, backend=local,
                            reporter=QuietReporter())
    assert {k: r["status"] for k, r in _results(manifest).items()} == {"first.wav": "skipped", "second.wav": "done"}
    assert manifest["resumed"] == {"created": lines[0]["created"], "finished": [str(out / "first.mp4")]}
    _check_mp4(out / "second.mp4", long)
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]  # the dead run's temp file is gone
    assert not (out / "render-manifest.json.journal").exists()  # folded into the manifest


def _video_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(5):
            f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 25)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def test_a_mixed_batch_renders_the_good_files_and_names_the_bad_ones(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = [_speech_like(src / "good1.wav", 0.5, seed=1), _speech_like(src / "good2.flac", 0.4, seed=2)]
    (src / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEjunk" + os.urandom(2000))
    (src / "empty.wav").write_bytes(b"")
    _video_only(src / "silent_film.m4a")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["render", str(src), str(tmp_path / "missing.wav"), "--out", str(out),
                                   "--avatar", "demo:2", "--model", "tiny", "--decoder", "torch", "--jobs", "2",
                                   "--quiet"])
    assert res.exit_code == 1, res.output
    manifest = json.loads((out / "render-manifest.json").read_text())
    by_name = _results(manifest)
    assert manifest["summary"]["done"] == 2 and manifest["summary"]["failed"] == 4 and manifest["jobs"] == 2
    for p in good:
        assert by_name[p.name]["status"] == "done"
        _check_mp4(out / f"{p.stem}.mp4", p)
    causes = {"corrupt.wav": "not a recognised audio file", "empty.wav": "file is empty",
              "silent_film.m4a": "no audio stream", "missing.wav": "no such file"}
    for name, cause in causes.items():
        r = by_name[name]
        assert r["status"] == "failed" and name in r["error"] and cause in r["error"], r
        assert not (out / f"{Path(name).stem}.mp4").exists()


@pytest.mark.parametrize("mode", ["fusion", "overlap"])
def test_long_clip_modes_produce_as_many_frames_as_the_audio_needs(tmp_path, mode):
    clip = _speech_like(tmp_path / "long.wav", 2.5, seed=4)  # 63 frames = 17 latents > the 8-latent fusion window
    settings = RenderSettings(mode=mode, steps=2, decoder="torch")
    manifest = render_batch([str(clip)], tmp_path / "out", avatar="demo:1", settings=settings, reporter=QuietReporter())
    r = manifest["results"][0]
    assert r["status"] == "done", r["error"]
    assert r["frames"] == 63 == _check_mp4(tmp_path / "out" / "long.mp4", clip)["video_frames"]


def test_csv_manifest_with_portraits_emotions_and_outputs(tmp_path, local):
    import cv2
    from skimage.data import astronaut

    cv2.imwrite(str(tmp_path / "face.png"), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    mirrored = np.ascontiguousarray(astronaut()[:, ::-1])  # stands in for an emotion reference of the same face
    cv2.imwrite(str(tmp_path / "smile.png"), cv2.cvtColor(mirrored, cv2.COLOR_RGB2BGR))
    _speech_like(tmp_path / "one.wav", 0.5, seed=1)
    _speech_like(tmp_path / "two.wav", 0.4, seed=2)
    with open(tmp_path / "batch.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["audio", "avatar", "emotion", "output"],
                     ["one.wav", "face.png", "smile.png", "lessons/first.mp4"],
                     ["two.wav", "demo:4", "", ""],
                     ["two.wav", "demo:4", "happy", "two-happy.mp4"],
                     ["two.wav", "demo:4", "smile.png", "two-smile.mp4"]])
    out = tmp_path / "out"
    manifest = render_batch([str(tmp_path / "batch.csv")], out, settings=FAST, backend=local, reporter=QuietReporter())
    rows = manifest["results"]
    assert [(Path(r["output"]).relative_to(out).as_posix(), r["status"]) for r in rows] == [
        ("lessons/first.mp4", "done"), ("two.mp4", "done"), ("two-happy.mp4", "done"), ("two-smile.mp4", "failed")]
    assert "is one of neutral, happy, sad, surprised" in rows[3]["error"]
    _check_mp4(out / "lessons" / "first.mp4", tmp_path / "one.wav")
    assert any((tmp_path / "cache" / "avatars").iterdir())  # the portrait was prepared once and cached
    assert not any("warning" in r for r in rows)  # random TINY weights declare no domain: a photo is fine


def test_a_portrait_out_of_the_models_domain_renders_with_a_warning(tmp_path, monkeypatch):
    import cv2
    from skimage.data import astronaut

    from app import render_worker
    from avatar.domain import ModelDomain

    load = render_worker.load_models
    # a domain no portrait reaches, so the TINY model warns about any: the path matters here, not the
    # threshold (tests/avatar/test_domain.py measures the demo model's)
    strict = ModelDomain("drawn faces", min_psnr_db=200.0)
    monkeypatch.setattr(render_worker, "load_models", lambda *a, **k: dataclasses.replace(load(*a, **k), domain=strict))
    cv2.imwrite(str(tmp_path / "me.png"), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    audio = _speech_like(tmp_path / "hello.wav", 0.4)
    out, err = tmp_path / "out", io.StringIO()
    backend = InProcessBackend(FAST)
    try:
        first = render_batch([str(audio)], out, avatar=str(tmp_path / "me.png"), settings=FAST, backend=backend,
                             reporter=QuietReporter(err))
    finally:
        backend.close()
    r = first["results"][0]
    assert r["status"] == "done" and r["frames"] > 0  # a warning, never a refusal
    assert "me.png looks unlike the drawn faces" in r["warning"] and "Using real weights" in r["warning"]
    assert f"warning: {audio}: {r['warning']}\n" in err.getvalue()  # --quiet says it on stderr
    again = render_batch([str(audio)], out, avatar=str(tmp_path / "me.png"), settings=FAST, reporter=QuietReporter())
    assert again["results"][0]["status"] == "skipped" and again["results"][0]["warning"] == r["warning"]


def test_inputs_expand_from_directories_globs_and_report_collisions(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ("a/x.wav", "a/deep/y.mp3", "a/notes.txt", "b.wav", "c/b.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    out = tmp_path / "out"
    jobs, failed = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.wav"), str(tmp_path / "c" / "b.wav"),
                                  str(tmp_path / "b.wav"), str(tmp_path / "nothing*.ogg")], out, "demo:0")
    assert [Path(j.output).relative_to(out).as_posix() for j in jobs] == ["deep/y.mp4", "x.mp4", "b.mp4"]
    assert [(Path(f["input"]).name, f["error"].split(";")[0]) for f in failed] == [
        ("nothing*.ogg", "the pattern matched no files"),
        ("b.wav", f"{out / 'b.mp4'} is already the output of {tmp_path / 'b.wav'}")]
    assert expand_inputs([str(tmp_path / "b.wav")], out)[0][0].avatar == "demo:1000007"  # the built-in avatar
    (tmp_path / "bad.csv").write_text("file,face\nb.wav,demo:1\n")
    with pytest.raises(ValueError, match="needs an 'audio' column"):
        expand_inputs([str(tmp_path / "bad.csv")], out, "demo:0")


def test_usage_errors_are_one_line(tmp_path):
    clip = str(_speech_like(tmp_path / "a.wav", 0.2))
    for args, message in ((["--mode", "sideways"], "unknown mode"),
                          (["--model", "huge"], "unknown model"), (["--avatar", "demo:x"], "integer seed"),
                          (["--quiet", "--json-lines"], "exclude each other")):
        res = CliRunner().invoke(app, ["render", clip, "--out", str(tmp_path / "o"), "--avatar", "demo:0", *args])
        assert isinstance(res.exception, ValueError) and message in str(res.exception), (args, res.exception)


RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from app.render import render_batch
    from app.render_progress import QuietReporter
    from app.render_worker import RenderSettings

    class Counting(QuietReporter):
        events = {}
        def progress(self, index, frames, total):
            self.events[index] = frames
    reporter = Counting()
    out, inputs = sys.argv[1], sys.argv[2:]
    manifest = render_batch(inputs, out, avatar="demo:5", settings=RenderSettings(decoder="torch"), jobs=2,
                            backend="ray", reporter=reporter)
    nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    ray.shutdown()
    print("RESULT " + json.dumps({"manifest": manifest, "nodes": nodes, "progress": reporter.events}))
""")


def _loopback_namespace_works() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot create a network namespace here: {probe.stderr.strip()}"


@pytest.mark.slow  # 15-30 s here: a real Ray cluster (ray.init(num_cpus=2)) plus two actors loading the models
def test_ray_backend_renders_the_same_files_as_local_on_loopback_only(tmp_path, local):
    pytest.importorskip("ray", reason="the Ray backend needs the 'ray' extra")
    reason = _loopback_namespace_works()
    if reason:
        pytest.skip(reason)
    inputs = [str(_speech_like(tmp_path / "a.wav", 1.2, seed=6)), str(_speech_like(tmp_path / "b.wav", 0.9, seed=7))]
    script = tmp_path / "ray_render.py"
    script.write_text(RAY_SCRIPT)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    # a fresh network namespace with only lo: Ray can bind nothing but 127.0.0.1
    shell = f"ip link set lo up && exec {sys.executable} {script} {tmp_path / 'ray'} {' '.join(inputs)}"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", shell], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert got["nodes"] == ["127.0.0.1"] and got["manifest"]["backend"] == "ray"
    assert [r["status"] for r in got["manifest"]["results"]] == ["done", "done"]
    frames = {i: r["frames"] for i, r in enumerate(got["manifest"]["results"])}
    assert {int(k): v for k, v in got["progress"].items()} == frames  # progress reached the driver, to the last frame

    render_batch(inputs, tmp_path / "local", avatar="demo:5", settings=FAST, backend=local, reporter=QuietReporter())
    for name in ("a", "b"):
        ray_mp4, local_mp4 = tmp_path / "ray" / f"{name}.mp4", tmp_path / "local" / f"{name}.mp4"
        ray_info, local_info = _check_mp4(ray_mp4, tmp_path / f"{name}.wav"), probe_media(local_mp4)
        assert ray_info["video_frames"] == local_info["video_frames"]
        np.testing.assert_array_equal(ray_info["audio"], local_info["audio"])
        # the same pictures up to float noise (1 vs 2 torch threads) and x264's coding noise: >= 30 dB PSNR
        # (another avatar gives about 20 dB)
        with av.open(str(ray_mp4)) as r, av.open(str(local_mp4)) as loc:
            for fr, fl in zip(r.decode(video=0), loc.decode(video=0)):
                err = fr.to_ndarray(format="rgb24").astype(float) - fl.to_ndarray(format="rgb24")
                assert 10 * np.log10(255**2 / max(np.mean(err**2), 1e-9)) >= 30


def test_reporters_show_frames_rate_rtf_and_eta(tmp_path):
    from rich.console import Console

    from app.render_progress import JsonLinesReporter, RichReporter
    from app.render_worker import RenderJob

    jobs = [RenderJob(0, "a.wav", "a.mp4", "demo:0"), RenderJob(1, "b.wav", "b.mp4", "demo:0")]
    done = {"index": 0, "input": "a.wav", "output": "a.mp4", "status": "done", "frames": 50, "rtf": 2.0,
            "duration_s": 2.0, "wall_s": 1.0, "error": None}
    failed = {**done, "index": 1, "input": "b.wav", "status": "failed", "frames": None,
              "error": "AudioReadError: b.wav: empty"}
    manifest = {"summary": {"files": 2, "done": 1, "skipped": 0, "failed": 1}, "path": "m.json"}

    buf = io.StringIO()
    rich = RichReporter(Console(file=buf, width=120, force_terminal=False))
    rich.begin(jobs)
    for frames in (0, 10, 25):
        rich.progress(0, frames, 50)
        time.sleep(0.05)
    assert rich.bars.tasks[0].total == 100  # b.wav not started: counted at a.wav's length
    assert rich.bars.tasks[0].speed and "fps  RTF" in str(rich.bars.columns[3].render(rich.bars.tasks[1]))
    rich.finished(done)
    rich.finished(failed)
    rich.summary(manifest)
    text = buf.getvalue()
    assert "✓ a.wav -> a.mp4 (done: 50 frames, RTF 2.0)" in text and "✗ b.wav: AudioReadError: b.wav: empty" in text
    assert "1 rendered, 0 already done, 1 failed" in text

    buf = io.StringIO()
    lines = JsonLinesReporter(buf)
    lines.begin(jobs)
    lines.progress(0, 0, 50)
    time.sleep(0.05)
    lines.progress(0, 25, 50)
    lines.finished(done)
    lines.finished(failed)
    lines.summary(manifest)
    events = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "progress", "progress", "done", "failed", "summary"]
    assert events[2]["fps"] > 0 and events[2]["rtf"] == round(events[2]["fps"] / 25, 2) and events[2]["eta_s"] > 0
    assert events[4]["error"].startswith("AudioReadError") and events[5]["failed"] == 1

    from app.render_progress import QuietReporter

    padded = {**done, "warning": "speaker 2 (b.wav) is 1.5 s shorter than the longest track: padded with silence"}
    err = io.StringIO()
    QuietReporter(err).finished(padded)
    assert err.getvalue() == f"warning: a.wav: {padded['warning']}\n"  # --quiet says it too
    buf = io.StringIO()
    rich = RichReporter(Console(file=buf, width=200, force_terminal=False))
    rich.begin(jobs[:1])
    rich.finished(padded)
    rich.summary({**manifest, "summary": {"files": 1, "done": 1, "skipped": 0, "failed": 0}})
    assert "RTF 2.0; warning: speaker 2 (b.wav) is 1.5 s shorter" in buf.getvalue()


def test_the_demo_model_folder_loads_with_its_lora_merged(tmp_path):
    """The shipped layout: model.safetensors (core) + lora.safetensors (own file) + vae.safetensors."""
    from app.render_worker import demo_model_available, load_demo_models
    from models.config import DEMO, VAE_DEMO
    from models.dit import WanDiT
    from models.loading import save_dit
    from models.lora import inject_lora
    from models.vae import WanVAE
    from models.vae_loading import save_vae

    torch.manual_seed(0)
    dit = WanDiT(DEMO)
    inject_lora(dit, DEMO.lora_rank, DEMO.lora_alpha, DEMO.lora_targets)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained-looking adapter, so merging changes the weights
    save_dit(dit.eval(), tmp_path)
    save_vae(WanVAE(VAE_DEMO), tmp_path / "vae.safetensors")
    assert demo_model_available(tmp_path) and not demo_model_available(tmp_path / "nope")
    bundle = load_demo_models(tmp_path, device="cpu")
    assert bundle.name == "demo" and bundle.frame_hw == (128, 128)
    assert not any(".lora_" in k for k in bundle.dit.state_dict())  # merged, not carried as adapters
    x = torch.randn(1, 16, 2, 16, 16)
    y = torch.cat([x[:, :, :1].expand(-1, -1, 2, -1, -1), torch.ones(1, 1, 2, 16, 16)], 1)
    t = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(bundle.dit(x, t, None, y=y), dit(x, t, None, y=y), atol=1e-4, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_demo_models(tmp_path / "nope")
