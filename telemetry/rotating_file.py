"""Bounded telemetry files: ``RotatingFile`` appends lines, rotates by size, keeps a bounded history and follows
an external rotation; ``Retention`` is the pure policy that says which rotated files go.

Names: the active file is ``<stem>.jsonl`` (e.g. ``traces-<host>-<pid>.jsonl``); a rotation renames it (same inode,
so a reader tracking inodes loses nothing) to ``<stem>.<seq>.jsonl`` with ``seq`` zero-padded and increasing, and
opens a new active file. The rotated names still end in ``.jsonl``, so globs and OTLP JSON-file readers keep
finding them. Files that logrotate renamed (``.jsonl.1``, ``.jsonl-20261201``, compressed) are logrotate's to
expire: the retention here only ever deletes its own ``<stem>.<seq>.jsonl`` files.

External rotation: before each write the path is compared with the open file (one ``stat``); when the path was
moved away or replaced (logrotate's ``create`` mode) the file is reopened at the path; after ``copytruncate`` the
append-mode descriptor simply goes on at the new end. So no ``postrotate`` signal is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MIB = 1 << 20
SUFFIX = ".jsonl"
SEQ_DIGITS = 6


@dataclass(frozen=True)
class Backup:
    """One rotated file: the active file (family) it came from, its sequence number, size and last write time."""

    path: Path
    family: Path
    seq: int
    size: int
    mtime_ns: int = 0


@dataclass(frozen=True)
class Retention:
    """How much of a process's telemetry is kept on disk.

    * ``max_file_bytes``: an active file is rotated before a write would take it past this size (a single line
      larger than that still gets a file of its own: lines are never split);
    * ``max_backups``: rotated files kept per active file;
    * ``max_total_bytes``: every file of the active files sharing this retention together, each active file
      counted at ``max_file_bytes`` (so the cap holds between rotations too). Must allow the active files.

    Oldest rotated files go first. Pure: ``expired`` only computes.
    """

    max_file_bytes: int = 32 * MIB
    max_backups: int = 20
    max_total_bytes: int = 768 * MIB

    def __post_init__(self) -> None:
        for name, least in (("max_file_bytes", 1), ("max_backups", 0), ("max_total_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    def check_room(self, active_files: int) -> None:
        """ValueError unless ``active_files`` active files fit in ``max_total_bytes``."""
        if active_files * self.max_file_bytes > self.max_total_bytes:
            raise ValueError(
                f"max_total_bytes ({self.max_total_bytes}) must hold {active_files} active file(s) of max_file_bytes "
                f"({self.max_file_bytes}) each"
            )

    def expired(self, backups: Sequence[Backup], active_files: int) -> list[Backup]:
        """The rotated files to delete: the oldest past ``max_backups`` in each family, then the oldest of all (by
        last write) while the total (the rest plus ``active_files`` full active files) exceeds ``max_total_bytes``."""
        by_family: dict[Path, list[Backup]] = {}
        for b in sorted(backups, key=lambda b: b.seq):
            by_family.setdefault(b.family, []).append(b)
        doomed: list[Backup] = []
        kept: list[Backup] = []
        for family in by_family.values():
            cut = len(family) - self.max_backups
            doomed += family[: max(cut, 0)]
            kept += family[max(cut, 0) :]
        total = sum(b.size for b in kept) + active_files * self.max_file_bytes
        for b in sorted(kept, key=lambda b: (b.mtime_ns, b.seq)):
            if total <= self.max_total_bytes:
                break
            doomed.append(b)
            total -= b.size
        return doomed


def backups_of(active: Path) -> list[Backup]:
    """The rotated files of active file ``active`` that exist now: the regular files beside it named
    ``<stem>.<seq>.jsonl`` with ``seq`` of at least ``SEQ_DIGITS`` digits (logrotate's ``<stem>.1.jsonl`` is not)."""
    pattern = re.compile(re.escape(_stem(active)) + rf"\.(\d{{{SEQ_DIGITS},}})" + re.escape(SUFFIX))
    found = []
    try:
        entries = list(os.scandir(active.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            found.append(Backup(Path(entry.path), active, int(m.group(1)), st.st_size, st.st_mtime_ns))
    return found


AT_FDCWD = -100
RENAME_NOREPLACE = 1


def _libc_renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (Linux 3.15+), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, raising FileExistsError rather than replacing a ``dst`` that exists
    (another writer of the same path rotated to that name first): ``renameat2(RENAME_NOREPLACE)``; where the
    kernel or file system lacks it, a check and a rename (a narrow race left with two writers of one path)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))  # FileExistsError for EEXIST
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _stem(active: Path) -> str:
    """``traces-h-1`` of ``traces-h-1.jsonl``."""
    return active.name.removesuffix(SUFFIX)


def backup_path(active: Path, seq: int) -> Path:
    """The name of rotated file ``seq`` of ``active``: ``<stem>.<seq>.jsonl``."""
    return active.with_name(f"{_stem(active)}.{seq:0{SEQ_DIGITS}d}{SUFFIX}")


class RotatingFile:
    """Appends whole lines to ``path`` (created with its folder), rotating and expiring as ``retention`` says.

    ``group`` lists the active files that share the retention's total (this one included; default: this one),
    e.g. a process's trace and metrics files. Thread-safe; ``append`` raises OSError when the disk refuses the
    write (callers that must not raise catch it).
    """

    def __init__(self, path: str | os.PathLike[str], retention: Retention | None = None, group: Sequence[Path] = ()):
        self.path = Path(path)
        self.retention = retention or Retention()
        self.group = tuple(group) or (self.path,)
        self.retention.check_room(len(self.group))
        self.rotations = 0  # rotations done by this object
        self.reopens = 0  # reopens after an external rotation
        self.rotation_failures = 0
        self._retry_rotation_at = 0  # after a failed rotation: the size at which to try again
        self._lock = threading.Lock()
        self._closed = False
        self.pid = os.getpid()  # the process whose file this is (its name says so)
        self._fd: int | None = None  # None: (re)open at the next write
        self._fd = self._open()

    def _open(self) -> int:
        """The path opened for appending (its folder made again if it went away); OSError unless it is a regular
        file (never blocks: a FIFO at the path is refused, not waited on)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(self.path))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def inherited(self) -> bool:
        """Whether this process is a fork of the one that opened the file (so the file is not its own)."""
        return os.getpid() != self.pid

    def append(self, line: str) -> None:
        """Write ``line`` (one or more complete lines, newline-terminated) at the end of the active file.

        ValueError after ``close()`` or in a forked child (``inherited``: the file is its parent's); OSError when
        the file cannot be opened or written (the next call tries again). A write that failed halfway is cut off
        again where possible; a line never starts after an unterminated one (a newline goes first)."""
        data = line.encode("utf-8")
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path} is closed")
            if self.inherited:
                raise ValueError(f"{self.path} belongs to process {self.pid}, this is a fork of it")
            fd = self._current()
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.retention.max_file_bytes and size >= self._retry_rotation_at:
                fd = self._rotate(fd)
                size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # after a half-written line (ours before a failure, or someone else's)
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise

    def _current(self) -> int:
        """The descriptor of the file now at the path: the open one, or a new one if the path was moved away or
        replaced since (external rotation), or if an earlier open failed."""
        if self._fd is not None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            mine = os.fstat(self._fd)
            if st is not None and (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
                return self._fd
            os.close(self._fd)
            self._fd = None
            self.reopens += 1
        self._fd = self._open()
        return self._fd

    def _rotate(self, fd: int) -> int:
        """Rename the active file to the next free ``<stem>.<seq>.jsonl``, open a new one, expire; the descriptor
        to write to. If the rename fails, writing goes on in the same file, logged once, and the next try waits
        until it has grown by another ``max_file_bytes``."""
        seq = max((b.seq for b in backups_of(self.path)), default=0) + 1
        while True:
            try:
                rename_no_replace(self.path, backup_path(self.path, seq))
                break
            except FileExistsError:
                seq += 1  # another writer of this path took it
            except FileNotFoundError:
                return self._current()  # moved away meanwhile (logrotate, another writer): the file now at the path
            except OSError:
                self.rotation_failures += 1
                if self.rotation_failures == 1:
                    logger.exception("rotating %s failed; writing on to it (not logged again)", self.path)
                self._retry_rotation_at = os.fstat(fd).st_size + self.retention.max_file_bytes
                return fd
        self._retry_rotation_at = 0
        os.close(fd)
        self._fd = None
        self._fd = self._open()
        self.rotations += 1
        self._expire()
        return self._fd

    def _expire(self) -> None:
        backups = [b for active in self.group for b in backups_of(active)]
        for b in self.retention.expired(backups, len(self.group)):
            try:
                os.unlink(b.path)
            except FileNotFoundError:
                pass  # a sibling's rotation expired it first
            except OSError:
                logger.exception("deleting rotated telemetry file %s failed", b.path)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
