"""``Background``: a command the suite runs at the lowest priority while its other tests run (tests/conftest.py's
``background_jobs`` starts the modules' ``BACKGROUND_JOBS``). On ``sys.path`` through pytest's ``pythonpath``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


class Background:
    """A command started now in its own session, with its output in ``log``; ``wait()`` returns its exit code
    (or fails the test at ``timeout``); ``kill()`` ends it and whatever it left running (Ray's processes).

    It runs while the rest of the suite does, at the lowest priority, so that it takes the CPU time the suite
    leaves idle instead of slowing the tests that run meanwhile: nice 19 for it and all it starts, and, where
    the kernel schedules by session (autogroup, Debian's default: each session gets an equal share of the CPUs
    whatever the nice values in it), nice 19 for its session's group too."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> None:
        self.log = log
        self.killed = False
        with open(log, "w") as out:
            self.proc = subprocess.Popen(  # nice execs the command: the same pid, leading its own session
                ["nice", "-n", "19", *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with contextlib.suppress(OSError):  # no autogroup scheduling here: the nice value alone does it
            Path(f"/proc/{self.proc.pid}/autogroup").write_text("19")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Idempotent: the group is signalled once (a later call could hit a new group that reused the id)."""
        if self.killed:
            return
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
