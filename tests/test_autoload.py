"""tq_mooncake.autoload: the post-import hook, the ``.pth`` line the install ships (editable and wheel), and
what an interpreter imports at start with it (nothing of TQ or torch)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from background import Background  # tests/support

from tq_mooncake import autoload
from tq_mooncake.autoload import ENV_SWITCH, PostImportHook

ROOT = Path(__file__).resolve().parents[1]
WHEEL_JOB = ROOT / "tests" / "jobs" / "wheel_install.py"


def build_pth() -> ModuleType:
    """scripts/build_pth.py (the build command), loaded by path as setuptools does."""
    spec = importlib.util.spec_from_file_location("build_pth_under_test", ROOT / "scripts" / "build_pth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python(code: str, *, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (its environment without our switch unless ``env`` sets it); the JSON
    it prints."""
    base = {k: v for k, v in os.environ.items() if k != ENV_SWITCH}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the hook (pure)
@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A fresh importable package (unique name) in ``tmp_path``; the import system is restored afterwards."""
    name = f"fake_tq_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("LOADED = True\n")
    (folder / "sub.py").write_text("VALUE = 1\n")
    meta_path = list(sys.meta_path)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield name, folder
    finally:
        sys.path.remove(str(tmp_path))
        sys.meta_path[:] = meta_path
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def arm(name: str, callback) -> PostImportHook:
    hook = PostImportHook(name, callback)
    sys.meta_path.insert(0, hook)
    return hook


@pytest.mark.pure
def test_the_hook_fires_once_after_the_module_ran_and_leaves_its_loader_alone(package):
    name, folder = package
    seen: list[ModuleType] = []
    hook = arm(name, lambda module: seen.append(module) or importlib.import_module(f"{name}.sub"))
    module = importlib.import_module(name)
    assert seen == [module] and module.LOADED  # called with the executed module
    assert f"{name}.sub" in sys.modules  # the callback may import the module's submodules
    assert hook not in sys.meta_path  # one-shot
    assert module.__loader__ is module.__spec__.loader and type(module.__loader__).__name__ == "SourceFileLoader"
    assert Path(module.__file__) == folder / "__init__.py"
    importlib.reload(module)
    assert len(seen) == 1


@pytest.mark.pure
def test_the_hook_ignores_other_names_and_absent_modules(package):
    name, _ = package
    seen: list[ModuleType] = []
    hook = arm(f"{name}_absent", seen.append)
    importlib.import_module(name)  # another name: not touched
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"{name}_absent")  # absent: the usual error, nothing called
    assert seen == [] and hook in sys.meta_path


@pytest.mark.pure
def test_an_import_that_raises_leaves_the_hook_armed_for_the_next_try(package):
    name, folder = package
    (folder / "__init__.py").write_text("raise RuntimeError('broken install')\n")
    seen: list[ModuleType] = []
    hook = arm(name, seen.append)
    with pytest.raises(RuntimeError, match="broken install"):
        importlib.import_module(name)
    assert seen == [] and hook in sys.meta_path
    (folder / "__init__.py").write_text("LOADED = True\n")
    module = importlib.import_module(name)
    assert seen == [module]


@pytest.mark.pure
def test_a_failing_callback_warns_and_the_import_still_succeeds(package):
    name, _ = package

    def broken(_module: ModuleType) -> None:
        raise ImportError("no Mooncake wheel")

    arm(name, broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    assert module.LOADED
    assert any(issubclass(w.category, RuntimeWarning) and "no Mooncake wheel" in str(w.message) for w in caught)


@pytest.mark.pure
def test_where_warnings_are_errors_a_failing_callback_is_logged_and_the_import_still_succeeds(package, caplog):
    name, _ = package

    def broken(_module: ModuleType) -> None:
        raise ImportError("no Mooncake wheel")

    arm(name, broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under `python -W error`
        module = importlib.import_module(name)
    assert module.LOADED
    messages = [r.getMessage() for r in caplog.records]
    assert any("no Mooncake wheel" in m and "TQ_MOONCAKE_AUTOLOAD=0" in m for m in messages), messages


@pytest.mark.pure
@pytest.mark.parametrize(
    ("value", "on"), [("", True), ("1", True), ("yes", True), ("0", False), (" Off ", False), ("FALSE", False)]
)
def test_the_environment_switch(value, on):
    assert autoload.enabled({ENV_SWITCH: value}) is on
    assert autoload.enabled({}) is True


# ------------------------------------------------------------------------------------------ real interpreters
# What a fresh interpreter has imported once `site` ran (sys.modules read before the report imports json).
START_REPORT = (
    "import sys; r = {'modules': sorted(sys.modules),"
    " 'armed': [type(f).__name__ for f in sys.meta_path].count('PostImportHook')};"
    " import json; print(json.dumps(r))"
)
HEAVY = {"transfer_queue", "torch", "ray", "numpy", "mooncake", "tq_mooncake.transferqueue", "tq_mooncake.client"}
TQ_REPORT = (
    "import sys, json; {first}; from transfer_queue.storage.managers.base import StorageManagerFactory as F;"
    "print(json.dumps({{'observed': F._registry.get('MooncakeStoreObserved', type).__name__,"
    " 'stock': F._registry['MooncakeStore'].__name__, 'autoload_file': getattr(sys.modules.get("
    "'tq_mooncake.autoload'), '__file__', None)}}))"
)


def test_a_fresh_interpreter_arms_the_hook_and_imports_nothing_else_of_ours_tq_or_torch():
    on, off = python(START_REPORT), python(START_REPORT, env={ENV_SWITCH: "0"})
    assert on["armed"] == 1 and off["armed"] == 0
    assert set(on["modules"]) - set(off["modules"]) == {"tq_mooncake", "tq_mooncake.autoload"}
    assert not HEAVY & set(on["modules"])


@pytest.mark.parametrize("value", ["0", "false", " NO", "off", "1", "", "anything"])
def test_the_pth_line_and_the_module_agree_on_the_switch(value):
    report = python(START_REPORT, env={ENV_SWITCH: value})
    on = autoload.enabled({ENV_SWITCH: value})
    assert report["armed"] == int(on) and ("tq_mooncake.autoload" in report["modules"]) is on


def test_the_editable_install_has_the_pth_line_the_build_writes():
    module = build_pth()
    assert (Path(sysconfig.get_paths()["purelib"]) / module.PTH_NAME).read_text() == module.PTH_LINE


def test_importing_transfer_queue_registers_the_backend_and_the_switch_turns_it_off(jobs):
    on, submodule_first, off = (jobs.report(name) for name in ("on", "submodule_first", "off"))
    assert on["observed"] == "ObservedMooncakeStorageManager" and on["stock"] == "StockNameStorageManager"
    assert submodule_first["observed"] == "ObservedMooncakeStorageManager"
    assert off == {"observed": "type", "stock": "MooncakeStorageManager", "autoload_file": None}


def test_a_wheel_install_ships_the_pth_line_and_registers_in_a_fresh_environment(jobs):
    """The wheel built from this tree has the line at its root; installed (no deps) into a new virtual
    environment that finds TQ and the rest in ours, importing TQ there registers the backend from the wheel
    (tests/jobs/wheel_install.py)."""
    module = build_pth()
    out = jobs.report("wheel")
    assert out["wheel_pth"] == module.PTH_LINE and out["wheel_has_autoload"]
    assert out["installed_pth"] == module.PTH_LINE
    assert out["report"]["observed"] == "ObservedMooncakeStorageManager"
    assert Path(out["report"]["autoload_file"]).is_relative_to(out["site_packages"])  # the wheel's copy


# ------------------------------------------------------------------------------------------ background jobs
class Jobs:
    """This module's slow interpreters (each imports TQ, about 4 s; the wheel job also builds and installs),
    started side by side before the session's first test (tests/conftest.py's ``background_jobs``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: dict[str, Background] = {}

    def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if k != ENV_SWITCH}
        (self.folder / "wheel").mkdir()
        runs = {
            "on": ([sys.executable, "-c", TQ_REPORT.format(first="import transfer_queue")], {}),
            "submodule_first": (
                [sys.executable, "-c", TQ_REPORT.format(first="import transfer_queue.storage.managers.base")],
                {},
            ),
            "off": ([sys.executable, "-c", TQ_REPORT.format(first="import transfer_queue")], {ENV_SWITCH: "0"}),
            "wheel": ([sys.executable, str(WHEEL_JOB), str(ROOT), str(self.folder / "wheel"), str(self.wheel)], {}),
        }
        for name, (args, env) in runs.items():
            self.runs[name] = Background(args, self.folder / f"{name}.log", {**base, **env})

    @property
    def wheel(self) -> Path:
        """Where the wheel job writes what it saw."""
        return self.folder / "wheel.json"

    def report(self, name: str) -> dict:
        """What job ``name`` printed last (or, for ``wheel``, wrote), once it ended with 0 (within 300 s)."""
        rc = self.runs[name].wait(timeout=300)
        log = (self.folder / f"{name}.log").read_text()
        assert rc == 0, log[-3000:]
        if name == "wheel":
            return json.loads(self.wheel.read_text())
        return json.loads([line for line in log.splitlines() if line.startswith("{")][-1])

    def kill(self) -> None:
        for run in self.runs.values():
            run.kill()


BACKGROUND_JOBS = Jobs  # started by tests/conftest.py's background_jobs; the `jobs` fixture
