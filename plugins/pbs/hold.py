"""How kasched puts PBS vnodes it held back into service: ``pbsnodes``, as documented in pbsnodes(8B).

At a deploy job's end, kasched's PBS server hook marks the job's vnodes OFFLINE with a comment that
starts with :data:`kasched.schedulers.HOLD_MARK` (``pbsnodes -o -C "kasched: giving back after job ID"``):
an offline vnode keeps its jobs but is out of the scheduling pool. Once the revert has ended, kaschedd
(:meth:`kasched_pbs.plugin.PbsAdapter.release`) reads every vnode's state and comment
(``pbsnodes -av -F json``) and, only for the vnodes whose comment starts with HOLD_MARK:

- back: ``pbsnodes -r -C "" NODE`` clears OFFLINE and the comment (an empty comment unsets it);
- failed: ``pbsnodes -o -C "REASON" NODE``: stays offline, the comment says why (``pbsnodes -l`` lists it).

A vnode offline with another comment is an admin's: it stays as it is. pbsnodes keeps at most 79
characters of a comment, so a longer reason is cut (the whole reason is in kasched's revert log).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kasched.schedulers import HOLD_MARK

COMMAND_TIMEOUT = 30.0
COMMENT_LIMIT = 79  # pbsnodes copies a comment into an 80-byte buffer: at most 79 characters are kept
OFFLINE = "offline"


@dataclass(frozen=True)
class Vnode:
    """One vnode as ``pbsnodes -av -F json`` shows it: its states (``free``, ``offline``, ``down``...)
    and its comment ("" when unset)."""

    name: str
    states: frozenset[str]
    comment: str

    @property
    def offline(self) -> bool:
        return OFFLINE in self.states

    @property
    def held_by_kasched(self) -> bool:
        return self.comment.startswith(HOLD_MARK)


def pbs_command(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The PBS command ``name`` to run: ``$KASCHED_PBS_EXEC/bin/NAME`` (PBS_EXEC of /etc/pbs.conf, e.g.
    /opt/pbs) when that setting is given, else the one on PATH; None when there is none."""
    environ = os.environ if environ is None else environ
    exec_dir = environ.get("KASCHED_PBS_EXEC")
    if exec_dir:
        path = Path(exec_dir) / "bin" / name
        return str(path) if os.access(path, os.X_OK) else None
    return shutil.which(name, path=environ.get("PATH"))


def comment(text: str) -> str:
    """``text`` as a comment pbsnodes keeps whole: one line, at most COMMENT_LIMIT characters."""
    line = " ".join(text.split())
    return line if len(line) <= COMMENT_LIMIT else line[: COMMENT_LIMIT - 3] + "..."


def vnodes_of(listing: str) -> dict[str, Vnode] | None:
    """The vnodes of ``pbsnodes -av -F json`` output, by name; None when it is not that output."""
    try:
        data = json.loads(listing)
    except ValueError:
        return None
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict):
        return None
    found = {}
    for name, attributes in nodes.items():
        if not isinstance(attributes, dict):
            continue
        states = frozenset(s.strip() for s in str(attributes.get("state", "")).split(",") if s.strip())
        found[name] = Vnode(name, states, str(attributes.get("comment") or ""))
    return found


def release(pbsnodes: str, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
    """Put ``back`` into service and keep ``failed`` offline with their reasons, for the vnodes kasched
    holds; the problems met, one line each."""
    listing, error = _run([pbsnodes, "-av", "-F", "json"])
    vnodes = None if listing is None else vnodes_of(listing)
    if vnodes is None:
        return [f"cannot read the vnodes (pbsnodes -av -F json): {error or 'unreadable output'}"]
    problems = []
    for name in back:
        vnode = vnodes.get(name)
        if vnode is not None and vnode.offline and vnode.held_by_kasched:
            problems += _mark(pbsnodes, "-r", "", name)
    for name, reason in failed.items():
        vnode = vnodes.get(name)
        if vnode is None or (vnode.offline and not vnode.held_by_kasched):
            continue  # not PBS's, or an admin's own offline: left as it is
        problems += _mark(pbsnodes, "-o", comment(reason), name)
    return problems


def _mark(pbsnodes: str, option: str, text: str, name: str) -> list[str]:
    _, error = _run([pbsnodes, option, "-C", text, name])
    return [] if error is None else [f"{name}: pbsnodes {option} failed: {error}"]


def _run(command: list[str]) -> tuple[str | None, str | None]:
    """(stdout, None) when the command succeeded, else (None, why in one line)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except OSError as error:
        return None, error.strerror or str(error)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {COMMAND_TIMEOUT:.0f} s"
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        return None, lines[-1] if lines else f"exit {done.returncode}"
    return done.stdout, None
