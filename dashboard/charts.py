"""Drawing helpers shared by the page's views: rows over time as a frame, line charts on the window's time axis,
and ages as the page writes them. Views call these so that every chart over time shares one x axis."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd
import streamlit as st

Rows = list[tuple[float, dict[str, float | None]]]
"""``(time, {series: value})`` per interval; None (or a missing series) where an interval has no value."""


def frame(rows: Rows) -> pd.DataFrame:
    index = pd.to_datetime([t for t, _ in rows], unit="s", utc=True)
    return pd.DataFrame([r for _, r in rows], index=index).astype(float)


def time_domain(start: float, end: float) -> list[str]:
    """The window as an altair scale domain: every chart over time draws exactly ``(start, end]``."""
    return [pd.Timestamp(start, unit="s", tz="UTC").isoformat(), pd.Timestamp(end, unit="s", tz="UTC").isoformat()]


def time_format(start: float, end: float) -> str:
    """The time axis' label format for the window: 24-hour clock, seconds under an hour, the date past two days."""
    seconds = end - start
    if seconds <= 3600:
        return "%H:%M:%S"
    return "%H:%M" if seconds <= 2 * 86400 else "%b %d %H:%M"


def time_axis(start: float, end: float) -> alt.X:
    """The x encoding of every chart over time: exactly the window, labelled in ``time_format``."""
    return alt.X(
        "time:T",
        title=None,
        scale=alt.Scale(domain=time_domain(start, end)),
        axis=alt.Axis(format=time_format(start, end)),
    )


def line_chart(rows: Rows, unit: str, start: float, end: float) -> alt.Chart:
    """A line chart over the window with a dot per interval that has data (intervals without are left out)."""
    long = frame(rows).rename_axis("time").reset_index().melt("time", var_name="series", value_name=unit).dropna()
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=time_axis(start, end),
            y=alt.Y(f"{unit}:Q"),
            color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom")),
        )
    )


def lines(rows: Rows, unit: str, start: float, end: float) -> None:
    """Draw ``line_chart``."""
    st.altair_chart(line_chart(rows, unit, start, end))


def cards(items: Sequence[tuple[str, str, str]]) -> None:
    """A row of bordered cards, one per ``(label, value, caption)`` (no caption line for ``""``)."""
    for column, (label, value, caption) in zip(st.columns(len(items)), items, strict=True):
        with column, st.container(border=True):
            st.metric(label, value)
            if caption:
                st.caption(caption)


def age(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
