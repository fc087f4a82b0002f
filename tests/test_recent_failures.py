"""Recent failures from a real faulty run: a client process on a real master fails chosen keys on purpose and
exports its spans with ``configure()``'s defaults (every retried or failed call kept, clean ones sampled); the
trace-file source gives back exactly the calls the injector made fail, each with its whole attempt timeline."""

from __future__ import annotations

from collections import Counter

from tq_mooncake.dashboard.failures import FAILED, SHOWN_OUTCOMES
from tq_mooncake.dashboard.sample_run import EXHAUST_CODES, MAX_ATTEMPTS, Tally
from tq_mooncake.dashboard.trace_files import TraceFileSource
from tq_mooncake.telemetry.conventions import Operation, Outcome


def test_the_trace_files_give_back_every_call_the_injector_made_fail(faulty_run):
    folder, result = faulty_run
    tally = Tally.from_json(result)
    assert tally.outcome(Outcome.EXHAUSTED) == 6 and tally.retried == 14

    source = TraceFileSource(folder)
    failed = source.load(0, float("inf"))  # the failed outcomes: the default
    assert Counter(f"{c.operation}/{c.outcome}" for c in failed.calls) == {
        k: n for k, n in tally.operations.items() if k.endswith("/exhausted")
    }
    for call in failed.calls:
        code = EXHAUST_CODES[Operation(call.operation)].name
        assert (call.keys, call.failed_keys, call.attempt_count, call.error_type) == (20, 1, MAX_ATTEMPTS, code)
        assert call.complete and call.who("service") == "faulty-run" and call.who("process") == str(result["pid"])
        assert [(a.number, a.keys, a.failed, a.codes) for a in call.attempts] == [
            (1, 20, 1, (code,)),
            *((n, 1, 1, (code,)) for n in range(2, MAX_ATTEMPTS + 1)),
        ]
        assert [a.backoff_s for a in call.attempts] == [0.0, 0.0005, 0.001]  # jitter 0.5 of 1 ms, 2 ms
        starts = [a.start for a in call.attempts]
        assert starts == sorted(starts) and call.start <= starts[0] and call.attempts[-1].end <= call.end
    assert [c.end for c in failed.calls] == sorted((c.end for c in failed.calls), reverse=True)

    retried = source.load(0, float("inf"), SHOWN_OUTCOMES)
    assert Counter(c.outcome for c in retried.calls) == {"exhausted": 6, "success_after_retry": 8}
    assert all(c.complete for c in retried.calls)
    assert source.load(0, float("inf"), FAILED).calls == failed.calls  # read once, kept
