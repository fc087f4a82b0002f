"""Debian's real ``prometheus`` for the tests: a private server on a free loopback port scraping given targets."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from tq_mooncake.cluster import free_port, http_ok, wait_until

PROMETHEUS = "/usr/bin/prometheus"


@contextlib.contextmanager
def running_prometheus(folder: Path, targets: Sequence[str], job: str) -> Iterator[str]:
    """A Prometheus on a free loopback port scraping ``targets`` (``host:port``) every second as ``job``, its data
    in ``folder``; yields its URL once it is ready, and stops it (TERM, then KILL) at the end."""
    assert Path(PROMETHEUS).is_file(), "run `make setup` (Debian package prometheus)"
    port = free_port()
    config = folder / "prometheus.yml"
    listed = ", ".join(f"'{t}'" for t in targets)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{listed}]\n"
    )
    url = f"http://127.0.0.1:{port}"
    with open(folder / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: http_ok(f"{url}/-/ready") or proc.poll() is not None, 30, "prometheus to be ready")
        assert proc.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
