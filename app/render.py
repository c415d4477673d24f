"""`avatarcast render`: audio files -> talking-avatar mp4s, many at a time, resumable.

    INPUT... (files, directories, globs, CSV manifests) --expand_inputs--> jobs
      --plan: input hash + settings vs the output's sidecar--> skipped | pending
      --backend: in this process | a process pool (--jobs N) | Ray actors (--backend ray)--> results
      --> reporter (rich / JSON lines / quiet), manifest JSON, exit code 1 if any file failed

Each worker loads the models once (`app.render_worker.Renderer`) and renders files one after another;
each output is written to a temporary file and renamed when complete, then its sidecar
(`<output>.render.json`: the key and the result) is written, so a killed batch leaves finished files,
no truncated mp4, and a rerun renders only what is missing. Every result is also appended to the
manifest's journal as it comes (app/render_journal.py), so even SIGKILL leaves a record of what finished.
A bad input fails its own entry only: outputs outside OUT (unless allowed), devices and FIFOs are
refused before anything reads them, and a worker process that dies fails only the file it was rendering
(the other files are rendered again in a fresh pool). SIGTERM and Ctrl-C end the batch cleanly: the
file being rendered is abandoned (no partial output), the manifest lists the rest as interrupted.
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
import signal
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from app.render_journal import ManifestJournal
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
from streaming.filesink import remove_stale_partials

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aiff", ".aif"}
KEY_FORMAT = 1  # bump when the rendering changes in a way the settings do not show
MANIFEST_NAME = "render-manifest.json"
POLL_S = 0.1


# ---- 1. inputs -> jobs ---------------------------------------------------------------------------------
def expand_inputs(inputs: list[str], out_dir: Path, avatar: str | None = None, emotion: str | None = None,
                  allow_outside_out: bool = False) -> tuple[list[RenderJob], list[dict]]:
    """Audio files, directories (searched recursively for audio extensions; the tree is mirrored under
    out_dir), globs, and CSV manifests (columns audio, avatar, emotion, output; relative paths are read
    from the CSV's directory, relative outputs from out_dir). Returns (jobs, failed entries): a missing
    file, an empty glob, an input that is not a regular file, two inputs wanting the same output and an
    output outside out_dir (unless `allow_outside_out`) fail alone."""
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
        refusal = _refuse_output(audio, output, out_dir, allow_outside_out) or _refuse_special(audio)
        if refusal:
            failed.append(_failure(audio, str(output), refusal))
            continue
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


def _refuse_output(audio: str, output: Path, out_dir: Path, allow_outside: bool) -> str | None:
    """Why `output` may not be written: outside out_dir (links resolved), or the input itself."""
    real, root = os.path.realpath(output), os.path.realpath(out_dir)
    if real == os.path.realpath(audio):
        return f"the output {output} is the input itself"
    if not allow_outside and (os.path.commonpath([real, root]) != root or real == root):
        return f"the output {output} is outside --out {out_dir}; pass --allow-outside-out to write there"
    return None


def _refuse_special(path: str) -> str | None:
    """A device, FIFO or socket would block or never end when read: refused before anything opens it.
    A missing file is left to the worker, whose reader names it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{path} is not a regular file (a directory, device or FIFO)"


def _abs_avatar(spec: str) -> str:
    return spec if parse_avatar(spec)[0] == "demo" else os.path.abspath(spec)


def _folder_sha256(folder: str) -> str:
    """An `avatar new` folder's files (avatar.json and its images), by name and content."""
    files = sorted(Path(folder).iterdir())  # a FIFO or device among them is refused (NotRegularFile)
    return hashlib.sha256(json.dumps([[p.name, _sha256(str(p))] for p in files]).encode()).hexdigest()


def _failure(audio: str, output: str | None, error: str) -> dict:
    return {"index": -1, "input": audio, "output": output, "status": "failed", "duration_s": None, "frames": None,
            "wall_s": None, "rtf": None, "error": error}


# ---- 2. resume: what is already done -----------------------------------------------------------------
class NotRegularFile(ValueError):
    """An input, portrait or emotion image that is a device, FIFO or socket."""


def _sha256(path: str) -> str:
    """The file's hash; opened without blocking, so a FIFO is refused rather than waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file (a directory, device or FIFO)")
        os.set_blocking(fd, True)
        h = hashlib.sha256()
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


def plan(jobs: list[RenderJob], settings: RenderSettings,
         force: bool) -> tuple[list[RenderJob], list[dict], list[dict]]:
    """(jobs to render, each with its key; results for outputs already done; failures for portraits or
    emotion images that are not regular files). Inputs that cannot be hashed (missing, unreadable) still
    go to a worker, which reports them with the real reader's error."""
    pending, skipped, refused = [], [], []
    for job in jobs:
        try:
            key = job_key(job, settings)
        except NotRegularFile as exc:
            refused.append(_failure_of(job, str(exc)))
            continue
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
    return pending, skipped, refused


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


WORKER_DIED = ("its worker process died while rendering it (killed, out of memory, or a crash in native "
               "code); the other files were rendered in a fresh worker")


class ProcessPoolBackend:
    """N worker processes (spawned: no forked torch state), each loading the models once and sharing the
    CPU cores; progress comes back through a multiprocessing queue.

    A worker that dies breaks the whole pool (every unfinished future fails with BrokenProcessPool), so
    the unfinished files are rendered again in a fresh pool. The ones that were running when it broke
    (or that were unfinished in two broken pools) are suspects: each is rendered alone, one at a time,
    in a one-worker pool, where a death can only be its own; that file alone fails."""

    name = "local"

    def __init__(self, settings: RenderSettings, workers: int, threads: int | None = None) -> None:
        self.settings, self.workers, self.threads = settings, workers, threads

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        ctx = multiprocessing.get_context("spawn")
        events = ctx.Queue()
        todo, suspects, breaks = list(jobs), set(), {j.index: 0 for j in jobs}
        while todo:
            alone = [j for j in todo if j.index in suspects]
            batch = alone or todo
            unfinished, running = yield from self._pool(ctx, events, batch, on_progress, one_at_a_time=bool(alone))
            done = {j.index for j in batch} - {j.index for j in unfinished}
            todo = [j for j in todo if j.index not in done]
            for job in unfinished:
                breaks[job.index] += 1
                if job.index in running or breaks[job.index] >= 2:
                    suspects.add(job.index)

    def _pool(self, ctx, events, jobs: list[RenderJob], on_progress: ProgressFn,
              one_at_a_time: bool) -> Generator[dict, None, tuple[list[RenderJob], set[int]]]:
        """Render `jobs` in one pool until it breaks: yields their results, returns (the jobs left
        unfinished by a broken pool, those of them that were running when it broke). One at a time, a
        job whose worker dies is failed here (it was alone: the death was its own)."""
        workers = 1 if one_at_a_time else min(self.workers, len(jobs))
        threads = self.threads or max(1, (os.cpu_count() or 1) // workers)  # the workers share the cores
        before = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(self.settings, events, threads))
        queue_ = list(jobs)
        futures: dict = {}
        running: set[int] = set()  # as seen at the last poll: a broken pool ends every future at once
        unfinished: list[RenderJob] = []
        clean = crashed = False
        try:
            while (queue_ or futures) and not unfinished and not crashed:
                while queue_ and not (one_at_a_time and futures):
                    job = queue_.pop(0)
                    futures[pool.submit(_pool_render, job)] = job
                finished, _ = wait(futures, timeout=POLL_S, return_when=FIRST_COMPLETED)
                _drain(events, on_progress)
                for fut in finished:
                    job = futures.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        if one_at_a_time:  # alone in its pool: the next suspect gets a fresh one
                            crashed = True
                            yield _failure_of(job, WORKER_DIED)
                        else:
                            unfinished.append(job)
                        continue
                    except Exception as exc:  # the job could not be sent or returned (pickling)
                        result = _failure_of(job, f"worker failed: {type(exc).__name__}: {exc}")
                    yield result
                if not unfinished:
                    running = {j.index for f, j in futures.items() if f.running()}
            for fut, job in futures.items():  # left when the pool broke: finished before it, or not
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    yield fut.result()
                else:
                    unfinished.append(job)
            unfinished += queue_
            clean = True
        finally:
            _drain(events, on_progress)
            if clean:
                pool.shutdown(wait=True)
            else:  # interrupted: do not wait for the files being rendered
                pool.shutdown(wait=False, cancel_futures=True)
                for process in set(multiprocessing.active_children()) - before:
                    process.terminate()
                    process.join(5)
        return unfinished, running & {j.index for j in unfinished}

    def close(self) -> None:
        pass  # the pools live only as long as one run


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
                 manifest_path: str | Path | None = None, reporter: Reporter | None = None,
                 allow_outside_out: bool = False) -> dict:
    """Render every input; returns the manifest (also written to `manifest_path`, by default
    OUT/render-manifest.json). `backend` is a name (local, ray) or a backend object the caller keeps
    (and closes). Usage errors (no inputs, bad settings) raise ValueError. SIGTERM or SIGINT (in the
    main thread) stop the batch: the manifest is still written, with `interrupted` set to the signal."""
    settings.validate()
    if not isinstance(backend, str) and backend.settings != settings:
        raise ValueError(f"the backend renders with {backend.settings}, the batch asks for {settings}")
    if not inputs:
        raise ValueError("no inputs: pass audio files, directories, globs or a CSV manifest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporter = reporter or make_reporter()
    found, failed = expand_inputs(inputs, out, avatar, emotion, allow_outside_out)
    found = [replace(j, index=i) for i, j in enumerate(found)]
    path = Path(manifest_path) if manifest_path else out / MANIFEST_NAME
    journal = ManifestJournal(path)
    earlier, earlier_results = journal.read()  # a batch into this manifest that never finished
    if earlier is not None:
        reporter.notice(f"an earlier batch (started {earlier.get('created')}) was interrupted after "
                        f"{len(earlier_results)} files; what it finished is not rendered again")
    for note in _notices(settings, found):
        reporter.notice(note)
    pending, skipped, refused = plan(found, settings, force)
    runner = make_backend(backend, settings, jobs, address, threads) if isinstance(backend, str) else backend
    results: list[dict] = []
    interrupted: RenderInterrupted | None = None
    t0 = time.perf_counter()
    with _interruptible() as signals:
        try:
            journal.begin({"created": _now(), "inputs": inputs, "settings": settings.output_key()})
            reporter.begin(found)

            def finished(result: dict) -> None:
                results.append(result)
                journal.append(result)
                reporter.finished(result)

            for r in failed + skipped + refused:
                finished(r)
            with closing(runner.run(pending, reporter.progress) if pending else (r for r in ())) as stream:
                for result in stream:
                    finished(result)
        except RenderInterrupted as exc:
            interrupted = exc
        finally:
            signals.disarm()  # from here on the batch winds down whatever comes
            try:
                if runner is not backend:
                    runner.close()
            finally:
                journal.close()
        if interrupted is not None:
            seen = {r["index"] for r in results}
            for job in pending:
                if job.index not in seen:
                    remove_stale_partials(job.output)  # of a worker stopped mid-file (its process is gone)
                    result = {**_failure_of(job, f"not rendered: the batch was stopped by {interrupted.name}"),
                              "status": "interrupted"}
                    results.append(result)
                    reporter.finished(result)
        manifest = _manifest(results, settings, inputs, time.perf_counter() - t0, runner.name, jobs)
        manifest["interrupted"] = interrupted.name if interrupted else None
        if earlier is not None:
            manifest["resumed"] = {"created": earlier.get("created"),
                                   "finished": [r["output"] for r in earlier_results if r["status"] == "done"]}
        manifest["path"] = str(path)
        write_json_atomic(path, manifest)
        journal.finish()  # folded into the manifest
        reporter.summary(manifest)
    return manifest


class RenderInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT during a batch (a KeyboardInterrupt, so no `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


class _Signals:
    """SIGTERM and SIGINT while armed: the first raises RenderInterrupted; later ones, and any after
    `disarm()`, are ignored, so the batch can wind down and write its manifest."""

    def __init__(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def __call__(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise RenderInterrupted(signum)


@contextmanager
def _interruptible() -> Iterator[_Signals]:
    """Signal handling for one batch, in the main thread only (elsewhere signals are left alone)."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield signals
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        "created": _now(),
        "inputs": inputs, "settings": settings.output_key(), "backend": backend, "jobs": jobs,
        "results": [{k: v for k, v in r.items() if k != "index"} for r in results],
        "summary": {"files": len(results), "done": len(done), "skipped": sum(r["status"] == "skipped" for r in results),
                    "failed": sum(r["status"] == "failed" for r in results),
                    "interrupted": sum(r["status"] == "interrupted" for r in results), "media_s": round(media_s, 3),
                    "wall_s": round(wall_s, 3), "rtf": round(media_s / wall_s, 3) if done and wall_s > 0 else None},
    }


def exit_code(manifest: dict) -> int:
    """0 when every file is rendered or already done, 1 when any failed, 128 + the signal's number when
    a signal stopped the batch (130 for Ctrl-C, 143 for SIGTERM), as a shell reports it."""
    if manifest.get("interrupted"):
        return 128 + signal.Signals[manifest["interrupted"]].value
    return 1 if manifest["summary"]["failed"] else 0
