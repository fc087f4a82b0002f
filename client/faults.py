"""``FaultInjectingStore``: a real Mooncake store in which chosen keys fail with chosen real error codes.

It wraps a set-up ``MooncakeDistributedStore`` (or anything with the same batch methods). On every batch
call it decides per key whether a rule fires; keys that fail are *not* passed to the real store (a failed
write writes nothing, a failed read reads nothing), the rest are, and the two results are merged in key
order. Every call is recorded, so a test can check exactly which keys the store saw on each attempt.
Methods it does not intercept pass straight through.
"""

from __future__ import annotations

import random
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tq_mooncake.telemetry.conventions import Operation

from .codes import ErrorCode

# store method -> the operation its calls count as
_INTERCEPTED = {
    "batch_upsert_from": Operation.PUT,
    "batch_put_from": Operation.PUT,
    "batch_put_from_multi_buffers": Operation.PUT,
    "batch_get_into": Operation.GET,
    "batch_read_replicas": Operation.GET,  # the client's direct replica reads (replica_reader.py)
    "batch_remove": Operation.CLEAR,
}


@dataclass(frozen=True)
class FaultRule:
    """Fail matching keys with ``code``.

    Attributes:
        code: the error code returned for a failed key.
        keys: the keys it applies to; None for every key.
        fraction: probability that it fires for a matching key (seeded RNG of the store).
        attempts: which sightings of a key by an operation it fires on (1 = the first time the store sees
            that key in that operation, or since the key was last removed); None for every sighting.
        operations: which operations it applies to (``Operation`` members or their names ``put``, ``get``,
            ``clear``).
        sticky: the fraction picks keys, not sightings: a picked key fails on every matching sighting (so
            its retries run out), decided by a hash of the store's seed and the key.
    """

    code: int
    keys: frozenset[str] | None = None
    fraction: float = 1.0
    attempts: frozenset[int] | None = None
    operations: frozenset[Operation] = frozenset(Operation)
    sticky: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if int(self.code) >= 0:
            raise ValueError(f"an injected code must be negative, got {self.code}")
        for name in ("keys", "attempts", "operations"):  # any collection (not a bare string) becomes a frozenset
            value = getattr(self, name)
            if isinstance(value, (str, bytes)):
                raise ValueError(f"{name} must be a collection, got the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, frozenset(value))
        known = {o.value for o in Operation}
        unknown = sorted(str(o) for o in self.operations if o not in known)
        if unknown or not self.operations:
            raise ValueError(f"unknown or no operations {unknown}; known: {sorted(known)}")
        object.__setattr__(self, "operations", frozenset(Operation(o) for o in self.operations))

    @classmethod
    def from_dict(cls, spec: Any) -> FaultRule:
        """A rule from config: ``{"code": "TRANSFER_FAIL" or -800, "fraction": 0.1, "keys": [...],
        "attempts": [1], "operations": ["get"]}`` (only ``code`` is required)."""
        spec = {k: spec[k] for k in spec}
        unknown = sorted(set(spec) - {"code", "keys", "fraction", "attempts", "operations", "sticky"})
        if unknown or "code" not in spec:
            raise ValueError(
                f"a fault rule needs 'code' and takes keys, fraction, attempts, operations, sticky; got {spec!r}"
            )
        code = spec["code"]
        if isinstance(code, str):
            try:
                code = ErrorCode[code]
            except KeyError:
                raise ValueError(f"unknown error code name {code!r}") from None
        sticky = spec.get("sticky", False)
        if not isinstance(sticky, bool):
            raise ValueError(f"sticky must be true or false, got {sticky!r}")
        kwargs: dict[str, Any] = {"code": int(code), "fraction": float(spec.get("fraction", 1.0)), "sticky": sticky}
        for name in ("keys", "attempts", "operations"):
            if spec.get(name) is not None:
                kwargs[name] = spec[name]
        return cls(**kwargs)


def injecting(
    rules: Iterable[FaultRule], seed: int | None = None, record_calls: bool = True
) -> Callable[[Any], FaultInjectingStore]:
    """A ``wrap_store`` for ``MooncakeBatchClient`` that puts the store behind a ``FaultInjectingStore``."""
    rules = list(rules)
    return lambda store: FaultInjectingStore(store, rules, seed=seed, record_calls=record_calls)


@dataclass(frozen=True)
class RecordedCall:
    """One intercepted store call: the keys the client asked for, and which of them were failed on purpose."""

    operation: Operation
    keys: tuple[str, ...]
    injected: dict[str, int] = field(default_factory=dict)
    method: str = ""  # the store method called (e.g. ``batch_get_into``, ``batch_read_replicas``)


class FaultInjectingStore:
    """A real store with injected per-key failures; thread-safe.

    ``record_calls=False`` keeps no call log (for long runs); sightings of a key are forgotten once it is
    removed, so memory stays bounded by the keys alive in the store.
    """

    def __init__(
        self, store: Any, rules: Iterable[FaultRule] = (), seed: int | None = None, record_calls: bool = True
    ) -> None:
        self._store = store
        self._rules: list[FaultRule] = list(rules)
        self._rng = random.Random(seed)
        self._seed = seed or 0
        self._record_calls = record_calls
        self._lock = threading.Lock()
        self._seen: Counter[tuple[Operation, str]] = Counter()
        self.calls: list[RecordedCall] = []
        self.injected: Counter[ErrorCode] = Counter()

    def add_rule(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def calls_for(self, operation: Operation | str) -> list[RecordedCall]:
        operation = Operation(operation)
        with self._lock:
            return [c for c in self.calls if c.operation is operation]

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if name not in _INTERCEPTED:
            return target
        operation = _INTERCEPTED[name]

        def intercepted(keys: list[str], *columns: Any, **kwargs: Any) -> list[int]:
            return self._call(operation, target, list(keys), columns, kwargs, name)

        return intercepted

    def _decide(self, operation: Operation, keys: list[str]) -> dict[str, int]:
        injected: dict[str, int] = {}
        with self._lock:
            for key in keys:
                self._seen[(operation, key)] += 1
                sighting = self._seen[(operation, key)]
                for rule in self._rules:
                    if operation not in rule.operations:
                        continue
                    if rule.keys is not None and key not in rule.keys:
                        continue
                    if rule.attempts is not None and sighting not in rule.attempts:
                        continue
                    if rule.fraction < 1.0:
                        draw = self._key_draw(key) if rule.sticky else self._rng.random()
                        if draw >= rule.fraction:
                            continue
                    injected[key] = int(rule.code)
                    self.injected[ErrorCode.of(int(rule.code))] += 1
                    break
        return injected

    def _key_draw(self, key: str) -> float:
        return zlib.crc32(f"{self._seed}:{key}".encode("utf-8", "surrogatepass")) / 2**32

    def _forget(self, keys: list[str], codes: list[int]) -> None:
        """Removed keys start a new life: their sightings count from 1 again."""
        with self._lock:
            for key, code in zip(keys, codes, strict=False):
                if code in (0, ErrorCode.OBJECT_NOT_FOUND):
                    for operation in Operation:
                        self._seen.pop((operation, key), None)

    def _call(
        self, operation: Operation, target: Any, keys: list[str], columns: tuple, kwargs: dict, method: str = ""
    ) -> list[int]:
        injected = self._decide(operation, keys)
        if self._record_calls:
            with self._lock:
                self.calls.append(RecordedCall(operation, tuple(keys), injected, method))
        codes = self._pass(target, keys, injected, columns, kwargs)
        if operation is Operation.CLEAR:
            self._forget(keys, codes)
        return codes

    def _pass(self, target: Any, keys: list[str], injected: dict[str, int], columns: tuple, kwargs: dict) -> list[int]:
        # Positional per-key columns (pointers, sizes) are filtered like the keys; the rest (a
        # ReplicateConfig, force=...) passes unchanged.
        keep = [i for i, k in enumerate(keys) if k not in injected]
        per_key = [c for c in columns if isinstance(c, list) and len(c) == len(keys)]
        other = columns[len(per_key) :]
        passed: list[int] = []
        if keep:
            args = [[keys[i] for i in keep]] + [[c[i] for i in keep] for c in per_key]
            passed = list(target(*args, *other, **kwargs))
            if len(passed) != len(keep):  # let the client see a malformed result as such
                return passed
        it = iter(passed)
        return [injected[k] if k in injected else next(it) for k in keys]
