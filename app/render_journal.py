"""The files a render batch must never leave half-written: JSON side files and the manifest journal.

    write_json_atomic(path, data)          a unique temporary file beside `path`, fsynced, renamed over it
    journal = ManifestJournal(path)        OUT/render-manifest.json.journal: one JSON line per finished file,
    journal.begin(header)                  fsynced as it is written, so a batch killed with SIGKILL leaves
    journal.append(result)                 a record of everything it finished; the next run reads it back
    journal.finish()                       (`ManifestJournal.read`) and folds it into its manifest

A journal line cut short by the kill (the last one) is ignored on reading; every line before it is whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from streaming.filesink import fsync_path

JOURNAL_SUFFIX = ".journal"


def write_json_atomic(path: str | Path, data: dict) -> None:
    """`path` holds the old JSON or the new, never a mix: written under a unique name in the same
    directory (several processes may write beside each other), fsynced, renamed, the directory fsynced.
    A failure (a full disk) removes the temporary file and raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


class ManifestJournal:
    """Append-only JSON lines beside the manifest: a header, then one result per finished file."""

    def __init__(self, manifest: str | Path) -> None:
        manifest = Path(manifest)
        self.path = manifest.with_name(manifest.name + JOURNAL_SUFFIX)
        self._file: IO[str] | None = None

    def read(self) -> tuple[dict | None, list[dict]]:
        """(header, results) of an earlier batch that did not finish; (None, []) when there is none."""
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except (FileNotFoundError, IsADirectoryError):
            return None, []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # the line being written when the batch was killed
        header = entries[0] if entries and entries[0].get("journal") == 1 else None
        return header, [e for e in entries[1:] if isinstance(e, dict) and "status" in e] if header else []

    def begin(self, header: dict[str, Any]) -> None:
        """Start this batch's journal (an earlier one must have been read first: it is replaced)."""
        self._file = open(self.path, "w")
        self._write({"journal": 1, **header})
        fsync_path(self.path.parent)

    def append(self, result: dict) -> None:
        self._write(result)

    def _write(self, entry: dict) -> None:
        assert self._file is not None, "begin() first"
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        """The manifest is written: the journal has been folded into it and goes."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
