"""The hold: a deploy job's nodes stay out of scheduling from the job's end until kasched has given them back.

EpilogSlurmctld drains the job's nodes (:func:`hold`, reason ``kasched: giving back after job N``) BEFORE
it runs ``kasched job end``; the detach of the stand-ins then gives each node its own address back and
sets it DOWN, which keeps the drain and its reason (measured on 22.05: DOWN+DRAIN, and with
``ReturnToService=2`` the node's registration makes it IDLE+DRAIN, still drained). Once the revert has
ended, kasched calls ``SlurmAdapter.release`` (:func:`release`): the nodes back are RESUMEd, the failed
ones stay drained with why (``sinfo -R``). Only nodes whose reason starts with HOLD_MARK are touched: an
admin's own drain stays.

The release may come before the detach: a trusted node's revert takes 1-3 s, and with nothing to revert
(or ``revert_at_job_end: false``) it runs inside ``kasched job end`` itself, before the epilog goes on.
A RESUME then would let Slurm hand the node to the next job while it still points at the old job's
stand-in, and the detach's DOWN would undo it. So the release and the end of the detach take the same
lock (``release.lock`` in KASCHED_SLURM_STATE_DIR): a release for a job whose stand-in record is still
there (``job-N.json`` or ``job-N.releasing``) is written down (``job-N.released``) and the detach
applies it as its last step, under the lock; a later release is applied at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from kasched_slurm import slurmcli

from kasched.errors import KaschedError
from kasched.schedulers import HOLD_MARK

log = logging.getLogger("kasched")

DEFAULT_STATE_DIR = "/var/lib/kasched/slurm"
HOLD_REASON = HOLD_MARK + " giving back after job {job}"
HOLD_RE = re.compile(re.escape(HOLD_MARK) + r" giving back after job (?P<job>\S+)$")
MAX_REASON = 200  # a failure's reason as Slurm keeps it (the whole error is in the reclaim log)
# A .releasing record older than this is left by an epilog that died (PrologEpilogTimeout): the detach of
# a live one ends within DRAIN_TIMEOUT + STOP_TIMEOUT (standin.py) and a few scontrol calls.
STALE_SECONDS = 300.0


def state_dir(environ: Mapping[str, str]) -> Path:
    """Where the stand-ins' records, the deferred releases and the lock are (KASCHED_SLURM_STATE_DIR)."""
    return Path(environ.get("KASCHED_SLURM_STATE_DIR", "").strip() or DEFAULT_STATE_DIR)


def hold_reason(job_id: str) -> str:
    return HOLD_REASON.format(job=job_id)


def is_ours(node: slurmcli.SlurmNode) -> bool:
    """Whether kasched may change the node's drain: no reason, or one kasched wrote."""
    return not node.reason or node.reason.startswith(HOLD_MARK)


def is_held(node: slurmcli.SlurmNode) -> bool:
    return "DRAIN" in node.states or "DOWN" in node.states


def hold(job_id: str, names: Sequence[str]) -> list[str]:
    """Drain the job's nodes with the hold reason (an admin's own drain is left as it is); the nodes
    held. Raises SlurmCommandError when Slurm does not answer."""
    known = slurmcli.nodes(list(names))
    held = [name for name in names if name in known and is_ours(known[name])]
    slurmcli.update_nodes(held, State="DRAIN", Reason=hold_reason(job_id))
    return held


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """The release lock of the state dir (opened read-only: the hooks' user and kaschedd's root share it)."""
    fd = os.open(directory / "release.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pending(directory: Path) -> dict[str, str]:
    """Node -> job id for every node whose job's stand-ins are not given back yet (the job runs, or its
    epilog is giving the nodes back); a record left by an epilog that died long ago does not count."""
    found: dict[str, str] = {}
    now = time.time()
    for record in [*directory.glob("job-*.json"), *directory.glob("job-*.releasing")]:
        try:
            if record.suffix == ".releasing" and now - record.stat().st_mtime > STALE_SECONDS:
                continue
            entries = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        for entry in entries:
            found[str(entry.get("node"))] = record.stem.removeprefix("job-")
    return found


def _note_path(directory: Path, job_id: str) -> Path:
    return directory / f"job-{job_id}.released"


def defer(directory: Path, job_id: str, back: Sequence[str], failed: Mapping[str, str]) -> None:
    """Write a release down for the detach of job ``job_id`` to apply (merged with one written before)."""
    path = _note_path(directory, job_id)
    note: dict[str, object] = {"back": [], "failed": {}}
    with contextlib.suppress(OSError, ValueError):
        note = json.loads(path.read_text())
    was_back = [n for n in note.get("back", []) if n not in failed]  # type: ignore[attr-defined]
    note = {"back": sorted({*was_back, *back}), "failed": {**note.get("failed", {}), **failed}}  # type: ignore[dict-item]
    temporary = path.with_suffix(".tmp-released")
    temporary.write_text(json.dumps(note))
    temporary.replace(path)


def take_deferred(directory: Path, job_id: str) -> tuple[list[str], dict[str, str]]:
    """The release written down for job ``job_id`` (removed), or nothing."""
    path = _note_path(directory, job_id)
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], {}
    path.unlink(missing_ok=True)
    return [str(n) for n in note.get("back", [])], {str(k): str(v) for k, v in note.get("failed", {}).items()}


def apply(job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
    """RESUME the nodes of ``back`` kasched holds; drain those of ``failed`` with why. Nodes held for
    another job's give-back (its own release will come) and nodes Slurm does not know are skipped. The
    problems met."""
    try:
        known = slurmcli.nodes([*back, *failed])
    except KaschedError as error:
        return [f"cannot read the nodes: {error}"]
    problems: list[str] = []

    def mine(name: str) -> bool:
        node = known.get(name)
        if node is None or not is_ours(node):
            return False
        other = HOLD_RE.match(node.reason)
        return not (other and job_id is not None and other.group("job") != job_id)

    resume = [name for name in back if mine(name) and is_held(known[name])]
    problems += _update(resume, State="RESUME")
    for name, why in failed.items():
        if mine(name):
            reason = why if why.startswith(HOLD_MARK) else f"{HOLD_MARK} {why}"
            problems += _update([name], State="DRAIN", Reason=" ".join(reason.split())[:MAX_REASON])
    if resume or failed:
        log.info("slurm: job %s given back: %s resumed, %s kept drained", job_id, resume, sorted(failed))
    return problems


def _update(names: list[str], **fields: str) -> list[str]:
    """One scontrol call for all, one per node if that fails (one node's state must not keep the others)."""
    if not names:
        return []
    try:
        slurmcli.update_nodes(names, **fields)
        return []
    except KaschedError as error:
        if len(names) == 1:
            return [f"{names[0]}: {error}"]
    return [problem for name in names for problem in _update([name], **fields)]


def release(directory: Path, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
    """What ``SlurmAdapter.release`` does: apply now, or leave it to the detach of the job's stand-ins
    when they are not given back yet. Nodes whose give-back belongs to another job are skipped."""
    if not directory.is_dir():  # no stand-ins ever ran here: nothing to wait for
        return apply(job_id, back, failed)
    with locked(directory):
        waiting = pending(directory)
        later = {n for n in [*back, *failed] if job_id is not None and waiting.get(n) == job_id}
        skipped = sorted(n for n in [*back, *failed] if n in waiting and n not in later)
        if later:
            failed_later = {n: why for n, why in failed.items() if n in later}
            defer(directory, str(job_id), [n for n in back if n in later], failed_later)
        problems = apply(
            job_id,
            [n for n in back if n not in waiting],
            {n: why for n, why in failed.items() if n not in waiting},
        )
    if later:
        log.info("slurm: job %s: release of %s left to its epilog (stand-ins still there)", job_id, sorted(later))
    return problems + [f"{n}: in job {waiting[n]}'s hands (stand-ins not given back yet): left alone" for n in skipped]
