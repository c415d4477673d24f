"""`avatarcast render` under abuse and faults: outputs that try to leave --out, devices and FIFOs as
inputs, a file that decodes to hours, a full disk, side files written by parallel writers, SIGTERM
mid-batch (with and without worker processes) and a worker process that dies."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_render import FAST, REPO, _check_mp4, _results, _speech_like
from typer.testing import CliRunner

from app.cli import app
from app.render import InProcessBackend, expand_inputs, render_batch
from app.render_progress import QuietReporter
from app.render_worker import RenderSettings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARCAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def local():
    backend = InProcessBackend(FAST)
    yield backend
    backend.close()


def test_csv_outputs_stay_inside_out_unless_allowed(tmp_path, local):
    _speech_like(tmp_path / "one.wav", 0.3, seed=1)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere)  # a folder inside OUT that leads out of it
    escapes = ["../../x.mp4", "../sibling.mp4", str(elsewhere / "abs.mp4"), "sub/../../esc.mp4", "link/via.mp4",
               "."]
    with open(tmp_path / "batch.csv", "w", newline="") as f:
        csv.writer(f).writerows([["audio", "avatar", "output"], ["one.wav", "demo:0", "fine/one.mp4"],
                                 *[["one.wav", "demo:0", e] for e in escapes]])
    jobs, failed = expand_inputs([str(tmp_path / "batch.csv")], out)
    assert [Path(j.output).relative_to(out).as_posix() for j in jobs] == ["fine/one.mp4"]
    assert len(failed) == len(escapes) and all("outside --out" in f["error"] for f in failed), failed
    assert "--allow-outside-out" in failed[0]["error"]
    manifest = render_batch([str(tmp_path / "batch.csv")], out, settings=FAST, backend=local, reporter=QuietReporter())
    assert manifest["summary"]["done"] == 1 and manifest["summary"]["failed"] == len(escapes)
    assert not list(elsewhere.iterdir()) and not (tmp_path / "sibling.mp4").exists()
    # allowed: the absolute output is written where it says; an output over its own input never is
    with open(tmp_path / "two.csv", "w", newline="") as f:
        csv.writer(f).writerows([["audio", "avatar", "output"], ["one.wav", "demo:0", str(elsewhere / "abs.mp4")],
                                 ["one.wav", "demo:0", str(tmp_path / "one.wav")]])
    res = CliRunner().invoke(app, ["render", str(tmp_path / "two.csv"), "--out", str(out), "--model", "tiny",
                                   "--decoder", "torch", "--quiet", "--allow-outside-out"])
    assert res.exit_code == 1, res.output
    by_output = {Path(r["output"]).name: r for r in json.loads((out / "render-manifest.json").read_text())["results"]}
    assert by_output["abs.mp4"]["status"] == "done" and (elsewhere / "abs.mp4").is_file()
    assert "is the input itself" in by_output["one.wav"]["error"]
    assert sf.info(str(tmp_path / "one.wav")).duration > 0  # the input is untouched


def test_devices_and_fifos_are_refused_at_once(tmp_path):
    clip = _speech_like(tmp_path / "ok.wav", 0.3)
    os.mkfifo(tmp_path / "pipe.wav")  # nobody writes to it: reading it would wait forever
    os.mkfifo(tmp_path / "face.png")
    folder = tmp_path / "avatar"
    assert CliRunner().invoke(app, ["avatar", "new", "--seed", "1", "--out", str(folder), "--size", "64"]).exit_code == 0
    (folder / "sad.png").unlink()
    os.mkfifo(folder / "sad.png")
    t0 = time.monotonic()
    manifest = render_batch(["/dev/zero", str(tmp_path / "pipe.wav"), str(tmp_path)], tmp_path / "out",
                            avatar="demo:0", settings=FAST, reporter=QuietReporter())
    by_input = {r["input"]: r for r in manifest["results"]}
    for name in ("/dev/zero", str(tmp_path / "pipe.wav")):
        assert by_input[name]["status"] == "failed" and "not a regular file" in by_input[name]["error"], by_input
    # a FIFO as the portrait or inside an avatar folder is refused before the worker would open it
    for avatar in (str(tmp_path / "face.png"), str(folder)):
        m = render_batch([str(clip)], tmp_path / "out2", avatar=avatar, settings=FAST, reporter=QuietReporter())
        assert m["results"][0]["status"] == "failed" and "not a regular file" in m["results"][0]["error"], m
    assert time.monotonic() - t0 < 60  # on the code before, the first batch never ended


def test_a_file_that_decodes_to_hours_is_refused_before_decoding(tmp_path, local, monkeypatch):
    long = tmp_path / "two_hours.flac"  # 180 kB: two hours of silence compress to almost nothing
    with sf.SoundFile(long, "w", samplerate=8000, channels=1, subtype="PCM_16", format="FLAC") as f:
        for _ in range(12):
            f.write(np.zeros(8000 * 600, np.int16))
    assert long.stat().st_size < 400_000
    settings = replace(FAST, max_duration_s=3600.0)
    t0 = time.monotonic()
    r = render_batch([str(long)], tmp_path / "out", avatar="demo:0", settings=settings,
                     backend=InProcessBackend(settings), reporter=QuietReporter())["results"][0]
    assert r["status"] == "failed" and "lasts 7200.0 s, more than --max-duration 3600 s" in r["error"], r
    assert time.monotonic() - t0 < 30  # decoding it at 48 kHz would take minutes and 1.4 GB
    # a header that understates (here: says nothing) is caught while decoding, as soon as the cap is passed
    clip = _speech_like(tmp_path / "three.wav", 3.0)
    monkeypatch.setattr("app.render_worker.audio_duration", lambda path: None)
    settings = replace(FAST, max_duration_s=1.0)
    r = render_batch([str(clip)], tmp_path / "out", avatar="demo:0", settings=settings,
                     backend=InProcessBackend(settings), reporter=QuietReporter())["results"][0]
    assert r["status"] == "failed" and "longer than the 1 s allowed" in r["error"], r
    assert not (tmp_path / "out" / "three.mp4").exists()
    assert RenderSettings(max_duration_s=1.0).output_key() == RenderSettings().output_key()  # how, not what


def test_a_disk_that_fills_up_leaves_no_partial_output_under_the_final_name(tmp_path, local, monkeypatch):
    import errno

    from streaming import filesink

    clip = _speech_like(tmp_path / "full.wav", 1.0)
    out = tmp_path / "out"
    real_write, writes = filesink.AvSink.write, []

    def write(self, frame):
        writes.append(frame.pts)
        if len(writes) == 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, frame)

    monkeypatch.setattr(filesink.AvSink, "write", write)
    r = render_batch([str(clip)], out, avatar="demo:0", settings=FAST, backend=local,
                     reporter=QuietReporter())["results"][0]
    assert r["status"] == "failed" and "No space left on device" in r["error"], r
    assert sorted(p.name for p in out.iterdir()) == ["render-manifest.json"]  # no mp4, no partial, no sidecar
    monkeypatch.undo()
    # full while the finished file is made durable (fsync before the rename): nothing under the final name
    monkeypatch.setattr(filesink, "fsync_path", lambda path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    r = render_batch([str(clip)], out, avatar="demo:0", settings=FAST, backend=local,
                     reporter=QuietReporter())["results"][0]
    assert r["status"] == "failed" and "full" in r["error"]
    assert sorted(p.name for p in out.iterdir()) == ["render-manifest.json"]
    monkeypatch.undo()
    # full while the manifest is written: the old one stays whole, the journal keeps every result
    ok = render_batch([str(clip)], out, avatar="demo:0", settings=FAST, backend=local, reporter=QuietReporter())
    before = (out / "render-manifest.json").read_text()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError, match="full"):
        render_batch([str(clip)], out, avatar="demo:0", settings=FAST, backend=local, reporter=QuietReporter(),
                     force=True)
    monkeypatch.undo()
    assert (out / "render-manifest.json").read_text() == before and ok["summary"]["done"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_side_files_are_written_durably_under_unique_temporary_names(tmp_path, monkeypatch):
    import threading

    from app import render_journal

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(render_journal.os, "fsync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    target = tmp_path / "x.render.json"
    render_journal.write_json_atomic(target, {"n": 0})
    assert synced[-2].startswith(str(tmp_path / ".x.render.json.")) and synced[-1] == str(tmp_path)  # file, then dir
    # writers in parallel (threads of one process share the pid): each rename is whole
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(30):
                render_journal.write_json_atomic(target, {"n": n, "i": i, "pad": "x" * 5000})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(target.read_text())["i"] == 29
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.render.json"]


def _render_cli(args: list[str], out: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.cli", "render", *args, "--out", str(out), "--avatar", "demo:0", "--model",
           "tiny", "--decoder", "torch", "--threads", "1", "--json-lines"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **popen.pop("env", {})}, **popen)


def _until_progress(proc: subprocess.Popen, index: int, after_done: int | None = None, timeout: float = 180) -> int:
    """Read JSON lines until file `index` is part-way (and, with `after_done`, that file is done);
    returns its frames so far."""
    deadline, done = time.monotonic() + timeout, after_done is None
    for line in proc.stdout:
        event = json.loads(line)
        done = done or (event["event"] == "done" and event["index"] == after_done)
        if done and event["event"] == "progress" and event["index"] == index and \
                0 < event["frames"] < event["frames_total"]:
            return event["frames"]
        assert time.monotonic() < deadline, f"no progress on file {index}"
    raise AssertionError(f"the render ended before file {index} was part-way: {proc.stderr.read()[-2000:]}")


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment carries `marker` (the render and every worker it spawned)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_during_a_render_exits_cleanly_with_a_correct_manifest(tmp_path, jobs):
    first = _speech_like(tmp_path / "first.wav", 0.4)
    long = _speech_like(tmp_path / "second.wav", 6.0, seed=3)
    more = [str(_speech_like(tmp_path / f"more{i}.wav", 4.0, seed=4 + i)) for i in range(jobs)]
    out, marker = tmp_path / "out", f"AVATARCAST_TEST_RUN={os.getpid()}-{jobs}-{time.monotonic_ns()}"
    proc = _render_cli([str(first), str(long), *more, "--jobs", str(jobs)], out,
                       env=dict([marker.split("=")]))
    try:
        _until_progress(proc, 1, after_done=0)  # first.wav done, second.wav part-way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM, as a shell reports it
    assert "Traceback" not in err
    manifest = json.loads((out / "render-manifest.json").read_text())
    status = {Path(r["input"]).name: r["status"] for r in manifest["results"]}
    assert manifest["interrupted"] == "SIGTERM" and status["first.wav"] == "done", status
    assert status["second.wav"] == "interrupted" and manifest["summary"]["interrupted"] >= 1, status
    for name, s in status.items():
        mp4 = out / f"{Path(name).stem}.mp4"
        assert mp4.exists() == (s == "done"), (name, s)
    assert not [p.name for p in out.iterdir() if p.name.endswith((".partial", ".tmp", ".journal"))]
    for _ in range(50):  # the workers went with it
        if not _processes_with(marker):
            break
        time.sleep(0.1)
    assert not _processes_with(marker)
    _check_mp4(out / "first.mp4", first)


def test_a_worker_that_dies_fails_only_its_own_file(tmp_path):
    """A worker process killed (SIGKILL, as the OOM killer does) while it renders crash.wav: with
    --jobs 2 every other file is still rendered. The kill is injected into the spawned workers only,
    through a sitecustomize module on their PYTHONPATH."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, signal, sys
        if "multiprocessing" in " ".join(sys.argv) or "spawn_main" in " ".join(sys.argv):
            import app.render_worker as rw
            render = rw.Renderer.render
            def crashing(self, job, on_progress=None):
                if os.path.basename(job.audio) == "crash.wav":
                    os.kill(os.getpid(), signal.SIGKILL)
                return render(self, job, on_progress)
            rw.Renderer.render = crashing
    """))
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["a.wav", "crash.wav", "b.wav", "c.wav"]):
        _speech_like(src / name, 0.5, seed=i)
    out = tmp_path / "out"
    proc = _render_cli([str(src), "--jobs", "2"], out, env={"PYTHONPATH": str(hook)})
    _, err = proc.communicate(timeout=280)
    assert proc.returncode == 1, err[-3000:]
    results = _results(json.loads((out / "render-manifest.json").read_text()))
    assert {k: r["status"] for k, r in results.items()} == {"a.wav": "done", "b.wav": "done", "c.wav": "done",
                                                           "crash.wav": "failed"}, results
    assert "worker process died while rendering it" in results["crash.wav"]["error"]
    for name in ("a", "b", "c"):
        _check_mp4(out / f"{name}.mp4", src / f"{name}.wav")
