"""`avatarcast render`: audio files -> talking-avatar mp4s, many at a time, resumable.

    INPUT... (files, directories, globs, CSV manifests) --expand_inputs--> jobs
      --plan: input hash + settings vs the output's sidecar--> skipped | pending
      --backend: in this process | a process pool (--jobs N) | Ray actors (--backend ray)--> results
      --> reporter (rich / JSON lines / quiet), manifest JSON, exit code 1 if any file failed

Each worker loads the models once (`app.render_worker.Renderer`) and renders files one after another;
each output is written to a temporary file and renamed when complete, then its sidecar
(`<output>.render.json`: the key and the result) is written, so a killed batch leaves finished files,
no truncated mp4, and a rerun renders only what is missing. A bad input fails its own entry only.
"""

from __future__ import annotations

import atexit
import csv
import glob
import hashlib
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from app.render_progress import Reporter, make_reporter
from app.render_worker import (
    MODELS,
    RenderJob,
    RenderSettings,
    default_avatar,
    demo_label,
    names_emotions,
    parse_avatar,
    read_sidecar,
    write_json_atomic,
)

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aiff", ".aif"}
KEY_FORMAT = 1  # bump when the rendering changes in a way the settings do not show
MANIFEST_NAME = "render-manifest.json"
POLL_S = 0.1


# ---- 1. inputs -> jobs ---------------------------------------------------------------------------------
def expand_inputs(inputs: list[str], out_dir: Path, avatar: str | None = None,
                  emotion: str | None = None) -> tuple[list[RenderJob], list[dict]]:
    """Audio files, directories (searched recursively for audio extensions; the tree is mirrored under
    out_dir), globs, and CSV manifests (columns audio, avatar, emotion, output; relative paths are read
    from the CSV's directory, relative outputs from out_dir). Returns (jobs, failed entries): a missing
    file, an empty glob or two inputs wanting the same output fail alone."""
    rows: list[tuple[str, Path, str | None, str | None]] = []  # (audio, output, avatar, emotion)
    failed: list[dict] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            rows += _csv_rows(p, out_dir)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                kinds = ", ".join(sorted(AUDIO_EXTENSIONS))
                failed.append(_failure(item, None, f"no audio files ({kinds}) in the directory"))
            rows += [(str(f), out_dir / f.relative_to(p).with_suffix(".mp4"), None, None) for f in found]
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                failed.append(_failure(item, None, "the pattern matched no files"))
            rows += [(str(f), out_dir / f"{f.stem}.mp4", None, None) for f in found]
        else:  # a file, or a missing one (reported by the worker, naming the file)
            rows.append((item, out_dir / f"{p.stem}.mp4", None, None))
    jobs: list[RenderJob] = []
    owner: dict[Path, str] = {}
    seen: set[tuple[str, Path]] = set()
    for audio, output, row_avatar, row_emotion in rows:
        output = Path(os.path.abspath(output))
        audio = os.path.abspath(audio)
        if (audio, output) in seen:
            continue  # the same file named twice (a file and a glob over it)
        seen.add((audio, output))
        if output in owner:
            failed.append(_failure(audio, str(output), f"{output} is already the output of {owner[output]}; "
                                   "name outputs in a CSV manifest's output column"))
            continue
        owner[output] = audio
        chosen = row_avatar or avatar or default_avatar()  # none given: the built-in avatar `serve` uses
        chosen_emotion = row_emotion or emotion
        if chosen_emotion and not names_emotions(chosen):  # demo and folder avatars name their emotions
            chosen_emotion = os.path.abspath(chosen_emotion)
        jobs.append(RenderJob(index=0, audio=audio, output=str(output), avatar=_abs_avatar(chosen),
                              emotion=chosen_emotion or None))
    return jobs, failed


def _csv_rows(path: Path, out_dir: Path) -> list[tuple[str, Path, str | None, str | None]]:
    base = path.parent
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "audio" not in columns:
            raise ValueError(f"{path}: a CSV manifest needs an 'audio' column (has: {', '.join(columns) or 'none'}); "
                             "optional: avatar, emotion, output")
        rows = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row["audio"]:
                continue
            audio = base / row["audio"]
            output = out_dir / row["output"] if row.get("output") else out_dir / f"{audio.stem}.mp4"
            avatar = row.get("avatar") or None
            if avatar and not avatar.startswith("demo:"):
                avatar = str(base / avatar)
            emotion = row.get("emotion") or None
            # demo and folder avatars name their emotions; an image is read from the CSV's directory
            if emotion and not (names_emotions(avatar) if avatar else not (base / emotion).exists()):
                emotion = str(base / emotion)
            rows.append((str(audio), output, avatar, emotion))
    return rows


def _abs_avatar(spec: str) -> str:
    return spec if parse_avatar(spec)[0] == "demo" else os.path.abspath(spec)


def _folder_sha256(folder: str) -> str:
    """An `avatar new` folder's files (avatar.json and its images), by name and content."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps([[p.name, _sha256(str(p))] for p in files]).encode()).hexdigest()


def _failure(audio: str, output: str | None, error: str) -> dict:
    return {"index": -1, "input": audio, "output": output, "status": "failed", "duration_s": None, "frames": None,
            "wall_s": None, "rtf": None, "error": error}


# ---- 2. resume: what is already done -----------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def job_key(job: RenderJob, settings: RenderSettings) -> str:
    """Hash of the audio, portrait and emotion bytes and the settings that change the output."""
    kind, value = parse_avatar(job.avatar)
    if kind == "demo":
        avatar = f"demo:{value}"
    else:
        avatar = _folder_sha256(str(value)) if kind == "folder" else _sha256(str(value))
    parts = {"format": KEY_FORMAT, "audio": _sha256(job.audio), "settings": settings.output_key(), "avatar": avatar,
             "emotion": (job.emotion if kind != "portrait" else _sha256(job.emotion)) if job.emotion else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def plan(jobs: list[RenderJob], settings: RenderSettings, force: bool) -> tuple[list[RenderJob], list[dict]]:
    """(jobs to render, each with its key; results for outputs already done). Inputs that cannot be
    hashed (missing, unreadable) still go to a worker, which reports them with the real reader's error."""
    pending, skipped = [], []
    for job in jobs:
        try:
            key = job_key(job, settings)
        except OSError:
            pending.append(job)
            continue
        job = replace(job, key=key)
        done = read_sidecar(job.output) or {}
        if not force and done.get("key") == key and isinstance(done.get("result"), dict) and Path(job.output).is_file():
            # duration, frames, wall time and RTF are those of the render that made the file
            skipped.append({"index": job.index, "input": job.audio, "output": job.output, "avatar": job.avatar,
                            "status": "skipped", **done["result"], "error": None})
        else:
            pending.append(job)
    return pending, skipped


# ---- 3. backends: jobs in, results out, progress on the driver ---------------------------------------
ProgressFn = Callable[[int, int, int], None]


class Backend(Protocol):
    name: str  # local | ray
    settings: RenderSettings

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]: ...

    def close(self) -> None: ...


class InProcessBackend:
    """One Renderer in this process, files one after another. The models load on the first file and stay
    loaded until `close()`, so one backend can serve several batches."""

    name = "local"

    def __init__(self, settings: RenderSettings, threads: int | None = None) -> None:
        self.settings, self.threads = settings, threads  # torch threads, process-wide (None: torch's default)
        self.renderer = None

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        if self.renderer is None:
            from app.render_worker import Renderer

            self.renderer = Renderer(self.settings, threads=self.threads)
        for job in jobs:
            yield self.renderer.render(job, on_progress)

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None


_worker = None  # the Renderer of a pool process
_events = None  # its progress queue back to the driver


def _init_pool_worker(settings: RenderSettings, events, threads: int) -> None:
    global _worker, _events
    from app.render_worker import Renderer

    _worker, _events = Renderer(settings, threads=threads), events
    atexit.register(_close_pool_worker)


def _close_pool_worker() -> None:
    """Stop the engine and drop the models before the worker's interpreter shuts down."""
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


def _pool_render(job: RenderJob) -> dict:
    return _worker.render(job, lambda *event: _events.put(event))


class ProcessPoolBackend:
    """N worker processes (spawned: no forked torch state), each loading the models once and sharing the
    CPU cores; progress comes back through a multiprocessing queue."""

    name = "local"

    def __init__(self, settings: RenderSettings, workers: int, threads: int | None = None) -> None:
        self.settings, self.workers, self.threads = settings, workers, threads

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        ctx = multiprocessing.get_context("spawn")
        events = ctx.Queue()
        workers = min(self.workers, len(jobs))
        threads = self.threads or max(1, (os.cpu_count() or 1) // workers)  # the workers share the cores
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                                 initargs=(self.settings, events, threads)) as pool:
            futures = {pool.submit(_pool_render, job): job for job in jobs}
            while futures:
                finished, _ = wait(futures, timeout=POLL_S, return_when=FIRST_COMPLETED)
                _drain(events, on_progress)
                for fut in finished:
                    job = futures.pop(fut)
                    try:
                        yield fut.result()
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        yield _failure_of(job, f"worker failed: {type(exc).__name__}: {exc}")
            _drain(events, on_progress)

    def close(self) -> None:
        pass  # the pool lives only as long as one run


def _drain(events, on_progress: ProgressFn) -> None:
    while True:
        try:
            on_progress(*events.get_nowait())
        except queue.Empty:
            return


def _failure_of(job: RenderJob, error: str) -> dict:
    return {**_failure(job.audio, job.output, error), "index": job.index, "avatar": job.avatar}


class RenderActor:
    """A Ray actor around a Renderer: models loaded once, files rendered one at a time."""

    def __init__(self, settings: RenderSettings, events, threads: int | None = None) -> None:
        from app.render_worker import Renderer

        self.renderer, self.events = Renderer(settings, threads=threads), events

    def render(self, job: RenderJob) -> dict:
        return self.renderer.render(job, lambda *event: self.events.put_nowait(event))


class RayBackend:
    """N Ray actors (one CPU each, plus one GPU where the cluster has GPUs); the driver hands each idle
    actor the next file and drains the actors' progress queue. Inputs and outputs must be on storage the
    workers share with the driver (one machine, or a shared filesystem)."""

    name = "ray"

    def __init__(self, settings: RenderSettings, workers: int, address: str | None = None,
                 threads: int | None = None) -> None:
        self.settings, self.workers, self.address, self.threads = settings, workers, address, threads

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        try:
            import ray
            from ray.util.queue import Empty, Queue
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install 'avatarcast[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        events = Queue(actor_options={"num_cpus": 0})
        actor_cls = ray.remote(RenderActor).options(num_cpus=1, num_gpus=gpus)
        idle = [actor_cls.remote(self.settings, events, self.threads) for _ in range(min(self.workers, len(jobs)))]
        todo, running = list(jobs), {}
        try:
            while todo or running:
                while idle and todo:
                    actor, job = idle.pop(), todo.pop(0)
                    running[actor.render.remote(job)] = (actor, job)
                if not running:  # every actor died
                    for job in todo:
                        yield _failure_of(job, "no Ray worker left to render it")
                    return
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                self._drain(events, Empty, on_progress)
                for ref in ready:
                    actor, job = running.pop(ref)
                    try:
                        result = ray.get(ref)
                        idle.append(actor)
                    except ray.exceptions.RayError as exc:  # the actor died; do not reuse it
                        result = _failure_of(job, f"Ray worker failed: {type(exc).__name__}: {exc}")
                    yield result
            self._drain(events, Empty, on_progress)
        finally:
            for actor in idle + [a for a, _ in running.values()]:
                ray.kill(actor)
            events.shutdown(force=True)

    def close(self) -> None:
        pass  # actors live only as long as one run; the Ray connection stays for the caller

    @staticmethod
    def _drain(events, empty, on_progress: ProgressFn) -> None:
        try:
            batch = events.get_nowait_batch(events.qsize())
        except empty:
            return
        for event in batch:
            on_progress(*event)


def make_backend(name: str, settings: RenderSettings, jobs: int, address: str | None, threads: int | None = None):
    """threads: torch intra-op threads per worker (default: all cores in process, cores / jobs in a pool,
    Ray's OMP_NUM_THREADS = 1 in an actor). 1 avoids thread-pool stalls on an oversubscribed CPU."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if name == "ray":
        return RayBackend(settings, jobs, address, threads)
    if name != "local":
        raise ValueError(f"unknown backend {name!r}; use local or ray")
    if address:
        raise ValueError("--address is for --backend ray")
    return InProcessBackend(settings, threads) if jobs == 1 else ProcessPoolBackend(settings, jobs, threads)


# ---- 4. the batch ----------------------------------------------------------------------------------------
def render_batch(inputs: list[str], out_dir: str | Path, *, avatar: str | None = None, emotion: str | None = None,
                 settings: RenderSettings = RenderSettings(), jobs: int = 1, backend: str | Backend = "local",
                 address: str | None = None, threads: int | None = None, force: bool = False,
                 manifest_path: str | Path | None = None, reporter: Reporter | None = None) -> dict:
    """Render every input; returns the manifest (also written to `manifest_path`, by default
    OUT/render-manifest.json). `backend` is a name (local, ray) or a backend object the caller keeps
    (and closes). Usage errors (no inputs, bad settings) raise ValueError."""
    settings.validate()
    if not isinstance(backend, str) and backend.settings != settings:
        raise ValueError(f"the backend renders with {backend.settings}, the batch asks for {settings}")
    if not inputs:
        raise ValueError("no inputs: pass audio files, directories, globs or a CSV manifest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporter = reporter or make_reporter()
    found, failed = expand_inputs(inputs, out, avatar, emotion)
    found = [replace(j, index=i) for i, j in enumerate(found)]
    for note in _notices(settings, found):
        reporter.notice(note)
    pending, skipped = plan(found, settings, force)
    runner = make_backend(backend, settings, jobs, address, threads) if isinstance(backend, str) else backend
    reporter.begin(found)
    results = list(failed) + list(skipped)
    for r in failed + skipped:
        reporter.finished(r)
    t0 = time.perf_counter()
    try:
        for result in runner.run(pending, reporter.progress) if pending else ():
            results.append(result)
            reporter.finished(result)
    finally:
        if runner is not backend:
            runner.close()
    manifest = _manifest(results, settings, inputs, time.perf_counter() - t0, runner.name, jobs)
    path = Path(manifest_path) if manifest_path else out / MANIFEST_NAME
    manifest["path"] = str(path)
    write_json_atomic(path, manifest)
    reporter.summary(manifest)
    return manifest


def _notices(settings: RenderSettings, jobs: list[RenderJob]) -> list[str]:
    notes = [f"--model {settings.model}: {MODELS[settings.model]}"] if settings.model == "tiny" else []
    notes += sorted({demo_label(j.avatar) for j in jobs if parse_avatar(j.avatar)[0] == "demo"})
    return notes


def _manifest(results: list[dict], settings: RenderSettings, inputs: list[str], wall_s: float, backend: str,
              jobs: int) -> dict:
    results = sorted(results, key=lambda r: (r["index"] < 0, r["index"], r["input"]))
    done = [r for r in results if r["status"] == "done"]
    media_s = sum(r["duration_s"] for r in done)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs, "settings": settings.output_key(), "backend": backend, "jobs": jobs,
        "results": [{k: v for k, v in r.items() if k != "index"} for r in results],
        "summary": {"files": len(results), "done": len(done), "skipped": sum(r["status"] == "skipped" for r in results),
                    "failed": sum(r["status"] == "failed" for r in results), "media_s": round(media_s, 3),
                    "wall_s": round(wall_s, 3), "rtf": round(media_s / wall_s, 3) if done and wall_s > 0 else None},
    }


def exit_code(manifest: dict) -> int:
    """0 when every file is rendered or already done, 1 when any failed."""
    return 1 if manifest["summary"]["failed"] else 0
