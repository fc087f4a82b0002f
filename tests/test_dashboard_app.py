"""The Streamlit page under ``streamlit.testing.v1.AppTest``: tiles with their values, changes and alerts,
filters, the empty states, malformed lines counted, attribute text rendered as text, and the storage nodes view
on files the SDK exported."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.ipc
import pytest
from opentelemetry.exporter.otlp.json.file import FileMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from span_files import exhausted_get, exported, retried_put  # tests/support
from streamlit.testing.v1 import AppTest

from tq_mooncake.client.codes import ErrorCode
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.client.replica_routing import RoutingReport
from tq_mooncake.cluster import free_port
from tq_mooncake.dashboard import app as app_module
from tq_mooncake.dashboard import store_view
from tq_mooncake.telemetry import OTelObserver, metric_views
from tq_mooncake.telemetry.conventions import Operation, Outcome

pytestmark = pytest.mark.pure

APP = str(Path(app_module.__file__))
HOSTILE = "<script>window.__xss=1</script><img src=x onerror=alert(1)>"
BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def kv(attrs: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()]


def line(host: str, t: float, start: float, counts: dict[str, float], pid: int = 7) -> str:
    """One OTLP JSON line, as the file exporter writes it, of cumulative put counters: ``counts`` holds
    outcomes (``success``, ``exhausted``, ...), ``retried`` (retry.delay count), ``retries`` (attempt 2) and
    ``failures`` (TRANSFER_FAIL key failures); every call took 3 ms."""
    ns = {"startTimeUnixNano": str(int(start * 1e9)), "timeUnixNano": str(int(t * 1e9))}
    put = {"mooncake.operation": "put"}
    outcomes = {k: v for k, v in counts.items() if k not in ("retried", "retries", "failures")}

    def sums(name: str, points: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        dps = [{"attributes": kv(a), **ns, "asInt": str(int(v))} for a, v in points]
        return {"name": name, "sum": {"dataPoints": dps, "aggregationTemporality": 2, "isMonotonic": True}}

    total = sum(outcomes.values())
    buckets = [0] * 3 + [int(total)] + [0] * 12  # 3 ms: the (0.0025, 0.005] bucket
    metrics = [
        sums("mooncake.client.operations", [({**put, "mooncake.outcome": o}, n) for o, n in outcomes.items()]),
        sums(
            "mooncake.client.attempts",
            [({**put, "mooncake.attempt": "1", "mooncake.result": "ok"}, total)]
            + [({**put, "mooncake.attempt": "2", "mooncake.result": "ok"}, counts.get("retries", 0))],
        ),
        sums("mooncake.client.keys.failed", [({**put, "error.type": "TRANSFER_FAIL"}, counts.get("failures", 0))]),
        {
            "name": "mooncake.client.operation.duration",
            "histogram": {
                "dataPoints": [
                    {
                        "attributes": kv({**put, "mooncake.outcome": "success"}),
                        **ns,
                        "count": str(int(total)),
                        "sum": 0.003 * total,
                        "bucketCounts": [str(b) for b in buckets],
                        "explicitBounds": BUCKETS,
                    }
                ],
                "aggregationTemporality": 2,
            },
        },
        {
            "name": "mooncake.client.retry.delay",
            "histogram": {
                "dataPoints": [
                    {
                        "attributes": kv({**put, "mooncake.outcome": "success_after_retry"}),
                        **ns,
                        "count": str(int(counts.get("retried", 0))),
                        "sum": 0.0,
                        "bucketCounts": [str(int(counts.get("retried", 0)))] + ["0"] * 15,
                        "explicitBounds": BUCKETS,
                    }
                ],
                "aggregationTemporality": 2,
            },
        },
    ]
    res = kv({"host.name": host, "service.name": "svc"}) + [{"key": "process.pid", "value": {"intValue": str(pid)}}]
    return json.dumps({"resourceMetrics": [{"resource": {"attributes": res}, "scopeMetrics": [{"metrics": metrics}]}]})


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty telemetry folder the app reads (through TQ_MOONCAKE_TELEMETRY_DIR, as a client would set it)."""
    path = tmp_path / "telemetry"
    path.mkdir()
    monkeypatch.setenv("TQ_MOONCAKE_TELEMETRY_DIR", str(path))
    return path


def write_two_windows(folder: Path, host: str = "node-a") -> None:
    """Previous 15-min window: 100 calls, 5 retried, none exhausted. This window: 200 more calls (cumulative
    300), 30 of them retried with 40 retries, 4 exhausted, 90 key failures."""
    now = time.time()
    start = now - 1500
    lines = [
        line(host, now - 1200, start, {"success": 95, "success_after_retry": 5, "retried": 5, "retries": 5}),
        line(
            host,
            now - 60,
            start,
            {
                "success": 261,
                "success_after_retry": 34,
                "exhausted": 4,
                "budget_denied": 1,
                "retried": 35,
                "retries": 45,
                "failures": 90,
            },
        ),
    ]
    (folder / "metrics-node-a-7.jsonl").write_text("\n".join(lines) + "\n")


def run_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def tiles(at: AppTest) -> dict[str, tuple[str, str | None]]:
    return {metric.label: (metric.value, metric.delta) for metric in at.metric}


def markdown(at: AppTest) -> list[str]:
    return [
        e.value
        for kind in ("markdown", "caption", "info", "warning", "error", "title", "text")
        for e in getattr(at, kind)
    ]


def test_tiles_show_this_window_against_the_previous_one_with_alerts(folder):
    write_two_windows(folder)
    at = run_app()
    shown = tiles(at)
    # this window: 200 calls (300 - 100), 30 retried (35 - 5), 4 exhausted, 1 budget-denied
    assert shown["Retry rate"] == ("15.0%", "+10.00 pp")  # 30 / 200, before 5 / 100
    assert shown["Exhaustion rate"] == ("2.0%", "+2.00 pp")
    assert shown["Operations/s"] == ("0.22/s", "+0.11/s")  # 200 / 900 s, before 100 / 900 s
    assert shown["Key failures/s"] == ("0.10/s", "+0.10/s")  # 90 / 900 s
    assert shown["p50 latency"][0] == "3.8 ms"  # the middle of the (2.5 ms, 5 ms] bucket
    text = markdown(at)
    assert "**ALERT** above 5.0%" in " ".join(text)  # retry rate over the default 5% threshold
    assert any("0.20 retries per operation" in t for t in text)  # 40 retries / 200
    assert any("budget denied 0.50%" in t for t in text)
    table = at.dataframe[0].value
    assert list(table["host"]) == ["node-a"] and list(table["operations"]) == [200]


def test_filters_and_thresholds_change_the_tiles(folder):
    write_two_windows(folder)
    at = run_app()
    at.multiselect(key="ops").set_value(["get"]).run()
    assert tiles(at)["Retry rate"][0] == "—"  # no get calls
    assert any("No operations match" in t for t in markdown(at))
    at.multiselect(key="ops").set_value(["put"]).run()
    assert tiles(at)["Retry rate"][0] == "15.0%"
    at.number_input(key="a_retry").set_value(0.5).run()
    assert "**ALERT** above 5.0%" not in " ".join(markdown(at))


def test_missing_and_empty_sources_give_an_empty_state_not_a_stack_trace(folder, monkeypatch):
    at = run_app()
    assert any("No tq-mooncake metrics" in t for t in markdown(at)) and not at.metric
    monkeypatch.setenv("TQ_MOONCAKE_TELEMETRY_DIR", str(folder / "missing"))
    at = run_app()
    assert any("Cannot read the metrics source" in t for t in markdown(at))
    assert any("does not exist" in c.value for c in at.code)
    old = time.time() - 7200
    (folder / "metrics-old.jsonl").write_text(line("h", old, old - 10, {"success": 3}) + "\n")
    monkeypatch.setenv("TQ_MOONCAKE_TELEMETRY_DIR", str(folder))
    at = run_app()
    assert any("No operations in the last 15 min" in t and "2.0 h old" in t for t in markdown(at))
    at.sidebar.radio(key="kind").set_value("Prometheus").run()
    at.sidebar.text_input(key="url").set_value(f"http://127.0.0.1:{free_port()}").run()
    assert not at.exception
    assert any("cannot query" in c.value for c in at.code)


def test_a_malformed_line_is_skipped_and_counted(folder):
    write_two_windows(folder)
    with open(folder / "metrics-node-a-7.jsonl", "a") as f:
        f.write('{"resourceMetrics": [{"truncated\n')
        f.write("garbage\n")
    at = run_app()
    assert any("2 malformed line(s) skipped" in t for t in markdown(at))
    assert tiles(at)["Retry rate"][0] == "15.0%"  # the good lines still count


def test_attribute_text_is_rendered_as_text_never_as_markup(folder):
    write_two_windows(folder, host=HOSTILE)
    at = run_app()
    assert list(at.dataframe[0].value["host"]) == [HOSTILE]  # shown verbatim, as a table cell
    assert at.multiselect(key="hosts").options == [HOSTILE]  # a widget option: plain text
    assert not any("<script" in t or "<img" in t for t in markdown(at))  # never Markdown or HTML
    at.multiselect(key="hosts").set_value([HOSTILE]).run()
    assert tiles(at)["Retry rate"][0] == "15.0%"


def export_node_loss(folder: Path) -> None:
    """Real exported metrics (the SDK's file exporter, the project's views): two gets and a put that lost keys to
    TRANSFER_FAIL on two storage endpoints, three ejections, and one endpoint ejected now."""
    reader = PeriodicExportingMetricReader(FileMetricExporter(folder / "metrics-node-b-8.jsonl"), 3_600_000)
    resource = Resource({"host.name": "node-b", "process.pid": 8, "service.name": "svc"})
    provider = MeterProvider(metric_readers=[reader], resource=resource, views=metric_views())
    obs = OTelObserver(None, provider, ejected_nodes=lambda: 1)
    try:
        for endpoint in ("127.0.0.1:12345", "127.0.0.1:12345", "10.0.0.2:23456"):
            obs.node_ejected(endpoint)
        for operation, routing in (
            (Operation.GET, RoutingReport(down={"127.0.0.1:12345"}, fallbacks=Counter({"127.0.0.1:12345": 2}))),
            (Operation.GET, RoutingReport(fallbacks=Counter({"127.0.0.1:12345": 1, "10.0.0.2:23456": 4}))),
            (Operation.PUT, RoutingReport(down={"127.0.0.1:12345", "10.0.0.2:23456"})),
        ):
            scope = obs.operation(operation, 4)
            scope.attempt(0, 1, 4, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 2}), 0, routing)
            scope.end(OperationSummary(Outcome.SUCCESS, 1, 2, 2, 0, 0.0, 0))
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()


def chart_data(chart: Any) -> tuple[dict[str, Any], Any]:
    """An Altair chart's Vega-Lite spec and its data (a pandas frame)."""
    (dataset,) = chart.proto.datasets
    return json.loads(chart.proto.spec), pyarrow.ipc.open_stream(dataset.data.data).read_pandas()


def test_the_storage_nodes_view_shows_what_the_client_exported(folder):
    at = run_app()
    assert "Storage nodes" not in [h.value for h in at.subheader]  # no operations yet: the empty state
    export_node_loss(folder)
    at = run_app()
    assert "Storage nodes" in [h.value for h in at.subheader]
    shown = tiles(at)
    assert shown["Ejected now"][0] == "1" and shown["Ejections"][0] == "3"
    assert shown["Confirmed failures"][0] == "3" and shown["Replica fallbacks"][0] == "7"
    table = at.dataframe[1].value  # after the per-host table
    assert table.to_dict("list") == {
        "endpoint": ["127.0.0.1:12345", "10.0.0.2:23456"],
        "ejections": [2.0, 1.0],
        "confirmed failures": [2.0, 1.0],
        "replica fallbacks (keys)": [3.0, 4.0],
    }
    charts = [chart_data(chart) for chart in at.get("vega_lite_chart")]
    assert len(charts) == 4 + 3  # the four charts above, then ejections, failures, fallbacks over time
    (retry_spec, _), *_, (ejections, _), (failures, _), (fallbacks, per_interval) = charts
    for spec in (ejections, failures, fallbacks):  # the retry-rate chart's time axis
        assert spec["encoding"]["x"]["scale"] == retry_spec["encoding"]["x"]["scale"]
    assert per_interval.groupby("series")["keys"].sum().to_dict() == {"10.0.0.2:23456": 4.0, "127.0.0.1:12345": 3.0}
    at.multiselect(key="ops").set_value(["put"]).run()
    shown = tiles(at)  # puts: their failures only; ejections are not per operation
    assert (shown["Confirmed failures"][0], shown["Replica fallbacks"][0], shown["Ejections"][0]) == ("2", "0", "3")
    at.multiselect(key="hosts").set_value(["node-b"]).run()
    assert tiles(at)["Ejected now"][0] == "1"


# ------------------------------------------------------------------------------------------------ panels


@pytest.fixture
def stop_pollers() -> Iterator[None]:
    """Stops the master pollers the page started (one thread per URL in this process)."""
    yield
    store_view.stop_pollers()


def by_column(at: AppTest, column: str) -> Any:
    """The first table with ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_recent_failures_lists_the_failed_calls_of_the_trace_files_as_text(folder):
    write_two_windows(folder, host=HOSTILE)
    exported(folder, exhausted_get, retried_put, host=HOSTILE, name="traces-hostile-1.jsonl")
    at = run_app()
    assert "Recent failures" in [h.value for h in at.subheader]
    table = by_column(at, "failed keys")
    assert table[["operation", "outcome", "code", "keys", "failed keys", "attempts"]].values.tolist() == [
        ["get", "exhausted", "RPC_TIMEOUT", 10, 1, 4]
    ]
    assert list(table["host"]) == [HOSTILE]  # verbatim, in a table cell
    (option,) = at.selectbox(key="f_call").options
    assert HOSTILE in option  # a widget option: plain text
    assert not any("<script" in t or "<img" in t for t in markdown(at))
    shown = tiles(at)
    assert (shown["Outcome"][0], shown["Failed keys"][0], shown["Attempts"][0]) == ("exhausted", "1 of 10", "4")
    attempts = by_column(at, "storage endpoint")
    assert list(attempts["attempt"]) == [1, 1, 2, 3] and list(attempts["storage endpoint"])[-1] == "10.0.0.7:7001"
    timeline = json.loads(at.get("vega_lite_chart")[-1].proto.spec)  # the last chart: the attempt timeline
    backoff, bars = timeline["layer"]  # the back-off before each attempt, then the attempts from start to end
    assert bars["encoding"]["x2"]["field"] == backoff["encoding"]["x2"]["field"] == "to"
    assert len(at.get("vega_lite_chart")[-1].proto.datasets) == 2

    at.multiselect(key="f_outcomes").set_value(["exhausted", "success_after_retry"]).run()
    assert list(by_column(at, "failed keys")["outcome"]) == ["success_after_retry", "exhausted"]  # newest first
    at.multiselect(key="ops").set_value(["put"]).run()  # the page's filters apply to the panel too
    assert list(by_column(at, "failed keys")["operation"]) == ["put"]
    at.multiselect(key="f_outcomes").set_value(["exhausted"]).run()
    assert any("no call with these outcomes" in t for t in markdown(at))


def test_the_span_and_store_sources_say_what_is_missing_or_unreachable(folder, monkeypatch, stop_pollers):
    write_two_windows(folder)
    at = run_app()
    text = " ".join(markdown(at))
    assert "--master-metrics" in text  # store health: how to turn it on
    assert "no call with these outcomes" in text  # no span file yet: nothing failed
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr("sys.argv", [APP, "--master-metrics", f"{dead}/metrics", "--jaeger", dead])
    at = run_app()
    assert any("Cannot read the master's metrics since" in t for t in markdown(at))
    assert any("Cannot read the span source" in t for t in markdown(at))
    codes = [c.value for c in at.code]
    assert any("cannot reach" in c and "/metrics" in c for c in codes)
    assert any("cannot reach Jaeger" in c for c in codes)


def test_the_panels_still_show_when_no_client_reported_metrics(folder):
    exported(folder, exhausted_get, name="traces-h-1.jsonl")  # a client that failed and then stopped reporting
    at = run_app()
    assert any("No tq-mooncake metrics" in t for t in markdown(at))
    assert {"Store health", "Recent failures"} <= {h.value for h in at.subheader}
    assert list(by_column(at, "failed keys")["outcome"]) == ["exhausted"]
