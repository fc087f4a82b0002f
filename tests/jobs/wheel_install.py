"""Build this tree's wheel, install it into a new virtual environment, import TQ there: for tests/test_autoload.py,
run as its own process (in the background of the suite): ``python wheel_install.py ROOT WORK OUT_JSON``.

The tracked files (tests, docs, deploy and bench aside) are copied to WORK/src and built with ``pip wheel
--no-deps --no-build-isolation``; the wheel is installed with ``--no-deps`` into WORK/venv (no pip of its own),
whose site-packages gets a last ``.pth`` path line to this environment's site-packages for TQ, torch and the rest.
OUT_JSON gets: the ``.pth`` text at the wheel's root and in the new site-packages, the wheel's file list check,
and what a fresh interpreter of the new environment reports after ``import transfer_queue``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

PTH_NAME = "tq_mooncake-autoload.pth"
REPORT = (
    "import sys, json, transfer_queue; from transfer_queue.storage.managers.base import StorageManagerFactory as F;"
    "print(json.dumps({'observed': F._registry.get('MooncakeStoreObserved', type).__name__,"
    " 'autoload_file': sys.modules['tq_mooncake.autoload'].__file__}))"
)


def site_packages(prefix: Path | None = None) -> Path:
    scheme = {"base": str(prefix), "platbase": str(prefix)} if prefix else None
    return Path(sysconfig.get_paths(vars=scheme)["purelib"])


def main(root: Path, work: Path, out_path: Path) -> None:
    source = work / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    for rel in tracked.splitlines():
        if (root / rel).is_file() and not rel.startswith(("tests/", "docs/", "deploy/", "bench/")):
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, source / rel)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    wheels = work / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("tq_mooncake-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        wheel_pth = zf.read(PTH_NAME).decode()
        has_autoload = "tq_mooncake/autoload/__init__.py" in zf.namelist()
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    exe = str(venv / "bin" / "python")
    subprocess.run([*pip, "--python", exe, "install", "--no-deps", str(wheel)], check=True)
    target = site_packages(venv)
    (target / "zz_deps.pth").write_text(f"{site_packages()}\n")  # sorts after the wheel's .pth
    done = subprocess.run([exe, "-c", REPORT], capture_output=True, text=True, check=True)
    result = {
        "wheel_pth": wheel_pth,
        "wheel_has_autoload": has_autoload,
        "installed_pth": (target / PTH_NAME).read_text(),
        "site_packages": str(target),
        "report": json.loads(done.stdout.strip().splitlines()[-1]),
    }
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
