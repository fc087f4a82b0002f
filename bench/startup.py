"""What the autoload ``.pth`` line costs: interpreter start, and ``import transfer_queue``.

Runs fresh interpreters of this environment, alternating the hook on (the default) and off
(``TQ_MOONCAKE_AUTOLOAD=0``: the line then imports nothing). Reported, as medians:

* ``python -X importtime -c pass``: the microseconds of our modules (``tq_mooncake``, ``tq_mooncake.autoload``);
* the wall time of ``python -c pass``;
* the wall time of ``python -c "import transfer_queue"``, and what ``-X importtime`` gives the registration
  (``tq_mooncake.transferqueue``, with all it imports: our client, OpenTelemetry's API, the Mooncake binding).

Bytecode is written and used (``PYTHONDONTWRITEBYTECODE`` unset), as for an installed package; one warm-up run
of each kind is not counted.

    .venv/bin/python bench/startup.py               # 30 runs of each for start, 7 for the TQ import
    .venv/bin/python bench/startup.py --runs 100 --tq-runs 15

Not a test: figures vary with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

SWITCH = "TQ_MOONCAKE_AUTOLOAD"
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def run(code: str, on: bool, importtime: bool = False) -> tuple[float, dict[str, tuple[int, int]]]:
    """Wall seconds of one interpreter running ``code``, and ``-X importtime``'s (self, cumulative) us by module."""
    env = {k: v for k, v in os.environ.items() if k not in (SWITCH, "PYTHONDONTWRITEBYTECODE")}
    if not on:
        env[SWITCH] = "0"
    args = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code]
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    modules = {m[4]: (int(m[1]), int(m[2])) for m in LINE.finditer(done.stderr)}
    return wall, modules


def ours(modules: dict[str, tuple[int, int]]) -> int:
    """Microseconds of our modules imported at start (self times: nothing else is nested under them)."""
    return sum(self_us for name, (self_us, _) in modules.items() if name.startswith("tq_mooncake"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="interpreter starts of each kind (default 30)")
    parser.add_argument("--tq-runs", type=int, default=7, help="`import transfer_queue` runs of each kind (default 7)")
    args = parser.parse_args()

    for on in (True, False):  # warm-up: bytecode written, caches filled
        run("pass", on, importtime=True)
        run("import transfer_queue", on)
    start_us = {True: [], False: []}
    start_wall = {True: [], False: []}
    for _ in range(args.runs):
        for on in (True, False):
            start_us[on].append(ours(run("pass", on, importtime=True)[1]))
            start_wall[on].append(run("pass", on)[0])
    tq_wall = {True: [], False: []}
    registration_us = []
    for _ in range(args.tq_runs):
        for on in (True, False):
            tq_wall[on].append(run("import transfer_queue", on)[0])
        registration_us.append(run("import transfer_queue", True, importtime=True)[1]["tq_mooncake.transferqueue"][1])

    med = statistics.median
    print(f"interpreter start ({args.runs} runs each, medians)  hook on    hook off (TQ_MOONCAKE_AUTOLOAD=0)")
    print(f"  -X importtime, our modules          {med(start_us[True]):7.0f} us  {med(start_us[False]):7.0f} us")
    print(
        f"  python -c pass, wall                {med(start_wall[True]) * 1e3:7.1f} ms  "
        f"{med(start_wall[False]) * 1e3:7.1f} ms"
    )
    print(f"import transfer_queue ({args.tq_runs} runs each)")
    print(f"  python -c 'import transfer_queue'   {med(tq_wall[True]):7.2f} s   {med(tq_wall[False]):7.2f} s")
    print(f"  -X importtime, tq_mooncake.transferqueue (cumulative)  {med(registration_us) / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
