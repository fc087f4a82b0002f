"""The page's "Store health" section: what the master reports (capacity, keys, clients, segments, evictions, RPC
failures) on the time axis of the client's charts, with the client's retry rate and the mounted segments in one
chart. Text from the master or the network (RPC names, errors) is shown only through charts, ``st.code`` and
``st.text``, never as Markdown or HTML."""

from __future__ import annotations

import time

import altair as alt
import streamlit as st

from .charts import Rows, age, line_chart, lines
from .charts import cards as show_cards
from .store_health import (
    OPTION,
    MasterPoller,
    StoreFigures,
    StoreSnapshot,
    StoreWindow,
    failure_rows,
    normalize_url,
    store_series,
    store_window,
)
from .tiles import DASH, percent

TOP_RPCS = 5  # RPCs drawn on their own in the RPC failures chart (the most failing); the others summed in one line


_STARTED: list[MasterPoller] = []  # every poller _poller started, for stop_pollers


@st.cache_resource(show_spinner=False)
def _poller(url: str) -> MasterPoller:
    poller = MasterPoller(url).start()
    _STARTED.append(poller)
    return poller


def stop_pollers() -> None:
    """Stop every poller ``poller_for`` started in this process and forget them (tests; a server's exit)."""
    _poller.clear()
    while _STARTED:
        _STARTED.pop().stop()


def poller_for(url: str) -> MasterPoller:
    """The started poller of ``url`` (``normalize_url`` applied first: ValueError if it is none), one per URL in this
    Streamlit server process, shared by every session."""
    return _poller(normalize_url(url))


def size(n: float) -> str:
    """``512 B``, ``64.0 MiB``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(x: float | None) -> str:
    return DASH if x is None else f"{x:,.0f}"


RETRY_AND_SEGMENTS = {
    "retried %": "#d62728",
    "segments mounted": "#1f77b4",
    "active clients": "#7f7f7f",
    "segments lost": "#9467bd",
    "segments joined": "#2ca02c",
}
"""Series of the first chart -> colour (fixed, so that the retry rate stands out from the counts)."""


def retry_and_segments(
    retry_rows: Rows, series: list[tuple[float, StoreFigures]], start: float, end: float
) -> alt.LayerChart:
    """The client's retry rate (left axis) layered with the segments mounted (thick) and the active clients (dashed,
    over it: they often coincide, one client per storage process) as steps on the right axis, and a triangle where
    segments were lost (down) or joined (up) in an interval: a replaced storage process shows there even when its
    successor mounted before the master dropped it (the count never dips)."""
    counts: Rows = [(t, {"segments mounted": f.segments, "active clients": f.clients}) for t, f in series]
    churn: Rows = [
        (t, {"segments lost": f.segments_lost or None, "segments joined": f.segments_joined or None}) for t, f in series
    ]
    colors = alt.Scale(domain=list(RETRY_AND_SEGMENTS), range=list(RETRY_AND_SEGMENTS.values()))
    color = alt.Color("series:N", title=None, scale=colors, legend=alt.Legend(orient="bottom", labelOffset=10))
    left = line_chart(retry_rows, "%", start, end).encode(color=color)
    kinds = ["segments mounted", "active clients"]
    right = (
        line_chart(counts, "count", start, end)
        .mark_line(point=True, interpolate="step-after")
        .encode(
            color=color,
            strokeDash=alt.StrokeDash("series:N", legend=None, scale=alt.Scale(domain=kinds, range=[[1, 0], [6, 3]])),
            strokeWidth=alt.StrokeWidth("series:N", legend=None, scale=alt.Scale(domain=kinds, range=[4, 1.5])),
        )
    )
    shapes = alt.Shape(
        "series:N",
        legend=None,
        scale=alt.Scale(domain=["segments lost", "segments joined"], range=["triangle-down", "triangle-up"]),
    )
    marks = line_chart(churn, "count", start, end).mark_point(size=140, filled=True).encode(color=color, shape=shapes)
    return alt.layer(left, alt.layer(right, marks)).resolve_scale(y="independent")


def store_panel(snapshot: StoreSnapshot | None, retry_rows: Rows, start: float, end: float, step: float) -> None:
    """Draw the section for the window ``(start, end]`` in bins of ``step`` (those of the client's charts);
    ``snapshot``: the master's samples for the window (None: no source configured: it says how to give one);
    ``retry_rows``: the client's retry rate per bin, ``[(bin end, {"retried %": value})]``."""
    st.subheader("Store health")
    if snapshot is None:
        st.info(
            f"No master metrics: give the dashboard {OPTION} HOST:PORT (the master's --metrics_port) to show "
            "the store's capacity, keys, clients, segments, evictions and RPC failures here."
        )
        return
    st.caption("as the master reports them, on the time axis of the client's charts")
    st.text(snapshot.description)
    now = time.time()
    if snapshot.error:
        if snapshot.failing_since is not None:
            since = time.strftime("%H:%M:%S", time.localtime(snapshot.failing_since))
            st.warning(f"Cannot read the master's metrics since {since} ({age(now - snapshot.failing_since)} ago).")
        else:
            st.warning("Cannot read the master's metrics.")
        st.code(snapshot.error, language=None)
    window = store_window(snapshot.samples, start, end)
    if window.latest is None:
        newest = max((s.time for s in snapshot.samples), default=None)
        if snapshot.error and newest is None:
            return
        st.info(
            "No master sample in this window"
            + (f": the newest is {age(now - newest)} old." if newest is not None else " yet.")
        )
        return
    cards(window, now)
    charts(window, store_series(snapshot.samples, start, end, step), retry_rows, start, end, step)


def cards(window: StoreWindow, now: float) -> None:
    latest = window.latest
    assert latest is not None
    measured = window.measured > 0
    shown = (
        (
            "Capacity used",
            percent(latest.used_fraction),
            f"{size(latest.allocated_bytes)} of {size(latest.capacity_bytes)}",
        ),
        ("Keys", _count(latest.keys), "objects the master holds"),
        ("Clients", _count(latest.clients), "active: processes the master counts as alive"),
        (
            "Segments",
            _count(latest.segments),
            f"mounted; {window.segments_lost:,} lost, {window.segments_joined:,} joined in the window"
            if measured
            else "mounted: storage processes' memory",
        ),
        ("Evictions", _count(window.evictions if measured else None), "keys evicted in the window"),
        (
            "RPC failures",
            _count(window.rpc_failures if measured else None),
            f"of {_count(window.rpc_requests if measured else None)} requests in the window",
        ),
    )
    show_cards(shown)
    st.caption(f"gauges as of the latest sample, {age(now - latest.time)} old")


def charts(
    window: StoreWindow,
    series: list[tuple[float, StoreFigures]],
    retry_rows: Rows,
    start: float,
    end: float,
    step: float,
) -> None:
    every = f"per {age(step)} interval"
    st.subheader("Retry rate and storage segments")
    st.caption(
        f"the client's retried % (left axis); segments mounted and active clients (right axis), ▼ segments lost and "
        f"▲ joined in an interval; {every}"
    )
    st.altair_chart(retry_and_segments(retry_rows, series, start, end))
    left, right = st.columns(2)
    with left:
        st.subheader("Capacity used")
        st.caption(f"allocated bytes over the mounted capacity, %; {every}")
        used = [(t, {"capacity used %": None if f.used_fraction is None else f.used_fraction * 100}) for t, f in series]
        lines(used, "%", start, end)
    with right:
        st.subheader("Keys")
        st.caption(f"objects the master holds; {every}")
        lines([(t, {"keys": f.keys}) for t, f in series], "count", start, end)
    left, right = st.columns(2)
    with left:
        st.subheader("Evictions")
        st.caption(f"keys evicted per second; {every}")
        lines([(t, {"evictions/s": f.evictions_per_s}) for t, f in series], "keys/s", start, end)
    with right:
        st.subheader("RPC failures by RPC")
        st.caption(f"failed master RPCs per second, the {TOP_RPCS} most failing on their own; {every}")
        if window.rpc_failures:
            rows = failure_rows(series, window.top_rpcs(TOP_RPCS))
            lines(rows, "failures/s", start, end)
        else:
            st.caption("no master RPC failed in this window")
