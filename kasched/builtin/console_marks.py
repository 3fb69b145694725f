"""Built-in plugin: where each node's console file ends when a grant of the node is created, so that
the grant's user is served only what their job's nodes printed (never the previous user's output).

A mark is ``<state_dir>/console-marks/<node>``: ``{"job": ..., "grant": ..., "offset": ...}``, written
atomically (a new file renamed over the old one). The console (kasched.service.access) reads it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kasched.config import Config, is_set
from kasched.hookspecs import hookimpl
from kasched.views import GrantView

log = logging.getLogger("kasched")


class ConsoleMarks:
    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def kasched_grant_created(self, grant: GrantView) -> None:
        if not is_set(self.config.console_logs):
            return
        for node in grant.nodes:
            try:
                size = (self.config.console_logs / node / "console.log").stat().st_size
            except OSError:
                size = 0  # no console yet: all it will hold is this grant's
            try:
                write_mark(self.config, node, {"job": grant.job, "grant": grant.id, "offset": size})
            except OSError as error:
                log.warning("console of %s: cannot record where grant %d begins: %s", node, grant.id, error.strerror)


def mark_path(config: Config, node: str) -> Path:
    return config.state_dir / "console-marks" / node


def write_mark(config: Config, node: str, mark: dict[str, Any]) -> None:
    directory = mark_path(config, node).parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{node}.")
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump(mark, out)
        os.replace(temporary, mark_path(config, node))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_mark(config: Config, node: str) -> dict[str, Any] | None:
    try:
        mark = json.loads(mark_path(config, node).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None
