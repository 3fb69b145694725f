"""Putting given-back nodes into their scheduler's hands again.

At a deploy job's end, the scheduler's hook keeps the job's nodes out of scheduling (Slurm: drained;
OAR: drained with the ``kasched`` property saying why; PBS: offline with a comment), then runs
``kasched job end``. The revert that follows ends here: each scheduler adapter is told which nodes are
back (put into service again) and which failed, with why (kept out, the reason where the admin looks).
So no next job gets a node that is still being given back, or that could not be.

Adapters touch only the nodes kasched itself holds (:data:`kasched.schedulers.HOLD_MARK`): an admin's
own drain stays. Problems are logged and returned, never raised: the revert is over whatever the
scheduler says, and reconcile gives the nodes back again later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kasched.text import printable

log = logging.getLogger("kasched")
REASON_LENGTH = 200  # Slurm keeps node reasons whole, but sinfo -R and oarnodes show one line


def release(
    bus: Any, scheduler: str | None, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]
) -> list[str]:
    """Tell the adapter of ``scheduler`` (None: every adapter, for nodes reconcile gave back) that the
    revert of ``back`` and ``failed`` (node -> why) has ended; the problems met, one line each."""
    if not back and not failed:
        return []
    failed = {node: _reason(why) for node, why in failed.items()}
    problems = []
    for adapter in bus.scheduler_adapters():
        if scheduler is not None and adapter.name != scheduler:
            continue
        try:
            found = adapter.release(job_id, list(back), dict(failed))
        except Exception as error:  # a plugin's bug must not keep the other schedulers' nodes out
            found = [f"release failed: {type(error).__name__}: {error}"]
        problems += [f"{adapter.name}: {problem}" for problem in found]
    for problem in problems:
        log.warning("giving nodes back to the scheduler: %s", problem)
    return problems


def _reason(why: str) -> str:
    """A reason a scheduler can show on one line: printable, at most REASON_LENGTH characters."""
    line = printable(" ".join(why.split()))
    return line if len(line) <= REASON_LENGTH else line[: REASON_LENGTH - 3] + "..."
