"""``python -m tq_mooncake.dashboard [options]``: the same as ``tq-mooncake dashboard [options]``."""

from __future__ import annotations

import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
