"""What `avatarcast render` shows while it works: rich progress bars, JSON lines, or nothing.

Every backend reports the same three things to a reporter, on the driver: `progress(index, frames,
total)` while a file renders, `finished(result)` once per file (done, skipped or failed) and
`summary(manifest)` at the end. Frames/s and RTF (media seconds per wall second) come from the frames
reported; ETA from the remaining frames at the current rate.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from avatar.types import DEFAULT_FPS


class Reporter(Protocol):
    def begin(self, jobs: list) -> None: ...

    def progress(self, index: int, frames: int, total: int) -> None: ...

    def finished(self, result: dict) -> None: ...

    def summary(self, manifest: dict) -> None: ...

    def notice(self, message: str) -> None: ...


class QuietReporter:
    """Nothing on stdout; failures and notices as one line each on stderr."""

    def __init__(self, err: TextIO | None = None) -> None:
        self.err = err or sys.stderr

    def begin(self, jobs: list) -> None:
        pass

    def progress(self, index: int, frames: int, total: int) -> None:
        pass

    def finished(self, result: dict) -> None:
        if result["status"] == "failed":
            print(f"failed: {result['input']}: {result['error']}", file=self.err)
        elif result.get("warning"):  # e.g. a dialogue's shorter speaker padded with silence
            print(f"warning: {result['input']}: {result['warning']}", file=self.err)

    def summary(self, manifest: dict) -> None:
        pass

    def notice(self, message: str) -> None:
        print(f"note: {message}", file=self.err)


class JsonLinesReporter:
    """One JSON object per line on stdout: start, progress (throttled by the workers), done / skipped /
    failed (the manifest entry), summary. Notices go to stderr, so stdout stays machine-readable."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.started: dict[int, float] = {}
        self.jobs: dict[int, object] = {}

    def _emit(self, event: str, **fields) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")
        self.out.flush()

    def begin(self, jobs: list) -> None:
        self.jobs = {j.index: j for j in jobs}

    def progress(self, index: int, frames: int, total: int) -> None:
        now = time.monotonic()
        job = self.jobs.get(index)
        if index not in self.started:
            self.started[index] = now
            self._emit("start", index=index, input=getattr(job, "audio", None), output=getattr(job, "output", None),
                       frames_total=total)
        elapsed = now - self.started[index]
        fps = frames / elapsed if elapsed > 0 and frames else None
        self._emit("progress", index=index, frames=frames, frames_total=total,
                   fps=_round(fps), rtf=_round(fps / DEFAULT_FPS if fps else None),
                   eta_s=_round((total - frames) / fps if fps else None))

    def finished(self, result: dict) -> None:
        self._emit(result["status"], **result)

    def summary(self, manifest: dict) -> None:
        self._emit("summary", **manifest["summary"], manifest=manifest.get("path"))

    def notice(self, message: str) -> None:
        print(f"note: {message}", file=sys.stderr)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class _FramesPerSecond(ProgressColumn):
    """Frames/s and real-time factor from rich's own speed estimate (a task's completed units are frames)."""

    def render(self, task: Task) -> Text:
        if not task.speed:
            return Text("-- fps", style="progress.data.speed")
        return Text(f"{task.speed:5.1f} fps  RTF {task.speed / DEFAULT_FPS:4.2f}", style="progress.data.speed")


class RichReporter:
    """A bar per file being rendered plus an overall bar, all in frames. The overall total counts the
    files not yet started at the mean length of those seen so far (file lengths are known only once
    their audio is read), so its ETA firms up as the batch goes."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                             _FramesPerSecond(), TimeRemainingColumn(), console=self.console, transient=False)
        self.overall: TaskID | None = None
        self.tasks: dict[int, TaskID] = {}
        self.totals: dict[int, int] = {}  # frames per file, once known
        self.frames: dict[int, int] = {}
        self.jobs: dict[int, object] = {}
        self.pending: set[int] = set()

    def begin(self, jobs: list) -> None:
        self.jobs = {j.index: j for j in jobs}
        self.pending = set(self.jobs)
        self.bars.start()
        self.overall = self.bars.add_task(f"all {len(jobs)} files", total=None)

    def progress(self, index: int, frames: int, total: int) -> None:
        if index not in self.tasks:
            name = getattr(self.jobs.get(index), "audio", str(index))
            self.tasks[index] = self.bars.add_task(_short(name), total=total)
        self.totals[index] = total
        self.bars.update(self.tasks[index], completed=frames, total=total)  # exact once the audio has decoded
        self.frames[index] = frames
        self._update_overall()

    def _update_overall(self) -> None:
        known = list(self.totals.values())
        unknown = len(self.pending - set(self.totals))
        total = sum(known) + (unknown * sum(known) // len(known) if known else 0) if known else None
        self.bars.update(self.overall, completed=sum(self.frames.values()), total=total)

    def finished(self, result: dict) -> None:
        index = result["index"]
        self.pending.discard(index)
        self.totals.pop(index, None)  # skipped or failed files do not count towards the overall frames
        self.frames.pop(index, None)
        if result["status"] == "done":
            self.totals[index] = self.frames[index] = result["frames"]
        if index in self.tasks:
            self.bars.remove_task(self.tasks.pop(index))
        self.bars.console.print(_line(result), markup=False, highlight=False)
        self._update_overall()

    def summary(self, manifest: dict) -> None:
        self.bars.stop()
        s = manifest["summary"]
        stopped = f", {s['interrupted']} not rendered (stopped by {manifest['interrupted']})" \
            if manifest.get("interrupted") else ""
        self.console.print(f"{s['done']} rendered, {s['skipped']} already done, {s['failed']} failed{stopped}; "
                           f"manifest: {manifest.get('path')}", markup=False, highlight=False)

    def notice(self, message: str) -> None:
        self.console.print(f"note: {message}", style="yellow", markup=False, highlight=False)


def _short(path: str, width: int = 32) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1):]


def _line(result: dict) -> str:
    if result["status"] in ("failed", "interrupted"):
        return f"{'✗' if result['status'] == 'failed' else '-'} {result['input']}: {result['error']}"
    verb = "done" if result["status"] == "done" else "already done"
    rtf = f", RTF {result['rtf']}" if result.get("rtf") else ""
    warning = f"; warning: {result['warning']}" if result.get("warning") else ""
    return f"✓ {result['input']} -> {result['output']} ({verb}: {result['frames']} frames{rtf}{warning})"


def make_reporter(quiet: bool = False, json_lines: bool = False) -> Reporter:
    if quiet and json_lines:
        raise ValueError("--quiet and --json-lines exclude each other")
    if json_lines:
        return JsonLinesReporter()
    return QuietReporter() if quiet else RichReporter()
