"""The page's "Recent failures" panel: the latest calls that failed (or, on request, needed retries), newest first,
and the attempt timeline of one of them. Counts, codes, durations and storage endpoints only: spans carry no keys.

Text that comes from spans (host, service, code and endpoint names) is only shown through ``st.dataframe``, widget
options and charts, never as Markdown or HTML.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import altair as alt
import pandas as pd
import streamlit as st

from tq_mooncake.telemetry import conventions as c

from .charts import cards
from .failures import FAILED, SHOWN_OUTCOMES, Attempt, Call, SpanSource, select

SHOWN = 50
"""Calls listed (the newest); the timeline can open any of them."""
_HEX = re.compile(r"[0-9a-f]{1,32}")


def clock(t: float) -> str:
    """Local wall-clock time with milliseconds, as the page writes it."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def attempt_result(a: Attempt) -> str:
    """``ok``, ``partial`` or ``failed``, as the attempts metric says it."""
    if not a.failed:
        return c.RESULT_OK
    return c.RESULT_FAILED if a.failed >= a.keys else c.RESULT_PARTIAL


def calls_table(calls: Sequence[Call], link: str | None) -> pd.DataFrame:
    rows = []
    for call in calls:
        row = {
            "ended": clock(call.end),
            "operation": call.operation,
            "outcome": call.outcome,
            "code": call.error_type,
            "keys": call.keys,
            "failed keys": call.failed_keys,
            "attempts": call.attempt_count,
            "codes seen": ", ".join(call.codes),
            "duration ms": round(call.duration * 1000, 2),
            "host": call.who("host"),
            "process": call.who("process"),
            "service": call.who("service"),
        }
        if link:
            row["trace"] = trace_link(link, call.trace_id)
        rows.append(row)
    return pd.DataFrame(rows)


def trace_link(link: str, trace_id: str) -> str | None:
    """The trace's page in the span source's UI; None for an id that is not hex (never put into a URL)."""
    return link.replace("{trace_id}", trace_id) if _HEX.fullmatch(trace_id) else None


def attempts_table(call: Call) -> pd.DataFrame:
    rows = [
        {
            "chunk": a.chunk,
            "attempt": a.number,
            "keys": a.keys,
            "failed keys": a.failed,
            "result": attempt_result(a),
            "codes": ", ".join(a.codes),
            "backoff ms": round(a.backoff_s * 1000, 2),
            "start +ms": round((a.start - call.start) * 1000, 2),
            "duration ms": round(a.duration * 1000, 2),
            "storage endpoint": a.endpoint,
            "nodes down": a.nodes_down,
            "replica fallbacks": a.fallbacks,
            "unreachable keys": a.unreachable,
        }
        for a in call.attempts
    ]
    return pd.DataFrame(rows)


def timeline_chart(call: Call) -> alt.Chart:
    """One bar per attempt from its start to its end, in ms since the call began, a row per chunk and attempt;
    the back-off before an attempt as a thin bar ending where it starts."""
    rows, sleeps = [], []
    for a in call.attempts:
        row = f"chunk {a.chunk} · attempt {a.number}"
        begin, finish = (a.start - call.start) * 1000, (a.end - call.start) * 1000
        rows.append({"row": row, "from": begin, "to": max(finish, begin + 0.01), "result": attempt_result(a)})
        if a.backoff_s > 0:
            sleeps.append({"row": row, "from": max(0.0, begin - a.backoff_s * 1000), "to": begin})
    order = [r["row"] for r in rows]
    y = alt.Y("row:N", title=None, sort=order)
    x = alt.X("from:Q", title="ms since the call began")
    colors = alt.Scale(domain=list(c.ATTEMPT_RESULTS), range=["#2ca02c", "#ff7f0e", "#d62728"])
    bars = (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar(height=12)
        .encode(x=x, x2="to:Q", y=y, color=alt.Color("result:N", scale=colors, title="attempt"))
    )
    if not sleeps:
        return bars
    backoff = alt.Chart(pd.DataFrame(sleeps)).mark_bar(height=3, color="#7f7f7f").encode(x=x, x2="to:Q", y=y)
    return backoff + bars


def failures_panel(
    source: SpanSource | None,
    start: float,
    end: float,
    operations: Sequence[str],
    hosts: Sequence[str],
) -> None:
    """The panel for the calls of ``source`` that ended in ``(start, end]`` with an outcome of the panel's own filter
    (only those are asked for), under the page's operation and host filters. ``source`` None: no span source (it
    says how to give one)."""
    st.subheader("Recent failures")
    if source is None:
        st.caption("no span source")
        st.info("Pass --jaeger URL (Jaeger's query API), or --dir with the clients' traces-*.jsonl files.")
        return
    outcomes = st.multiselect(
        "Outcome", SHOWN_OUTCOMES, default=list(FAILED), key="f_outcomes", placeholder="failed outcomes"
    ) or list(FAILED)
    snapshot = source.load(start, end, outcomes)
    st.caption(
        f"from {snapshot.description} · every call that retried or failed is kept by the default sampler; counts, "
        "codes and storage endpoints only, never keys"
    )
    if snapshot.error:
        st.warning("Cannot read the span source.")
        st.code(snapshot.error, language=None)
        return
    if snapshot.notice:
        st.text(snapshot.notice)
    calls = select(snapshot.calls, start, end, outcomes, operations, hosts, limit=len(snapshot.calls))
    if not calls:
        st.caption("no call with these outcomes in this window")
        return
    st.caption(f"{len(calls):,} call(s) in the window, the newest {min(len(calls), SHOWN)} listed")
    shown = calls[:SHOWN]
    config = {"trace": st.column_config.LinkColumn("trace", display_text="open")} if snapshot.link else None
    st.dataframe(calls_table(shown, snapshot.link), hide_index=True, column_config=config)
    by_id = {call.id: call for call in shown}
    kept = st.session_state.get("f_call")
    if kept not in by_id:  # the call opened before, if it scrolled out of the newest listed: still there to keep
        earlier = next((call for call in calls if call.id == kept), None)
        if earlier is not None:
            by_id[earlier.id] = earlier
    chosen = st.selectbox(
        "Attempt timeline of",
        list(by_id),
        format_func=lambda key: _label(by_id[key]),
        key="f_call",
    )
    call = by_id.get(chosen or "", shown[0])
    _timeline(call, snapshot.link)


def _label(call: Call) -> str:
    code = f" {call.error_type}" if call.error_type else ""
    attempts = f"{call.attempt_count} attempts"
    return f"{clock(call.end)} · {call.operation} {call.outcome}{code} · {attempts} · {call.who('host')}"


def _timeline(call: Call, link: str | None) -> None:
    cards(
        (
            ("Outcome", call.outcome, ""),
            ("Failed keys", f"{call.failed_keys:,} of {call.keys:,}", ""),
            ("Attempts", f"{call.attempt_count:,}", ""),
            ("Duration", f"{call.duration * 1000:,.1f} ms", ""),
        )
    )
    if call.dropped:
        st.caption(f"{len(call.attempts):,} attempts shown; {call.dropped:,} more attempt spans were not kept")
    elif not call.complete:
        st.caption(f"{len(call.attempts)} of its {call.attempt_count} attempt spans were read")
    if call.attempts:
        st.altair_chart(timeline_chart(call))
        st.dataframe(attempts_table(call), hide_index=True)
    url = trace_link(link, call.trace_id) if link else None
    if url:
        st.link_button("Open the trace", url)
