"""``python -m tq_mooncake.cli``: the same as ``tq-mooncake``."""

from __future__ import annotations

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
