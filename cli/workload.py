"""A TransferQueue-shaped load: batches of samples with tensor and non-tensor fields, written, read back,
checked and cleared through one ``MooncakeBatchClient``.

Keys are TQ's, ``<global index>@<field>``, one per sample and field; values are what TQ's storage manager
hands a storage client: per-sample rows of ``input_ids`` (int64), ``attention_mask`` (bool),
``old_log_probs`` (bfloat16), a jagged ``response`` (int32 rows of varying length), a 0-d ``reward``
(float32), and non-tensor ``uid`` (str) and ``info`` (dict). Every value read back is compared with what
was written; failures are counted by exception type, never hidden.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tq_mooncake.client import BatchOperationError, MooncakeBatchClient
from tq_mooncake.testing import same_value


class StopFlag(Protocol):
    """What stops a run: a ``threading.Event``, or anything with ``is_set()``."""

    def is_set(self) -> bool: ...


FIELDS = ("attention_mask", "info", "input_ids", "old_log_probs", "response", "reward", "uid")


def make_batch(first_index: int, samples: int, seq_len: int, seed: int) -> dict[str, Any]:
    """Keys and values of one batch, in TQ's key order (field-major, fields sorted)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 50_000, (samples, seq_len), generator=gen)
    columns: dict[str, list[Any]] = {
        "attention_mask": list((torch.rand(samples, seq_len, generator=gen) > 0.1).unbind(0)),
        "info": [{"source": "demo", "turns": int(i % 5), "score": float(i) / 7} for i in range(samples)],
        "input_ids": list(input_ids.unbind(0)),
        "old_log_probs": list(torch.randn(samples, seq_len, generator=gen).to(torch.bfloat16).unbind(0)),
        "response": [
            torch.randint(0, 50_000, (1 + int(n),), dtype=torch.int32, generator=gen)
            for n in torch.randint(0, seq_len, (samples,), generator=gen)
        ],
        "reward": list(torch.randn(samples, generator=gen).unbind(0)),
        "uid": [f"uid-{first_index + i}" for i in range(samples)],
    }
    keys = [f"{first_index + i}@{name}" for name in FIELDS for i in range(samples)]
    values = [columns[name][i] for name in FIELDS for i in range(samples)]
    return {"keys": keys, "values": values}


@dataclass
class WorkloadStats:
    """What the workload did. ``wrong`` counts values read back that differ from what was written: it must
    stay 0 (a key that cannot be read must raise, never return something else)."""

    batches: int = 0
    keys_written: int = 0
    values_checked: int = 0
    wrong: int = 0
    raised: Counter[str] = field(default_factory=Counter)  # exception class name -> calls
    keys_lost: int = 0  # keys named by an exception


class Workload:
    """Runs batches of ``samples`` samples through ``client``: put, get (with the metadata put returned),
    compare, clear. A call that raises is counted and the batch goes on with the keys that made it."""

    def __init__(self, client: MooncakeBatchClient, samples: int = 32, seq_len: int = 64, seed: int = 0) -> None:
        self.client = client
        self.samples = samples
        self.seq_len = seq_len
        self.seed = seed
        self.stats = WorkloadStats()
        self._lock = threading.Lock()

    def _failed(self, exc: BatchOperationError) -> set[str]:
        with self._lock:
            self.stats.raised[type(exc).__name__] += 1
            self.stats.keys_lost += len(exc.failed)
        return set(exc.failed)

    def run_batch(self, index: int) -> None:
        batch = make_batch(index * self.samples, self.samples, self.seq_len, self.seed + index)
        keys, values = batch["keys"], batch["values"]
        try:
            metas = self.client.put(keys, values)
            written = list(range(len(keys)))
        except BatchOperationError as exc:
            lost = self._failed(exc)
            written = [i for i, k in enumerate(keys) if k not in lost]
            metas = None
        with self._lock:
            self.stats.keys_written += len(written)
        if metas is None:  # a failed put returns no metadata: read with shapes and dtypes, as TQ would
            shapes = [list(values[i].shape) if isinstance(values[i], torch.Tensor) else None for i in written]
            dtypes = [values[i].dtype if isinstance(values[i], torch.Tensor) else None for i in written]
            read: dict[str, Any] = {"shapes": shapes, "dtypes": dtypes}
        else:
            read = {"custom_backend_meta": [metas[i] for i in written]}
        names = [keys[i] for i in written]
        try:
            got = self.client.get(names, **read)
            checked = list(zip(written, got, strict=True))
        except BatchOperationError as exc:
            self._failed(exc)
            checked = []
        wrong = sum(not same_value(values[i], value) for i, value in checked)
        with self._lock:
            self.stats.values_checked += len(checked)
            self.stats.wrong += wrong
        try:
            self.client.clear(keys)
        except BatchOperationError as exc:
            self._failed(exc)
        with self._lock:
            self.stats.batches += 1

    def run(
        self,
        stop: StopFlag,
        duration_s: float | None = None,
        on_batch: Callable[[int], None] | None = None,
        batches: int | None = None,
    ) -> WorkloadStats:
        """Batches until ``stop`` is set, ``duration_s`` has passed or ``batches`` are done; ``on_batch(index)``
        after each."""
        end = time.monotonic() + duration_s if duration_s is not None else None
        index = 0
        while not stop.is_set() and (end is None or time.monotonic() < end) and (batches is None or index < batches):
            self.run_batch(index)
            if on_batch is not None:
                on_batch(index)
            index += 1
        return self.stats
