"""The recent-failures panel's span source in files mode: the ``traces-*.jsonl`` files of ``configure()`` (and
their rotated files) or the Collector's ``traces.jsonl``, read incrementally into a ``FailureBook``."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from .failures import FAILED, FailureBook, FailureSnapshot, parse_spans_line
from .metrics import TailReader, file_list

FIRST_READ_BYTES = 64 << 20
"""At its first read, a source reads only the newest this many bytes of span files (newest files first) and counts
the older ones as read: the panel keeps only the newest calls anyway (64 MiB: some 10 hours of one client's spans
at the default sampling, read in about 3 s)."""
TRACE_PATTERNS = ("traces*.jsonl", "traces*.json", "traces*.jsonl[.-][0-9]*", "traces*.json[.-][0-9]*")
"""Active and rotated span files: ours ``traces-<host>-<pid>[.<seq>].jsonl``, the Collector's ``traces.jsonl`` and
its ``traces-<time>.jsonl``, logrotate's ``.jsonl.1`` / ``.jsonl-<date>`` (compressed ones are left out)."""


class TraceFileSource:
    """Span files in ``folder`` (``TRACE_PATTERNS``). Each ``load`` reads only the bytes appended since the previous
    one, following files through renames as the metrics ``FileSource`` does (``TailReader``), and keeps the newest
    calls of ``FailureBook`` (``failures.MAX_CALLS``). Calls in files deleted before they were read are missed.
    Thread-safe."""

    def __init__(self, folder: str | Path, book: FailureBook | None = None) -> None:
        self.folder = Path(folder)
        self.description = f"span files (traces*.jsonl) in {self.folder}"
        self.book = book or FailureBook()
        self._tail = TailReader()
        self.files = 0
        self.spans = 0  # mooncake spans read so far
        self.skipped_lines = 0
        self.last_problem = ""
        self.first_read_bytes = FIRST_READ_BYTES
        self.skipped_files = 0  # old files not read at the first read (FIRST_READ_BYTES)
        self._started = False
        self._lock = threading.Lock()

    def refresh(self) -> int:
        """Read what was appended since the last call; returns the number of spans read."""
        listing = file_list(self.folder, TRACE_PATTERNS, skip=())
        if not self._started:
            self._started = True
            self.skipped_files = self._skip_old(listing)
        read = 0
        for path, line in self._tail.read(listing):
            problems: list[str] = []
            try:
                spans = parse_spans_line(line, problems)
            except ValueError as exc:
                problems.append(str(exc))
                spans = []
            if problems:
                self.skipped_lines += 1
                self.last_problem = f"{path.name}: {problems[-1]}"
            self.book.add(spans)
            read += len(spans)
        self.files = len(listing)
        self.spans += read
        return read

    def _skip_old(self, listing: list[tuple[Path, os.stat_result]]) -> int:
        """Count all but the newest ``first_read_bytes`` of the files as read (the listing is oldest first; a file
        across the limit is read from its first line inside it); how many files were skipped, whole or in part."""
        budget, skipped = self.first_read_bytes, 0
        for path, st in reversed(listing):
            skipped += budget < st.st_size and self._tail.skip(path, st, keep=max(0, budget))
            budget -= st.st_size
        return skipped

    def load(self, start: float, end: float, outcomes: Iterable[str] = FAILED) -> FailureSnapshot:
        """The kept calls that ended in ``(start, end]`` with one of ``outcomes``, newest first."""
        with self._lock:
            if not self.folder.is_dir():
                return FailureSnapshot([], self.description, error=f"folder {self.folder} does not exist")
            self.refresh()
            notice = f"{self.files} span file(s)"
            if self.skipped_files:
                newest = f"{self.first_read_bytes / (1 << 20):g} MiB"
                notice += f" · {self.skipped_files} older file(s) not read or read in part (only the newest {newest})"
            if self.skipped_lines:
                notice += f" · {self.skipped_lines} line(s) with malformed spans skipped, the last: {self.last_problem}"
            if self._tail.unreadable:
                name, why = next(iter(self._tail.unreadable.items()))
                notice += f" · {len(self._tail.unreadable)} file(s) cannot be read: {name} ({why})"
            calls = self.book.select(start, end, outcomes, limit=self.book.max_calls)
            return FailureSnapshot(calls, self.description, notice=notice)
