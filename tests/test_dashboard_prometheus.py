"""The Prometheus source against Debian's real ``prometheus``: it scrapes a client process's
``TQ_MOONCAKE_PROMETHEUS_PORT`` endpoint while the same process writes JSON-lines files; the Prometheus source
and the file source give the same figures, and both equal what the injector did."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tq_mooncake.cluster import free_port, http_ok, wait_until
from tq_mooncake.dashboard import metrics as m
from tq_mooncake.dashboard.sample_run import Tally
from tq_mooncake.dashboard.sources import FileSource, PrometheusSource
from tq_mooncake.telemetry.conventions import Outcome

PROMETHEUS = "/usr/bin/prometheus"
REPO = Path(__file__).resolve().parents[1]


def ready(url: str) -> bool:
    return http_ok(f"{url}/-/ready")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A private Prometheus on a free loopback port scraping ``127.0.0.1:<target port>`` every second."""
    assert Path(PROMETHEUS).is_file(), "run `make setup` (Debian package prometheus)"
    target, port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: tq-mooncake\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
    )
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: ready(url) or proc.poll() is not None, 30, "prometheus to be ready")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        yield url, target
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def same(a: m.Figures, b: m.Figures) -> None:
    assert a.operations == b.operations and a.outcomes == b.outcomes
    assert a.retried_operations == b.retried_operations and a.attempts == b.attempts
    assert a.key_failures == b.key_failures and a.keys == b.keys
    assert {k: v for k, v in a.latency.items() if v} == {k: v for k, v in b.latency.items() if v}
    for q in (0.5, 0.9, 0.99):
        assert a.latency_quantile(q) == pytest.approx(b.latency_quantile(q))
    assert (a.retry_rate, a.exhaustion_rate, a.ops_per_s) == (b.retry_rate, b.exhaustion_rate, b.ops_per_s)


def test_the_prometheus_source_returns_the_same_rates_as_the_files(shared_master, prometheus, tmp_path):
    url, target = prometheus
    folder = tmp_path / "telemetry"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TQ_MOONCAKE_"))}
    env.update(
        TQ_MOONCAKE_PROMETHEUS_PORT=str(target),
        TQ_MOONCAKE_TELEMETRY_DIR=str(folder),
        OTEL_SERVICE_NAME="prom-dashboard-test",
        OTEL_METRIC_EXPORT_INTERVAL="600000",
    )
    args = ["--master", shared_master.address, "--metadata", shared_master.metadata_server, "--operations", "40"]
    child = subprocess.Popen(
        [sys.executable, "-m", "tq_mooncake.dashboard.sample_run", *args, "--wait"],
        env=env,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    began = time.time() - 1
    source = PrometheusSource(url)
    try:
        tally = Tally.from_json(json.loads(child.stdout.readline()))
        assert tally.total == 40 and tally.retried == 14 and tally.outcome(Outcome.EXHAUSTED) == 6

        def scraped() -> bool:  # every counter at its final value, the histograms included
            f = m.window_figures(source.load(time.time() - 900, time.time()).increments, 0, math.inf)
            return (f.operations, f.retried_operations, f.latency[math.inf]) == (tally.total, tally.retried, 40)

        wait_until(scraped, 30, "prometheus to scrape the final counters", interval=0.5)
        end = time.time()
        from_prometheus = source.load(end - 900, end)
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for stream in (child.stdin, child.stdout):
            stream.close()

    assert from_prometheus.error is None
    prom = m.window_figures(from_prometheus.increments, end - 900, end)
    files = m.window_figures(FileSource(folder).load(end - 900, end).increments, end - 900, end)
    same(prom, files)
    assert prom.retry_rate == pytest.approx(tally.retried / tally.total)
    assert prom.exhaustion_rate == pytest.approx(tally.outcome(Outcome.EXHAUSTED) / tally.total)
    assert prom.key_failures == tally.key_failures and prom.attempts == tally.attempts
    assert prom.ops_per_s == pytest.approx(40 / 900)
    (origin, _), *_ = m.by_origin(from_prometheus.increments, end - 900, end)
    (file_origin, _), *_ = m.by_origin(FileSource(folder).load(end - 900, end).increments, end - 900, end)
    assert origin == file_origin  # host, pid and service from target_info, as in the files' resource
    assert all(i.time > began for i in from_prometheus.increments)
