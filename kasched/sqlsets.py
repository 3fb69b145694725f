"""Membership tests against a long list of values (node names, node ids) in one bound parameter.

``column IN (?, ?, ...)`` with 10,000 values costs SQLAlchemy a statement of 10,000 placeholders to
expand and the server as many parameters to bind, in chunks under each backend's parameter limit.
PostgreSQL takes the whole list as one array (``column = ANY(:values)``) and SQLite as one JSON text
(``column IN (SELECT value FROM json_each(:values))``): one statement, one parameter, whatever the
length. Other backends (MariaDB) keep chunked ``IN`` lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import ARRAY, Integer, String, any_, bindparam, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

CHUNK = 2000  # values per IN (...) list on the other backends, well under every parameter limit


def members(session: Session, column: Any, values: Sequence[str] | Sequence[int]) -> Iterator[ColumnElement[bool]]:
    """Conditions "``column`` is one of ``values``": one for the whole list on PostgreSQL and SQLite,
    one per chunk elsewhere. Run the statement once per condition and merge the rows."""
    items: list[Any] = list(values)
    if not items:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        kind = Integer if isinstance(items[0], int) else String
        yield column == any_(bindparam("members", items, type_=ARRAY(kind), unique=True))
    elif dialect == "sqlite":
        table = func.json_each(bindparam("members", json.dumps(items), unique=True)).table_valued("value")
        yield column.in_(select(table.c.value))
    else:
        for start in range(0, len(items), CHUNK):
            yield column.in_(items[start : start + CHUNK])
