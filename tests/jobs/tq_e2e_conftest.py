"""conftest.py for TransferQueue 0.1.11's own e2e test files, copied beside them by tests/test_transferqueue.py.

It only adds test data: each collected module's ``BACKEND_CONFIGS`` gains ``MooncakeStoreObserved``, TQ's own
``MooncakeStore`` entry under our backend name, its section merged with ``observed_section.json`` (written beside
this file: where telemetry goes). Nothing of tq-mooncake is imported or registered here, and no flag or
environment variable selects it: ``TQ_TEST_BACKEND=MooncakeStoreObserved`` is TQ's own switch, and the backend
must already be registered by the install (``tq_mooncake.autoload``), in this process and in TQ's Ray workers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

NAME = "MooncakeStoreObserved"


def observed(stock: dict, extra: dict) -> dict:
    """TQ's ``MooncakeStore`` test config under our backend name, its section updated with ``extra``."""
    conf = copy.deepcopy(stock)
    section = conf["backend"].pop("MooncakeStore")
    conf["backend"]["storage_backend"] = NAME
    conf["backend"][NAME] = {**section, **extra}
    return conf


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ARG001 - pytest's hook signature
    extra = json.loads((Path(__file__).parent / "observed_section.json").read_text())
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        configs = getattr(module, "BACKEND_CONFIGS", None)
        if isinstance(configs, dict) and "MooncakeStore" in configs:
            configs[NAME] = observed(configs["MooncakeStore"], extra)
