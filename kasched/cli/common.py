"""What every command handler shares: the configuration, the front door, and table printing."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasched import config as config_module
from kasched.config import Config

if TYPE_CHECKING:
    from kasched.front import KaschedFront


class Context:
    """Lazily loads the configuration and opens the front door for a command: the one place that
    picks where it runs (through kaschedd, or in this process on the database)."""

    def __init__(self, config_path: str | None = None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._front: KaschedFront | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = config_module.load(self.config_path)
            config_module.export_scheduler_settings(self._config)
        return self._config

    @property
    def remote(self) -> bool:
        """Whether commands go through kaschedd: KASCHED_DIRECT is not set, and a service URL is
        configured (``service_url``, ``$KASCHED_URL``) or the service's socket exists."""
        if os.environ.get("KASCHED_DIRECT") == "1":
            return False
        return bool(os.environ.get("KASCHED_URL") or self.config.service_url) or _is_socket(self.config.service_socket)

    @property
    def front(self) -> KaschedFront:
        if self._front is None:
            if self.remote:
                from kasched.service.remote import RemoteKasched

                self._front = RemoteKasched(self.config)
            else:
                from kasched.compose import open_local

                self._front = open_local(self.config)
        return self._front

    def close(self) -> None:
        if self._front is not None:
            self._front.close()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: Any = None) -> None:
    """Print rows as aligned columns under their headers."""
    out = out or sys.stdout
    text_rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), file=out)
    for row in text_rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, sort_keys=True))


def print_mapping(data: dict[str, Any]) -> None:
    """Print ``key: value`` lines, aligned."""
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        print(f"{key.ljust(width)}  {'' if value is None else value}")


def print_view(data: dict[str, Any], as_json: bool) -> None:
    """One thing (a node, an environment...): JSON, or aligned ``key value`` lines."""
    if as_json:
        print_json(data)
    else:
        print_mapping(data)


def _is_socket(path: Path) -> bool:
    """Whether kaschedd's socket is there; a directory this user may not search counts as no socket
    (the command then says what it cannot reach, as one line)."""
    try:
        return path.is_socket()
    except OSError:
        return False
