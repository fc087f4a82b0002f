"""tq_mooncake.cluster: real Mooncake processes on this machine, started and stopped for you.

* ``MasterProcess``: a ``mooncake_master`` (the TQ bootstrap starts masters with it, as do the demo, the
  benchmarks and the tests);
* ``StorageNodeProcess``: a storage process lending a memory segment to the cluster
  (``python -m tq_mooncake.cluster.storage_node``, also ``tq-mooncake storage-node``);
* ``start_all`` / ``stop_all``: several of them side by side;
* ``begin_shutdown`` / ``stop_children`` / ``ShutdownStarted``: refuse further starts (safe in a signal handler),
  then stop every child this process started; children also die with this process (``PR_SET_PDEATHSIG``);
* ``ChildProcess`` (the base: a logged child in its own session), ``free_port``, ``wait_until``, ``http_ok``:
  the helpers they are built on.

Every process binds 127.0.0.1 unless told otherwise and is stopped by ``stop()`` or its ``with`` block.
The library (``tq_mooncake.client``) never imports this package.
"""

from .processes import (
    LOOPBACK,
    ChildProcess,
    MasterProcess,
    ShutdownStarted,
    StorageNodeProcess,
    begin_shutdown,
    free_port,
    http_ok,
    shutting_down,
    start_all,
    stop_all,
    stop_children,
    wait_until,
)

__all__ = [
    "LOOPBACK",
    "ChildProcess",
    "MasterProcess",
    "ShutdownStarted",
    "StorageNodeProcess",
    "begin_shutdown",
    "free_port",
    "http_ok",
    "shutting_down",
    "start_all",
    "stop_all",
    "stop_children",
    "wait_until",
]
