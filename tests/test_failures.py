"""The recent-failures data: spans the real SDK and observer exported as OTLP JSON lines become calls with their
attempt timelines (``failures``), whatever order and lines the spans come in, within bounds; the trace-file source
reads them incrementally across rotation."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from span_files import clean_get, exhausted_get, exported, retried_put, spans_of  # tests/support

from tq_mooncake.dashboard import metrics as m
from tq_mooncake.dashboard.failures import (
    FAILED,
    LARGEST,
    MAX_ATTEMPTS,
    SHOWN_OUTCOMES,
    Attempt,
    Call,
    FailureBook,
    parse_spans_line,
    select,
)
from tq_mooncake.dashboard.failures_view import attempt_result, attempts_table, calls_table, trace_link
from tq_mooncake.dashboard.trace_files import TraceFileSource

pytestmark = pytest.mark.pure


def test_an_exhausted_call_comes_back_with_every_attempt_in_order(tmp_path):
    lines = exported(tmp_path, exhausted_get, retried_put, clean_get)
    book = FailureBook()
    book.add(spans_of(lines))
    (call,) = book.select(0, float("inf"))
    assert (call.operation, call.outcome, call.error_type) == ("get", "exhausted", "RPC_TIMEOUT")
    assert (call.keys, call.attempt_count, call.failed_keys, call.complete) == (10, 4, 1, True)
    assert call.origin == (("host", "host-a"), ("process", "4242"), ("service", "failures-test"))
    assert [(a.chunk, a.number, a.keys, a.failed, a.codes) for a in call.attempts] == [
        (0, 1, 5, 0, ()),
        (1, 1, 5, 2, ("TRANSFER_FAIL",)),
        (1, 2, 2, 1, ("RPC_TIMEOUT",)),
        (1, 3, 1, 1, ("RPC_TIMEOUT",)),
    ]
    assert [a.backoff_s for a in call.attempts] == [0.0, 0.0, 0.002, 0.004]
    last = call.attempts[-1]
    assert (last.endpoint, last.nodes_down, last.fallbacks) == ("10.0.0.7:7001", 1, 1)
    assert all(call.start <= a.start <= a.end <= call.end for a in call.attempts)
    assert call.codes == ("RPC_TIMEOUT", "TRANSFER_FAIL")
    assert [attempt_result(a) for a in call.attempts] == ["ok", "partial", "partial", "failed"]
    # the retried put is kept too, for the outcome filter; the clean get was dropped by the sampler
    assert [c.outcome for c in book.select(0, float("inf"), SHOWN_OUTCOMES)] == ["success_after_retry", "exhausted"]


def test_spans_join_whatever_order_and_lines_they_come_in(tmp_path):
    lines = exported(tmp_path, exhausted_get, retried_put)
    spans = spans_of(lines)
    expected = FailureBook()
    expected.add(spans)
    for order in (spans, spans[::-1], spans[1::2] + spans[::2]):
        book = FailureBook()
        for span in order:  # one span at a time: as if each came in its own export
            book.add([span])
        assert book.select(0, float("inf"), SHOWN_OUTCOMES) == expected.select(0, float("inf"), SHOWN_OUTCOMES)
        assert not book.pending  # every attempt found its call
    book = FailureBook()
    book.add(spans)
    book.add(spans)  # read twice (a copytruncate copy): counted once
    assert book.select(0, float("inf"), SHOWN_OUTCOMES) == expected.select(0, float("inf"), SHOWN_OUTCOMES)


def test_the_book_stays_within_its_bounds(tmp_path):
    lines = exported(tmp_path, *([exhausted_get] * 6), *([retried_put] * 20))
    spans = spans_of(lines)
    book = FailureBook(max_calls=4, max_pending=3)
    book.add(spans)
    kept = book.select(0, float("inf"), SHOWN_OUTCOMES)
    assert len(book.calls) == 8 and len(kept) == 8  # 4 of each kind: 20 retried calls push no failure out
    assert [c.end for c in kept] == sorted((c.end for c in kept), reverse=True)
    for name in ("mooncake.get", "mooncake.put"):
        newest = sorted((s for s in spans if s.name == name), key=lambda s: -s.end)[:4]
        assert {c.span_id for c in kept if c.operation == name[9:]} == {s.span_id for s in newest}
    assert all(c.complete for c in kept)  # the attempts come first (they end before their call): joined
    # attempts whose call never comes are held up to max_pending, the oldest dropped first
    orphans = FailureBook(max_pending=3)
    orphans.add([s for s in spans if s.name.endswith(".attempt")])
    assert sum(len(v) for v in orphans.pending.values()) <= 3


def test_absurd_attributes_are_clamped_and_a_call_keeps_at_most_max_attempts(tmp_path):
    (good,) = [s for s in spans_of(exported(tmp_path, retried_put)) if s.name == "mooncake.put"]
    odd = {"mooncake.attempts": "nan", "db.operation.batch.size": "1e30", "mooncake.keys.failed": "-5"}
    call = Call.from_span(dataclasses.replace(good, attrs={**good.attrs, **odd}))
    assert (call.attempt_count, call.keys, call.failed_keys) == (0, LARGEST, 0)
    attempt = dataclasses.replace(good, name="mooncake.put.attempt", parent_id=good.span_id, span_id="a")
    odd_attempt = Attempt.from_span(
        dataclasses.replace(attempt, attrs={"mooncake.backoff_s": "inf", "mooncake.chunk": "nan"})
    )
    assert (odd_attempt.backoff_s, odd_attempt.chunk, odd_attempt.number) == (0.0, 0, 1)
    book = FailureBook()
    many = [dataclasses.replace(attempt, span_id=f"{i:016x}") for i in range(MAX_ATTEMPTS + 10)]
    book.add([*many, good, *many[:5]])  # attempts before and after their call, some twice
    (kept,) = book.select(0, float("inf"), SHOWN_OUTCOMES)
    assert len(kept.attempts) == MAX_ATTEMPTS and len({a.span_id for a in kept.attempts}) == MAX_ATTEMPTS


def test_select_filters_by_window_outcome_operation_and_host(tmp_path):
    book = FailureBook()
    book.add(spans_of(exported(tmp_path, exhausted_get, retried_put, host="host-a")))
    book.add(spans_of(exported(tmp_path, exhausted_get, host="host-b")))
    everything = book.select(0, float("inf"), SHOWN_OUTCOMES)
    assert len(everything) == 3
    assert [c.who("host") for c in book.select(0, float("inf"))] == ["host-b", "host-a"]  # newest first
    assert {c.who("host") for c in book.select(0, float("inf"), hosts=["host-a"])} == {"host-a"}
    assert book.select(0, float("inf"), SHOWN_OUTCOMES, operations=["put"])[0].outcome == "success_after_retry"
    assert book.select(0, float("inf"), operations=["clear"]) == []
    newest = everything[0].end
    assert select(everything, newest - 1e-6, newest) == [everything[0]]  # (start, end]: the end is in
    assert select(everything, newest, newest + 1) == []
    assert set(FAILED) == {"exhausted", "non_retryable", "budget_denied", "deadline_exceeded"}


def test_malformed_and_foreign_lines(tmp_path):
    assert parse_spans_line('{"resourceMetrics": []}') == []  # another signal
    assert parse_spans_line('{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "http.get"}]}]}]}') == []
    for bad in ('{"mooncake.x": ', '["mooncake."]', '{"mooncake.": 1}'):
        with pytest.raises(ValueError):
            parse_spans_line(bad)
    no_time = {"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "mooncake.get", "traceId": "ab"}]}]}]}
    problems: list[str] = []
    assert parse_spans_line(json.dumps(no_time), problems) == [] and "malformed span" in problems[0]
    request = json.loads(exported(tmp_path, retried_put, name="two.jsonl")[-1])  # its operation span's line
    spans = request["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans.insert(0, no_time["resourceSpans"][0]["scopeSpans"][0]["spans"][0])  # a broken span in the same line
    problems.clear()
    assert [s.name for s in parse_spans_line(json.dumps(request), problems)] == ["mooncake.put"] and len(problems) == 1
    # the trace-file source counts them and reads on
    folder = tmp_path / "tel"
    folder.mkdir()
    good = exported(tmp_path, exhausted_get)
    (folder / "traces-h-1.jsonl").write_text('{"mooncake.x": \n' + "\n".join(good) + "\n")
    source = TraceFileSource(folder)
    snap = source.load(0, float("inf"))
    assert len(snap.calls) == 1 and source.skipped_lines == 1 and "1 line(s) with malformed spans" in snap.notice
    assert TraceFileSource(tmp_path / "missing").load(0, 1).error


def test_the_trace_file_source_reads_incrementally_across_rotation(tmp_path):
    folder = tmp_path / "tel"
    folder.mkdir()
    lines = exported(tmp_path, exhausted_get, exhausted_get, exhausted_get)
    active = folder / "traces-h-1.jsonl"
    source = TraceFileSource(folder)
    half = len(lines) // 2
    active.write_text("\n".join(lines[:half]) + "\n")
    (folder / "metrics-h-1.jsonl").write_text('{"resourceMetrics": []}\n')  # not a span file: never read
    first = source.load(0, float("inf"))
    read = source._tail.bytes_read
    os.rename(active, folder / "traces-h-1.000001.jsonl")  # our rotation; the rest goes to a new active file
    active.write_text("\n".join(lines[half:]) + "\n")
    second = source.load(0, float("inf"))
    assert len(first.calls) <= 2 and len(second.calls) == 3 and all(c.complete for c in second.calls)
    assert source._tail.bytes_read - read == active.stat().st_size  # the rotated file was not read again
    assert source.load(0, float("inf")).calls == second.calls and source.spans == 15
    assert source.files == 2


def test_the_tables_show_counts_and_codes_and_links_only_for_hex_ids(tmp_path):
    book = FailureBook()
    book.add(spans_of(exported(tmp_path, exhausted_get)))
    (call,) = book.select(0, float("inf"))
    table = calls_table([call], "http://127.0.0.1:16686/trace/{trace_id}")
    assert list(table.columns) == [
        "ended",
        "operation",
        "outcome",
        "code",
        "keys",
        "failed keys",
        "attempts",
        "codes seen",
        "duration ms",
        "host",
        "process",
        "service",
        "trace",
    ]
    assert table["trace"][0] == f"http://127.0.0.1:16686/trace/{call.trace_id}"
    assert trace_link("http://x/trace/{trace_id}", "../../admin") is None
    attempts = attempts_table(call)
    assert list(attempts["attempt"]) == [1, 1, 2, 3] and list(attempts["storage endpoint"])[-1] == "10.0.0.7:7001"
    assert list(attempts["backoff ms"]) == [0.0, 0.0, 2.0, 4.0]


def test_an_unreadable_span_file_is_named_and_the_others_read(tmp_path, monkeypatch):
    folder = tmp_path / "tel"
    folder.mkdir()
    (folder / "traces-h-1.jsonl").write_text("\n".join(exported(tmp_path, exhausted_get)) + "\n")
    (folder / "traces-other-1.jsonl").write_text("{}\n")
    real_open = open

    def refuse(path, *args, **kwargs):  # what a file of another user (mode 600) gives a non-root dashboard
        if Path(path).name == "traces-other-1.jsonl":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("tq_mooncake.dashboard.metrics.open", refuse, raising=False)
    source = TraceFileSource(folder)
    snap = source.load(0, float("inf"))
    assert len(snap.calls) == 1 and snap.error is None
    assert "1 file(s) cannot be read: traces-other-1.jsonl (Permission denied)" in snap.notice
    monkeypatch.undo()
    assert "cannot be read" not in source.load(0, float("inf")).notice  # readable again: said no more


def test_the_first_read_takes_the_newest_files_up_to_its_budget(tmp_path):
    folder = tmp_path / "tel"
    folder.mkdir()
    for seq in (1, 2, 3):  # rotated files, oldest first, then the active one
        name = f"traces-h-1.{seq:06d}.jsonl"
        (folder / name).write_text("\n".join(exported(tmp_path, exhausted_get, name=f"src-{seq}.jsonl")) + "\n")
        os.utime(folder / name, (1000 + seq, 1000 + seq))
    (folder / "traces-h-1.jsonl").write_text("\n".join(exported(tmp_path, exhausted_get, name="src-4.jsonl")) + "\n")
    source = TraceFileSource(folder)
    source.first_read_bytes = (folder / "traces-h-1.000003.jsonl").stat().st_size  # room for the active file only
    assert len(source.load(0, float("inf")).calls) == 1 and source.skipped_files == 3
    assert "3 older file(s) not read or read in part" in source.load(0, float("inf")).notice
    with open(folder / "traces-h-1.000001.jsonl", "a") as f:  # a file skipped at the start is read on from there
        f.write("\n".join(exported(tmp_path, retried_put, name="src-5.jsonl")) + "\n")
    assert [c.outcome for c in source.load(0, float("inf"), SHOWN_OUTCOMES).calls][0] == "success_after_retry"
    half = TraceFileSource(folder)  # a budget inside the active file: it is read from a line start inside it
    active = (folder / "traces-h-1.jsonl").read_bytes()
    half.first_read_bytes = len(active) // 2
    half.load(0, float("inf"), SHOWN_OUTCOMES)
    unread = half._tail.offsets[m.file_id((folder / "traces-h-1.jsonl").stat())]
    assert 0 < half._tail.bytes_read < len(active) and active[unread.offset - 1 : unread.offset] == b"\n"
    assert half.skipped_lines == 0 and half.skipped_files == 4


def test_lines_split_at_newlines_only_and_a_partial_line_is_not_read_again(tmp_path):
    folder = tmp_path / "tel"
    folder.mkdir()
    (line,) = exported(tmp_path, retried_put, name="put.jsonl")[-1:]  # the operation span's line
    odd = line.replace('"host-a"', '"host\u2028a\u0085"')  # raw separators inside a JSON string (Go may write them)
    path = folder / "traces-h-1.jsonl"
    path.write_text(odd + "\r\n" + '{"partial": ', encoding="utf-8")
    source = TraceFileSource(folder)
    (call,) = source.load(0, float("inf"), SHOWN_OUTCOMES).calls
    assert call.who("host") == "host\u2028a\u0085" and source.skipped_lines == 0
    read = source._tail.bytes_read
    source.load(0, float("inf"), SHOWN_OUTCOMES)
    assert source._tail.bytes_read == read  # the partial line, unchanged, is not read again


def test_the_first_read_budget_holds_with_lines_longer_than_the_search_window(tmp_path):
    folder = tmp_path / "tel"
    folder.mkdir()
    lines = exported(tmp_path, *([exhausted_get] * 40), name="many.jsonl")
    batch = json.loads(lines[0])
    spans = batch["resourceSpans"][0]["scopeSpans"][0]["spans"]
    for extra in lines[1:]:  # one line of every span: as a batch export of many calls writes it
        spans += json.loads(extra)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    big = json.dumps(batch)
    assert len(big) > 100 << 10  # longer than skip()'s 64 KiB search window
    path = folder / "traces-h-1.jsonl"
    path.write_text((big + "\n") * 4)
    source = TraceFileSource(folder)
    source.first_read_bytes = len(big) + len(big) // 2  # inside the third line: read from the fourth
    calls = source.load(0, float("inf")).calls
    assert source.skipped_files == 1 and source._tail.bytes_read == len(big) + 1 and len(calls) == 40
