"""Link rates written as ``tc`` writes them: ``10mbit``, ``1gbit``, ``2.5gbit`` (bits per second)."""

from __future__ import annotations

import re

UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def rate_bits(rate: str) -> int:
    """Bits per second of ``rate`` (a number and one of bit, kbit, mbit, gbit; any case). Raises
    ValueError, with the accepted form, for anything else or a rate of 0."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", rate.lower())
    if not match or match.group(2) not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{rate!r} is not a link rate such as 100mbit, 1gbit or 2.5gbit")
    return int(float(match.group(1)) * UNITS[match.group(2)])
