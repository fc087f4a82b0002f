"""``FakeClock``: time that moves only when a test says so."""

from __future__ import annotations


class FakeClock:
    """A ``Clock`` (``() -> seconds``) for ``RetryPolicy``, ``RetryBudget``, ``Deadline`` and the client.

    ``sleep`` advances it instead of waiting, so it also serves as the client's backoff sleep; every sleep is
    kept in ``sleeps``.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
