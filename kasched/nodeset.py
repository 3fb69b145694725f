"""Node ranges such as ``node-[1-64]``, everywhere a node list is accepted.

We use ClusterShell's NodeSet (the reference implementation of this syntax on HPC sites) rather than
a parser of our own, and turn its errors into :class:`~kasched.errors.InputError`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetParseError
from ClusterShell.RangeSet import RangeSetParseError

from kasched.errors import InputError

_BRACKET = re.compile(r"\[([^\]]*)\]")
_RANGE = re.compile(r"^\s*(\d{1,18})\s*(?:-\s*(\d{1,18})\s*(?:/\s*(\d{1,18})\s*)?)?$")
_SEPARATORS = ",!&^ \t\n"
MAX_NODES = 100_000  # more than any site's inventory: a range naming more is refused before it is expanded
SMALL = 4096  # ranges up to this many names are expanded without asking how big the inventory is


def count(pattern: str) -> int:
    """How many names a node range names at most, read from its text without expanding it: each
    element (``node-[1-4]``, elements separated by ``,`` and ClusterShell's operators) gives the product
    of the sizes of its brackets. ``x[1-100000000]`` is 100000000, counted at once."""
    total = 0
    for element in _elements(pattern):
        product = 1
        for match in _BRACKET.finditer(element):
            product *= sum(_part_count(part) for part in match.group(1).split(","))
        total += product
    return total


def _elements(pattern: str) -> list[str]:
    """The elements of a range: split at separators outside brackets."""
    elements: list[str] = []
    current: list[str] = []
    depth = 0
    for char in pattern:
        depth += (char == "[") - (char == "]")
        if depth <= 0 and char in _SEPARATORS:
            elements.append("".join(current))
            current, depth = [], 0
        else:
            current.append(char)
    elements.append("".join(current))
    return [e for e in elements if e.strip()]


def _part_count(part: str) -> int:
    match = _RANGE.match(part)
    if not match:
        return 1  # not a range we can count: ClusterShell says what is wrong with it
    first, last, step = match.group(1), match.group(2), match.group(3)
    if last is None:
        return 1
    return max(0, (int(last) - int(first)) // max(1, int(step or 1)) + 1)


def check_size(pattern: str, limit: int, *, field: str = "nodes", what: str = "") -> int:
    """The count of ``pattern``; InputError if it names more than ``limit`` nodes."""
    names = count(pattern)
    if names > limit:
        shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
        raise InputError(
            f"node range {shown!r} names {names} nodes, more than {what or 'kasched accepts'} ({limit})", field=field
        )
    return names


def expand(pattern: str, *, field: str = "nodes", limit: int | None = MAX_NODES) -> list[str]:
    """Expand a node range (``node-[1-3,7]``, or several separated by commas) to sorted names; a range
    naming more than ``limit`` nodes is refused first, without expanding it (None: counted already)."""
    pattern = pattern.strip()
    if not pattern:
        raise InputError("empty node list", field=field)
    if limit is not None:
        check_size(pattern, limit, field=field)
    try:
        names = list(NodeSet(pattern, resolver=RESOLVER_NOGROUP))  # no @groups: a site's files are not input
    except (NodeSetParseError, RangeSetParseError, ValueError) as error:
        raise InputError(f"bad node range {pattern!r}: {error}", field=field) from None
    if not names:
        raise InputError(f"node range {pattern!r} names no node", field=field)
    return names


def expand_many(patterns: Iterable[str], *, field: str = "nodes", limit: int | None = MAX_NODES) -> list[str]:
    """Expand several ranges; keep each name once, in the order first given."""
    seen: dict[str, None] = {}
    for pattern in patterns:
        for name in expand(pattern, field=field, limit=limit):
            seen.setdefault(name, None)
    return list(seen)


def fold(names: Iterable[str]) -> str:
    """Fold names back into the shortest range string (``node-[1-4]``); names that are not node
    names (in an error message about them, say) are listed as they are."""
    return _fold(tuple(names))


@functools.lru_cache(maxsize=16)
def _fold(names: tuple[str, ...]) -> str:
    """:func:`fold`, remembered: a job's node list is folded several times in one hook (the journal,
    the reclaimer, the hook's own line): 10,000 names cost the first fold only."""
    numbers, others = _split(names)
    if len(numbers) == 1 and not others and not any(c.isdigit() for c in next(iter(numbers))):
        # One prefix without digits (n-1 ... n-10000): ClusterShell's text is the range itself; it
        # would sort every number one by one again (20 ms at 10,000 nodes) to write it.
        [(prefix, found)] = numbers.items()
        return f"{prefix}{found.pop()}" if len(found) == 1 else f"{prefix}[{_ranges(sorted(found))}]"
    try:
        return str(NodeSet(_prefolded(numbers, others), resolver=RESOLVER_NOGROUP)) if names else ""
    except (NodeSetParseError, RangeSetParseError, ValueError):
        return ",".join(names)


_PLAIN = re.compile(r"^([A-Za-z0-9._-]*[A-Za-z._-])(0|[1-9][0-9]{0,17})$")  # node-12: no padding, no brackets


def _split(names: Sequence[str]) -> tuple[dict[str, set[int]], list[str]]:
    """The plain names (a prefix, then a number without leading zeros) as numbers by prefix, and the others."""
    numbers: dict[str, set[int]] = {}
    others = []
    for name in names:
        match = _PLAIN.match(name)
        if match:
            numbers.setdefault(match.group(1), set()).add(int(match.group(2)))
        else:
            others.append(name)
    return numbers, others


def _prefolded(numbers: dict[str, set[int]], others: list[str]) -> str:
    """The same set as the names :func:`_split` gave, written with ranges for the plain names and the
    others as they are: ClusterShell then reads a few ranges instead of parsing every name (10,000
    names: 0.46 s one by one, a few ms so)."""
    ranges = [f"{prefix}[{_ranges(sorted(found))}]" for prefix, found in numbers.items()]
    return ",".join([*ranges, *others])


def _ranges(numbers: list[int]) -> str:
    """Sorted distinct numbers as ClusterShell's range text: ``1-4,7``."""
    parts = []
    start = previous = numbers[0]
    for number in [*numbers[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ",".join(parts)


def expand_value(value: str, count: int, *, field: str) -> list[str]:
    """Expand one per-node value given as a pattern with one bracketed range, in order.

    ``10.0.0.[11-18]`` gives eight addresses; ``02:00:00:00:00:[01-08]`` eight MACs. A value without
    brackets is returned ``count`` times. The number of values must equal ``count``.
    """
    matches = list(_BRACKET.finditer(value))
    if not matches:
        return [value] * count
    if len(matches) > 1:
        raise InputError(f"{value!r}: only one [range] is allowed in a per-node value", field=field)
    match = matches[0]
    values = []
    for part in match.group(1).split(","):
        values.extend(_expand_part(part, value, field))
    if len(values) != count:
        raise InputError(f"{value!r} gives {len(values)} values for {count} nodes", field=field)
    return [value[: match.start()] + item + value[match.end() :] for item in values]


def _expand_part(part: str, value: str, field: str) -> list[str]:
    bounds = part.strip().split("-")
    if len(bounds) == 1 and _digits(bounds[0]):
        return [bounds[0]]
    if len(bounds) != 2 or not all(_digits(b) for b in bounds) or int(bounds[0]) > int(bounds[1]):
        raise InputError(f"bad range [{part}] in {value!r}", field=field)
    width = len(bounds[0]) if bounds[0].startswith("0") else 0
    return [str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1)]


def expand_ordered(pattern: str, *, field: str = "name") -> list[str]:
    """Expand a name with at most one bracketed range, keeping the order as written.

    Used where names are paired with per-node values (``name: node-[1-8]`` with
    ``ip: 10.0.0.[11-18]``): both sides must expand in the same order.
    """
    matches = list(_BRACKET.finditer(pattern))
    if not matches:
        return expand(pattern, field=field)
    if len(matches) > 1:
        raise InputError(f"{pattern!r}: only one [range] is allowed here", field=field)
    inner = matches[0].group(1)
    count = sum(len(_expand_part(part, pattern, field)) for part in inner.split(","))
    return expand_value(pattern, count, field=field)


def _digits(text: str) -> bool:
    """ASCII digits only (``"¹".isdigit()`` is true, but ``int("¹")`` fails)."""
    return text.isascii() and text.isdigit()
