"""tq_mooncake.cli: the ``tq-mooncake`` command and what only it runs.

* ``main``: the verbs (``demo``, ``workload``, ``dashboard``, ``storage-node``);
* ``demo``: the whole product on this machine (``make demo``);
* ``workload``: the TransferQueue-shaped load the demo and the ``workload`` verb run.

Tooling, not library: nothing in ``tq_mooncake.client`` imports it.
"""
