"""The Prometheus source against Debian's real ``prometheus``: it scrapes a client process's
``TQ_MOONCAKE_PROMETHEUS_PORT`` endpoint while the same process writes JSON-lines files; the Prometheus source
and the file source give the same figures, and both equal what the injector did; the same for the storage-node
counts of a process that reports node loss."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_server import running_prometheus  # tests/support

from tq_mooncake.cluster import free_port, wait_until
from tq_mooncake.dashboard import metrics as m
from tq_mooncake.dashboard.sample_run import Tally
from tq_mooncake.dashboard.sources import FileSource, PrometheusSource
from tq_mooncake.telemetry.conventions import Outcome

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def scraping_a_free_port(folder: Path) -> Iterator[tuple[str, int]]:
    """A private Prometheus scraping ``127.0.0.1:<target port>`` every second: its URL and that free port."""
    target = free_port()
    with running_prometheus(folder, [f"127.0.0.1:{target}"], "tq-mooncake") as url:
        yield url, target


@pytest.fixture(scope="module")
def prometheuses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, int]]]:
    """One Prometheus per test of this module, all started at the first: Prometheus scrapes a new target only
    some 5 s after it starts (its discovery and scrape managers update every 5 s), which the later tests then
    no longer wait for. Separate servers keep each test's series apart."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(scraping_a_free_port(tmp_path_factory.mktemp(f"prometheus-{name}")))
            for name in ("rates", "nodes")
        }


@pytest.fixture
def prometheus(prometheuses: dict[str, tuple[str, int]]) -> tuple[str, int]:
    return prometheuses["rates"]


@pytest.fixture
def nodes_prometheus(prometheuses: dict[str, tuple[str, int]]) -> tuple[str, int]:
    return prometheuses["nodes"]


def same(a: m.Figures, b: m.Figures) -> None:
    assert a.operations == b.operations and a.outcomes == b.outcomes
    assert a.retried_operations == b.retried_operations and a.attempts == b.attempts
    assert a.key_failures == b.key_failures and a.keys == b.keys
    assert {k: v for k, v in a.latency.items() if v} == {k: v for k, v in b.latency.items() if v}
    for q in (0.5, 0.9, 0.99):
        assert a.latency_quantile(q) == pytest.approx(b.latency_quantile(q))
    assert (a.retry_rate, a.exhaustion_rate, a.ops_per_s) == (b.retry_rate, b.exhaustion_rate, b.ops_per_s)


@contextlib.contextmanager
def exporting_child(argv: list[str], target: int, folder: Path, service: str, **popen: Any) -> Iterator[Any]:
    """A Python child (``argv`` after the interpreter) exporting to the scrape port ``target`` and to JSON-lines
    files in ``folder`` as ``service`` (no inherited OTel/TQ settings); killed at the end if it still runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TQ_MOONCAKE_"))}
    env.update(
        TQ_MOONCAKE_PROMETHEUS_PORT=str(target),
        TQ_MOONCAKE_TELEMETRY_DIR=str(folder),
        OTEL_SERVICE_NAME=service,
        OTEL_METRIC_EXPORT_INTERVAL="600000",
    )
    child = subprocess.Popen(
        [sys.executable, *argv], env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for stream in (child.stdin, child.stdout):
            stream.close()


def test_the_prometheus_source_returns_the_same_rates_as_the_files(shared_master, prometheus, tmp_path):
    url, target = prometheus
    folder = tmp_path / "telemetry"
    args = ["--master", shared_master.address, "--metadata", shared_master.metadata_server, "--operations", "40"]
    argv = ["-m", "tq_mooncake.dashboard.sample_run", *args, "--wait"]
    began = time.time() - 1
    source = PrometheusSource(url)
    with exporting_child(argv, target, folder, "prom-dashboard-test", stderr=subprocess.DEVNULL) as child:
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


NODE_LOSS = """
import json, sys
from collections import Counter
from tq_mooncake import telemetry
from tq_mooncake.client.codes import ErrorCode
from tq_mooncake.client.replica_routing import RoutingReport
from tq_mooncake.telemetry import OTelObserver
from tq_mooncake.telemetry.conventions import Operation

configured = telemetry.configure()
obs = OTelObserver(configured.tracer_provider, configured.meter_provider, ejected_nodes=lambda: 1)
for endpoint in ["127.0.0.1:12345", "127.0.0.1:12345"] + [f"10.1.0.{i}:7000" for i in range(256)]:
    obs.node_ejected(endpoint)  # 257 endpoints: the last one is counted under _OTHER
for operation, down, fallbacks in (("get", {"127.0.0.1:12345"}, {"10.1.0.1:7000": 3}), ("put", {"10.1.0.1:7000"}, {})):
    scope = obs.operation(Operation(operation), 4)
    routing = RoutingReport(down=down, fallbacks=Counter(fallbacks))
    scope.attempt(0, 1, 4, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 2}), 0, routing)
configured.force_flush()
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
"""


def test_the_prometheus_source_shows_the_storage_node_counts_of_the_files(nodes_prometheus, tmp_path):
    """A process reports node loss (through the real OTelObserver and configure()'s exporters); Prometheus' and
    the files' figures per storage endpoint equal what it emitted, ``_OTHER`` (no port) included."""
    url, target = nodes_prometheus
    folder = tmp_path / "telemetry"
    source = PrometheusSource(url)
    with exporting_child(["-c", NODE_LOSS], target, folder, "prom-nodes-test") as child:
        assert json.loads(child.stdout.readline()) == {"ready": True}

        def scraped() -> m.Figures:
            return m.window_figures(source.load(time.time() - 60, time.time()).increments, 0, math.inf)

        wait_until(lambda: sum(scraped().ejections.values()) == 258, 30, "prometheus to scrape the node counters")
        end = time.time()
        from_prometheus = source.load(end - 60, end)
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(30) == 0

    from_files = FileSource(folder).load(end - 60, end)
    expected = {
        "127.0.0.1:12345": (2, 1, 0),
        "10.1.0.1:7000": (1, 1, 3),
        "_OTHER": (1, 0, 0),
        **{f"10.1.0.{i}:7000": (1, 0, 0) for i in (0, *range(2, 255))},
    }
    for snap in (from_prometheus, from_files):
        assert snap.error is None
        rows = m.storage_nodes(m.window_figures(snap.increments, end - 60, end))
        assert {r.endpoint: (r.ejections, r.failures, r.fallbacks) for r in rows} == expected
        assert rows[0].endpoint in ("127.0.0.1:12345", "10.1.0.1:7000")  # the failures first
        assert m.ejected_now(snap.gauges, end - 60, end) == (1.0, 1)
    put = m.make_filter(["put"])
    assert m.window_figures(from_prometheus.increments, end - 60, end, put).node_failures == Counter(
        {"10.1.0.1:7000": 1}
    )
