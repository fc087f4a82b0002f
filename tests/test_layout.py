"""The layout is the architecture: which package may import which, with no cycle, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "telemetry", "transferqueue", "cluster", "cli", "dashboard", "testing", "autoload")

# What each package may import at run time (imports under `if TYPE_CHECKING:` are types only, not edges).
ALLOWED: dict[str, set[str]] = {
    "telemetry": set(),  # the OpenTelemetry instrumentation: imports nothing of the project
    "client": {"telemetry"},  # the library: never the tooling
    "transferqueue": {"client", "telemetry", "cluster"},  # the TQ backend; its bootstrap starts masters
    "cluster": {"client"},  # local Mooncake processes
    "testing": {"client", "telemetry"},  # doubles and helpers for tests
    "dashboard": {"telemetry", "cluster", "client"},  # the app reads telemetry; its tools run workloads
    "cli": {"client", "telemetry", "cluster", "dashboard", "testing"},
    "autoload": {"transferqueue"},  # the .pth hook: imports the TQ backend once TQ itself is imported
}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> set[str]:
    """The ``tq_mooncake.<package>`` names imported at run time by a module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            names = []
        for name in names:
            parts = name.split(".")
            if parts[0] == "tq_mooncake" and len(parts) > 1:
                found.add(parts[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            edges[package] |= _imports(ast.parse(path.read_text(), str(path))) - {package}
    return edges


def test_every_package_folder_is_mapped_and_checked():
    import tomllib

    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(mapped.values()) == set(PACKAGES) == set(ALLOWED)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_it_may(package):
    edges = package_edges()
    assert edges[package] <= ALLOWED[package], f"{package} imports {sorted(edges[package] - ALLOWED[package])}"


def test_the_packages_form_no_import_cycle():
    edges = package_edges()
    done: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"import cycle: {' -> '.join((*path, package))}"
        if package in done:
            return
        for dep in sorted(edges[package]):
            visit(dep, (*path, package))
        done.add(package)

    for package in PACKAGES:
        visit(package, ())


def loaded_after(statement: str) -> str:
    """What a fresh interpreter prints of ``sys.modules`` after ``statement``: ``tooling`` (the project's packages
    beyond the library that got loaded), then whether torch and the client got loaded."""
    probe = (
        f"import sys; {statement}; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in "
        "('cli', 'cluster', 'dashboard', 'testing', 'transferqueue') and m.startswith('tq_mooncake.')), "
        "'torch' in sys.modules, 'tq_mooncake.client' in sys.modules)"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120).stdout


def test_the_library_loads_no_tooling_and_the_dashboard_page_no_client():
    assert loaded_after("import tq_mooncake.client").split() == ["[]", "True", "True"]
    page = loaded_after("from tq_mooncake.dashboard import metrics, settings, sources, tiles")
    assert page.rsplit(None, 2)[1:] == ["False", "False"]


def test_the_command_line_is_built_without_the_client():
    """``tq-mooncake --help`` (and every verb's) answers at once: building the parser loads no torch."""
    out = loaded_after("from tq_mooncake.cli.main import build_parser; build_parser()")
    assert out.rsplit(None, 2)[1:] == ["False", "False"]
