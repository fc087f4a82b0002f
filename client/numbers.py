"""What the config and the policies accept as a number: ``int`` or ``float``, never ``bool`` (pure)."""

from __future__ import annotations


def is_number(value: object) -> bool:
    """An ``int`` or a ``float`` (NaN and infinity included: callers bound the range), not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """An ``int``, not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)
