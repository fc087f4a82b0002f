"""The Streamlit page: how often the client retries, how often retries run out, with which codes, where; and
which storage endpoints the clients lost and routed around.

Run it with ``tq-mooncake dashboard`` or ``streamlit run <this file> -- --dir DIR`` (flags: ``settings``).
Text that comes from metrics (host, service, code and endpoint names) is only shown through ``st.dataframe``,
widget options and charts, never as Markdown or HTML.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from tq_mooncake.dashboard import metrics as m
from tq_mooncake.dashboard.charts import age, frame, lines
from tq_mooncake.dashboard.charts import cards as show_cards
from tq_mooncake.dashboard.failures import SpanSource
from tq_mooncake.dashboard.failures_view import failures_panel
from tq_mooncake.dashboard.jaeger import JaegerSource
from tq_mooncake.dashboard.settings import WINDOWS, Settings, Thresholds, parse_settings
from tq_mooncake.dashboard.sources import FileSource, PrometheusSource, Snapshot, Source
from tq_mooncake.dashboard.store_health import StoreSnapshot, prometheus_store
from tq_mooncake.dashboard.store_view import poller_for, store_panel
from tq_mooncake.dashboard.tiles import DASH, Tile, duration, percent, tiles
from tq_mooncake.dashboard.trace_files import TraceFileSource
from tq_mooncake.telemetry import conventions as c

APP = Path(__file__).resolve()
ALL_SPAN_PROMETHEUS = WINDOWS["7d"]
WINDOW_NAMES = {
    "1m": "last minute",
    "5m": "last 5 min",
    "15m": "last 15 min",
    "1h": "last hour",
    "6h": "last 6 h",
    "24h": "last 24 h",
    "7d": "last 7 days",
    "all": "all data",
}


def script_argv() -> list[str]:
    """The script's flags under ``streamlit run app.py -- ...``; none when another program (a test) runs it."""
    return sys.argv[1:] if sys.argv and Path(sys.argv[0]).resolve() == APP else []


def source_for(kind: str, target: str) -> Source:
    """This browser session's source (kept in session state: a file source remembers its offsets)."""
    key = (kind, target)
    if st.session_state.get("_source_key") != key:
        st.session_state["_source"] = PrometheusSource(target) if kind == "Prometheus" else FileSource(target)
        st.session_state["_source_key"] = key
    return st.session_state["_source"]


@dataclass(frozen=True)
class Panels:
    """Where the panels beside the metrics read from: ``spans`` for recent failures, ``store`` the master's health for
    a time range (None: not configured; the panel says how to give one)."""

    spans: SpanSource | None
    store: Callable[[float, float], StoreSnapshot] | None


@st.cache_resource(show_spinner=False, max_entries=8)
def trace_files(folder: str) -> TraceFileSource:
    """One trace-file source per folder for the whole server (it is thread-safe): sessions share what it read."""
    return TraceFileSource(folder)


@st.cache_resource(show_spinner=False, max_entries=8)
def jaeger_source(url: str, ui_url: str | None) -> JaegerSource:
    return JaegerSource(url, ui_url)


def panels_for(settings: Settings, source: Source) -> Panels:
    """The span and store sources of these settings: Jaeger if ``--jaeger`` names it, else the trace files of the
    folder; the master's health from Prometheus in Prometheus mode, else from ``--master-metrics`` if given."""
    if settings.jaeger:
        spans: SpanSource | None = jaeger_source(settings.jaeger, settings.jaeger_ui)
    elif isinstance(source, FileSource):
        spans = trace_files(str(source.folder))
    elif Path(settings.folder).is_dir():
        spans = trace_files(settings.folder)
    else:
        spans = None
    if isinstance(source, PrometheusSource):
        prometheus = source
        store: Callable[[float, float], StoreSnapshot] | None = lambda s, e: prometheus_store(prometheus, s, e)  # noqa: E731
    elif settings.master_metrics:
        store = poller_for(settings.master_metrics).snapshot
    else:
        store = None
    return Panels(spans, store)


def sidebar(settings: Settings) -> tuple[Source, str, Thresholds, float | None]:
    """Source, window, thresholds and refresh period chosen in the sidebar."""
    with st.sidebar:
        st.header("Source")
        kind = st.radio("Read from", ["Files", "Prometheus"], index=1 if settings.prometheus else 0, key="kind")
        if kind == "Files":
            target = st.text_input("Folder of OTLP JSON-lines files", settings.folder, key="folder")
        else:
            target = st.text_input("Prometheus URL", settings.prometheus or "http://127.0.0.1:9090", key="url")
        window = st.selectbox(
            "Time window",
            list(WINDOWS),
            index=list(WINDOWS).index(settings.window),
            format_func=WINDOW_NAMES.__getitem__,
            key="window",
        )
        auto = st.toggle("Auto-refresh", value=not settings.paused, key="auto")
        every = st.number_input("Refresh every (s)", 1.0, 3600.0, float(settings.refresh_s), 1.0, key="every")
        with st.expander("Alert thresholds"):
            t = settings.thresholds
            thresholds = Thresholds(
                st.number_input(
                    "Retry rate (share of operations)", 0.0, 1.0, t.retry_rate, 0.01, "%.4f", key="a_retry"
                ),
                st.number_input("Exhaustion rate (share)", 0.0, 1.0, t.exhaustion_rate, 0.001, "%.4f", key="a_exh"),
                st.number_input("Key failures/s", 0.0, None, t.key_failures_per_s, 1.0, key="a_keys"),
                st.number_input("p99 latency (s)", 0.0, None, t.p99_s, 0.1, key="a_p99"),
            )
    default = settings.folder if kind == "Files" else (settings.prometheus or "http://127.0.0.1:9090")
    return source_for(kind, target.strip() or default), window, thresholds, (every if auto else None)


def show_tile(tile: Tile) -> None:
    with st.container(border=True):
        st.metric(tile.label, tile.value, tile.delta, "inverse" if tile.worse_when_up else "normal", help=tile.help)
        st.caption(tile.caption)
        if tile.alert:
            st.markdown(f":red[**ALERT** above {tile.threshold}]")
        elif tile.threshold:
            st.markdown(f":green[ok] (alert above {tile.threshold})")


def chart_step(start: float, end: float) -> float:
    """The interval of every chart over time (about 30 per window, at least 1 s)."""
    return max(1.0, (end - start) / 30)


def charts(
    snapshot: Snapshot, series: list[tuple[float, m.Figures]], step: float, start: float, end: float, keep: m.Filter
) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Retry and exhaustion rate")
        st.caption("share of operations in each interval, %")
        lines(rate_rows(series), "%", start, end)
    with right:
        st.subheader("Failed keys by error code")
        st.caption("key failures per second (per attempt), stacked by code")
        codes = sorted({code for _, f in series for code in f.key_failures})
        if codes:
            st.bar_chart(frame([(t, {code: f.key_failures[code] / step for code in codes}) for t, f in series]))
        else:
            st.caption("no key failed in this window")
    left, right = st.columns(2)
    whole = m.window_figures(snapshot.increments, start, end, keep)
    with left:
        st.subheader("Attempts by attempt number")
        st.caption("store calls per attempt number in the window (1 = first try; 10 = 10th and later)")
        if whole.attempts:
            depth = pd.DataFrame({"attempts": [whole.attempts[n] for n in sorted(whole.attempts)]})
            depth.index = pd.Index(sorted(whole.attempts), name="attempt")
            st.bar_chart(depth)
    with right:
        st.subheader("Operation latency")
        st.caption("p50 / p90 / p99 of client-call duration per interval, ms")
        quantiles = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
        rows = [(t, {k: _ms(f.latency_quantile(q)) for k, q in quantiles.items()}) for t, f in series]
        lines(rows, "ms", start, end)


def rate_rows(series: list[tuple[float, m.Figures]]) -> list[tuple[float, dict[str, float | None]]]:
    """The retry and exhaustion rate per interval, in %."""
    return [(t, {"retried %": _pct(f.retry_rate), "exhausted %": _pct(f.exhaustion_rate)}) for t, f in series]


def _pct(x: float | None) -> float | None:
    return None if x is None else x * 100


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def host_table(snapshot: Snapshot, start: float, end: float, keep: m.Filter) -> None:
    st.subheader("Per host and process, worst first")
    rows = []
    for origin, f in m.by_origin(snapshot.increments, start, end, keep):
        who = dict(origin)
        rows.append(
            {
                "host": who.get("host", ""),
                "process": who.get("process", ""),
                "service": who.get("service", ""),
                "operations": f.operations,
                "ops/s": f.ops_per_s,
                "retried": percent(f.retry_rate),
                "retries/op": f.retries_per_operation,
                "exhausted": percent(f.exhaustion_rate),
                "failed": percent(f.failure_rate),
                "key failures/s": f.key_failures_per_s,
                "p99": duration(f.latency_quantile(0.99)),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True)


NODE_CHARTS = (
    ("ejections", "Ejections", "ejections", "times a client ejected (routed around) the endpoint"),
    ("failures", "Confirmed failures", "failures", "probe refused after a failed transfer, or a direct read failed"),
    ("fallbacks", "Replica fallbacks", "keys", "keys read from another replica than the one on the endpoint"),
)
CHART_ENDPOINTS = 8  # endpoints drawn on their own in the node charts (the worst); the others summed in one line


def storage_nodes(
    whole: m.Figures,
    gauges: list[m.Point],
    series: list[tuple[float, m.Figures]],
    step: float,
    start: float,
    end: float,
    keep: m.Filter,
) -> None:
    """Per storage endpoint: ejections, confirmed failures and replica fallbacks in the window (``whole``) and over
    time (``series``: the bins and time axis of the charts above), and how many endpoints the clients have ejected
    now."""
    st.subheader("Storage nodes")
    st.caption(
        "per storage endpoint (address:port; _OTHER: the endpoints a process saw after its first "
        f"{c.MAX_ENDPOINT_ATTRIBUTES}), counts only · ejections and ejected endpoints are not per operation: the "
        "operation filter leaves them as they are"
    )
    rows = m.storage_nodes(whole)
    ejected, reporting = m.ejected_now(gauges, start, end, keep)
    cards = (
        (
            "Ejected now",
            f"{ejected:,.0f}" if reporting else DASH,
            f"summed over {reporting} client process(es)" if reporting else "no client reports it",
        ),
        ("Ejections", f"{sum(whole.ejections.values()):,.0f}", "in the window"),
        ("Confirmed failures", f"{sum(whole.node_failures.values()):,.0f}", "one per endpoint per attempt"),
        ("Replica fallbacks", f"{sum(whole.fallbacks.values()):,.0f}", "keys read from another replica"),
    )
    show_cards(cards)
    if not rows:
        st.caption("no storage endpoint was ejected, failed or routed around in this window")
        return
    table = {
        "endpoint": [r.endpoint for r in rows],
        "ejections": [r.ejections for r in rows],
        "confirmed failures": [r.failures for r in rows],
        "replica fallbacks (keys)": [r.fallbacks for r in rows],
    }
    st.dataframe(pd.DataFrame(table), hide_index=True)
    for column, (count, title, unit, caption) in zip(st.columns(len(NODE_CHARTS)), NODE_CHARTS, strict=True):
        with column:
            st.subheader(title)
            st.caption(f"{caption}; per {age(step)} interval")
            worst = sorted((r for r in rows if getattr(r, count)), key=lambda r: -getattr(r, count))
            if worst:
                endpoints = [r.endpoint for r in worst[:CHART_ENDPOINTS]]
                lines(m.node_series(series, count, endpoints), unit, start, end)
            else:
                st.caption(f"no {title.lower()} in this window")


def window_bounds(window: str, snapshot_all: Snapshot | None, now: float, prometheus: bool) -> tuple[float, float]:
    seconds = WINDOWS[window]
    if seconds is not None:
        return now - seconds, now
    if prometheus or snapshot_all is None or not snapshot_all.increments:
        return now - (ALL_SPAN_PROMETHEUS or 0), now
    return min(i.time for i in snapshot_all.increments) - 1.0, now


def empty_state(source: Source, snapshot: Snapshot, window: str, now: float) -> bool:
    """Say why there is nothing to show, if so; True when the page should stop here."""
    if snapshot.error:
        st.warning("Cannot read the metrics source.")
        st.code(snapshot.error, language=None)
        if isinstance(source, FileSource):
            st.info(
                "Start clients with TQ_MOONCAKE_TELEMETRY_DIR set to this folder (or call "
                "tq_mooncake.telemetry.configure(telemetry_dir=...)); their metrics-*.jsonl files appear there."
            )
        return True
    if snapshot.newest is None:
        st.info(
            "No tq-mooncake metrics in this source yet. Clients export them every OTEL_METRIC_EXPORT_INTERVAL "
            "(60 s by default) and at exit."
        )
        return True
    if not snapshot.increments:
        st.info(f"No operations in the {WINDOW_NAMES[window]}: the newest data is {age(now - snapshot.newest)} old.")
        return True
    return False


def beside(
    panels: Panels,
    start: float,
    end: float,
    step: float,
    retried: list[tuple[float, dict[str, float | None]]],
    operations: list[str],
    hosts: list[str],
) -> None:
    """Store health (on the charts' intervals, with the client's retry rate ``retried``) and recent failures (under
    the page's operation and host filters)."""
    store_panel(None if panels.store is None else panels.store(start, end), retried, start, end, step)
    failures_panel(panels.spans, start, end, operations, hosts)


def body(source: Source, window: str, thresholds: Thresholds, panels: Panels) -> None:
    """Everything below the title: reloaded by the auto-refresh fragment."""
    now = time.time()
    prometheus = isinstance(source, PrometheusSource)
    seconds = WINDOWS[window]
    if seconds is None:
        snapshot = source.load(now - (ALL_SPAN_PROMETHEUS or 0) if prometheus else 0.0, now)
        start, end = window_bounds(window, snapshot, now, prometheus)
        before_start = start
    else:
        start, end = now - seconds, now
        before_start = start - seconds
        snapshot = source.load(before_start, end)
    if snapshot.unreadable:
        st.warning(f"{len(snapshot.unreadable)} metrics file(s) cannot be read:")
        st.code("\n".join(f"{name}: {why}" for name, why in snapshot.unreadable.items()), language=None)
    if snapshot.skipped_lines:
        st.warning(f"{snapshot.skipped_lines} malformed line(s) skipped. The last one:")
        st.code(snapshot.last_problem, language=None)
    step = chart_step(start, end)
    if empty_state(source, snapshot, window, now):
        beside(panels, start, end, step, [], [], [])  # the store and the failures still tell what happened
        return
    ops_col, hosts_col = st.columns(2)
    operations = ops_col.multiselect("Operation", c.OPERATIONS, placeholder="all operations", key="ops")
    hosts = hosts_col.multiselect("Host", m.hosts_of(snapshot.increments), placeholder="all hosts", key="hosts")
    keep = m.make_filter(operations, hosts)
    current = m.window_figures(snapshot.increments, start, end, keep)
    previous = m.window_figures(snapshot.increments, before_start, start, keep)
    if not current.operations:
        st.info(f"No operations match the filters in the {WINDOW_NAMES[window]}.")
    for column, tile in zip(st.columns(6), tiles(current, previous, thresholds), strict=True):
        with column:
            show_tile(tile)
    series = m.time_series(snapshot.increments, start, end, step, keep)
    charts(snapshot, series, step, start, end, keep)
    retried = [(t, {"retried %": row["retried %"]}) for t, row in rate_rows(series)]
    beside(panels, start, end, step, retried, operations, hosts)
    host_table(snapshot, start, end, keep)
    storage_nodes(current, snapshot.gauges, series, step, start, end, keep)
    caption = f"{WINDOW_NAMES[window]}, compared with the window before it · updated {time.strftime('%H:%M:%S')}"
    if isinstance(source, FileSource):
        caption += f" · {snapshot.files} file(s)"
    st.caption(caption)


def main() -> None:
    st.set_page_config(page_title="tq-mooncake retries", page_icon="🔁", layout="wide")
    settings = parse_settings(script_argv())
    source, window, thresholds, every = sidebar(settings)
    st.title("tq-mooncake: retries and exhaustion")
    st.text(source.description)
    st.fragment(run_every=every)(body)(source, window, thresholds, panels_for(settings, source))


main()
