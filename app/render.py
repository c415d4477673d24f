"""`avatarcast render`: audio files -> talking-avatar mp4s, many at a time, resumable.

    INPUT... (files, directories, globs, CSV manifests) --expand_inputs--> jobs
      --plan: input hash + settings vs the output's sidecar--> skipped | pending
      --backend (app/render_backends.py): in this process | a process pool (--jobs N) | Ray actors--> results
      --> reporter (rich / JSON lines / quiet), manifest JSON, exit code 1 if any file failed

Dialogue (`--speakers N`, N > 1): each input is an N-channel file (channel i drives face i, left to right)
or a CSV row with columns audio_1 .. audio_N (one file per speaker, any rates: each is resampled to the
track's rate); the avatar needs N faces. A speaker shorter than the others is padded with silence and the
result says so (`tracks`, `warning`); the output's audio is the speakers' mix.

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

import csv
import glob
import hashlib
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from app.render_backends import (  # noqa: F401 - InProcessBackend and Backend are part of this module's API
    Backend,
    InProcessBackend,
    failure,
    failure_of,
    make_backend,
)
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


# ---- 1. inputs -> jobs ---------------------------------------------------------------------------------
def expand_inputs(inputs: list[str], out_dir: Path, avatar: str | None = None, emotion: str | None = None,
                  allow_outside_out: bool = False, speakers: int = 1) -> tuple[list[RenderJob], list[dict]]:
    """Audio files, directories (searched recursively for audio extensions; the tree is mirrored under
    out_dir), globs, and CSV manifests (columns audio, avatar, emotion, output; relative paths are read
    from the CSV's directory, relative outputs from out_dir). Returns (jobs, failed entries): a missing
    file, an empty glob, an input that is not a regular file, two inputs wanting the same output and an
    output outside out_dir (unless `allow_outside_out`) fail alone. With `speakers` > 1 a CSV may name one
    file per speaker (audio_1 .. audio_N); a row that misses one fails alone."""
    rows: list[tuple[str, Path, str | None, str | None]] = []  # (audio, output, avatar, emotion)
    per_speaker: dict[tuple[str, Path], tuple[str, ...]] = {}  # a CSV row's speaker files
    failed: list[dict] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            csv_rows, csv_tracks, csv_failed = _csv_rows(p, out_dir, speakers)
            rows += csv_rows
            per_speaker.update(csv_tracks)
            failed += csv_failed
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                kinds = ", ".join(sorted(AUDIO_EXTENSIONS))
                failed.append(failure(item, None, f"no audio files ({kinds}) in the directory"))
            rows += [(str(f), out_dir / f.relative_to(p).with_suffix(".mp4"), None, None) for f in found]
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                failed.append(failure(item, None, "the pattern matched no files"))
            rows += [(str(f), out_dir / f"{f.stem}.mp4", None, None) for f in found]
        else:  # a file, or a missing one (reported by the worker, naming the file)
            rows.append((item, out_dir / f"{p.stem}.mp4", None, None))
    jobs: list[RenderJob] = []
    owner: dict[Path, str] = {}
    seen: set[tuple[str, Path]] = set()
    for audio, output, row_avatar, row_emotion in rows:
        tracks = tuple(os.path.abspath(t) for t in per_speaker.get((audio, output), ()))
        output = Path(os.path.abspath(output))
        audio = os.path.abspath(audio)
        if (audio, output) in seen:
            continue  # the same file named twice (a file and a glob over it)
        seen.add((audio, output))
        refusal = next(filter(None, (_refuse_output(a, output, out_dir, allow_outside_out) or _refuse_special(a)
                                     for a in tracks or (audio,))), None)
        if refusal:
            failed.append(failure(audio, str(output), refusal))
            continue
        if output in owner:
            failed.append(failure(audio, str(output), f"{output} is already the output of {owner[output]}; "
                                   "name outputs in a CSV manifest's output column"))
            continue
        owner[output] = audio
        chosen = row_avatar or avatar or default_avatar(speakers)  # none given: the built-in avatar `serve` uses
        chosen_emotion = row_emotion or emotion
        if chosen_emotion and not names_emotions(chosen):  # demo and folder avatars name their emotions
            chosen_emotion = os.path.abspath(chosen_emotion)
        jobs.append(RenderJob(index=0, audio=audio, output=str(output), avatar=_abs_avatar(chosen),
                              emotion=chosen_emotion or None, speaker_audio=tracks))
    return jobs, failed


def _csv_rows(path: Path, out_dir: Path, speakers: int = 1):
    """A CSV manifest's rows -> ([(audio, output, avatar, emotion)], {(audio, output): speaker files},
    [failed rows]). Columns: audio (or audio_1 .. audio_N, one file per speaker, with --speakers N),
    avatar, emotion, output."""
    base = path.parent
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        numbered = sorted((c for c in columns if _speaker_column(c)), key=_speaker_column)
        if ("audio" in columns) == bool(numbered):
            raise ValueError(f"{path}: a CSV manifest needs an 'audio' column or, for dialogue, audio_1 .. audio_N "
                             f"(has: {', '.join(columns) or 'none'}); optional: avatar, emotion, output")
        wanted = [f"audio_{i + 1}" for i in range(speakers)] if numbered else ["audio"]
        rows, tracks, failed = [], {}, []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            given = [row.get(c, "") for c in (numbered if numbered else wanted)]
            if not any(given):
                continue
            audio = base / given[0]
            output = out_dir / row["output"] if row.get("output") else out_dir / f"{audio.stem}.mp4"
            problem = _speaker_columns_problem(row, numbered, wanted, speakers)
            if problem:
                failed.append(failure(str(audio), str(output), f"{path} line {line}: {problem}"))
                continue
            if numbered:
                tracks[(str(audio), output)] = tuple(str(base / row[c]) for c in wanted)
            avatar = row.get("avatar") or None
            if avatar and not avatar.startswith(("demo:", "duo:")):
                avatar = str(base / avatar)
            emotion = row.get("emotion") or None
            # demo and folder avatars name their emotions; an image is read from the CSV's directory
            if emotion and not (names_emotions(avatar) if avatar else not (base / emotion).exists()):
                emotion = str(base / emotion)
            rows.append((str(audio), output, avatar, emotion))
    return rows, tracks, failed


def _speaker_column(name: str) -> int:
    """N for a column audio_N (N >= 1), else 0."""
    head, _, n = name.partition("_")
    return int(n) if head == "audio" and n.isdigit() and int(n) >= 1 else 0


def _speaker_columns_problem(row: dict, numbered: list[str], wanted: list[str], speakers: int) -> str | None:
    """Why a row's speaker files do not fit --speakers, or None."""
    if not numbered:
        return None
    missing = [c for c in wanted if not row.get(c)]
    extra = [c for c in numbered if c not in wanted and row.get(c)]
    if missing:
        return (f"no {', '.join(missing)}: --speakers {speakers} needs one audio file per speaker "
                f"({', '.join(wanted)})")
    if extra:
        return f"{', '.join(extra)} given but --speakers {speakers} drives only {speakers} face(s)"
    return None


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
    return spec if parse_avatar(spec)[0] in ("demo", "duo") else os.path.abspath(spec)


def _folder_sha256(folder: str) -> str:
    """An `avatar new` folder's files (avatar.json and its images), by name and content."""
    files = sorted(Path(folder).iterdir())  # a FIFO or device among them is refused (NotRegularFile)
    return hashlib.sha256(json.dumps([[p.name, _sha256(str(p))] for p in files]).encode()).hexdigest()


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
    if kind in ("demo", "duo"):
        avatar = f"{kind}:{value}"
    else:
        avatar = _folder_sha256(str(value)) if kind == "folder" else _sha256(str(value))
    audio = [_sha256(a) for a in job.speaker_audio] if job.speaker_audio else _sha256(job.audio)
    parts = {"format": KEY_FORMAT, "audio": audio, "settings": settings.output_key(), "avatar": avatar,
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
            refused.append(failure_of(job, str(exc)))
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
    found, failed = expand_inputs(inputs, out, avatar, emotion, allow_outside_out, settings.speakers)
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
        except BaseException:
            if not any(r["status"] == "done" for r in results):  # e.g. a backend that could not start
                journal.finish()  # nothing was rendered: nothing for a rerun to know
            raise
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
                    result = {**failure_of(job, f"not rendered: the batch was stopped by {interrupted.name}"),
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
    notes += sorted({demo_label(j.avatar) for j in jobs if parse_avatar(j.avatar)[0] in ("demo", "duo")})
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
