"""Keeping OAR resources out of scheduling while kasched gives their nodes back, with the reason.

OAR 2.5 resources have a ``drain`` column: ``oarnodesetting --drain on`` sets it, and admission rule 3
(shipped on) adds ``drain='NO'`` to every job's properties, so a drained resource gets no new job while
its running (or Finishing) job is left alone. OAR 2.5 has no comment column: the reason goes in the
resource property :data:`PROPERTY` (a varchar, ``oarproperty -a kasched -c``), always starting with
:data:`kasched.schedulers.HOLD_MARK`. A resource drained without that mark is an admin's: never touched.

All changes go through ``oarnodesetting --sql CLAUSE --drain on|off -p kasched=REASON``: one command,
which OAR runs under a lock of its resources table. OAR pastes both the clause and the value into its
SQL unquoted, so node names must be plain host names and reasons are reduced to safe characters.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kasched_oar.oarjobs import OarError, OarSettings, run

from kasched.schedulers import HOLD_MARK, json_object

PROPERTY = "kasched"  # the resource property holding kasched's reason (oarproperty -a kasched -c)
NOTHING_SELECTED = 12  # oarnodesetting's exit code when its --sql clause selects no resource
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;_/()+@#%-]")  # OAR quotes nothing; '=' splits its -p argument
MAX_REASON = 240  # the property is a varchar(255)
OURS = f"{PROPERTY} LIKE '{HOLD_MARK}%'"


def hold_reason(job_id: str) -> str:
    """What a resource says while kasched gives its node back after job ``job_id``."""
    return f"{HOLD_MARK} giving back after job {job_id}"


def safe_reason(reason: str) -> str:
    """``reason`` as OAR can store it: safe characters only, at most MAX_REASON, starting with HOLD_MARK."""
    text = " ".join(UNSAFE.sub(" ", reason).split())
    if not text.startswith(HOLD_MARK):
        text = f"{HOLD_MARK} {text}"
    return text[:MAX_REASON]


def hosts_clause(nodes: Iterable[str]) -> str:
    """``network_address IN (...)`` for plain host names; OarError for anything else."""
    names = sorted(set(nodes))
    bad = [n for n in names if not HOST_NAME.match(n)]
    if bad or not names:
        raise OarError(f"not OAR host names: {', '.join(bad) or 'none given'}")
    return "network_address IN ({})".format(",".join(f"'{n}'" for n in names))


def hold_args(nodes: Sequence[str], job_id: str) -> list[str]:
    """Drain the resources of ``nodes`` with the hold reason of ``job_id``; those an admin drained
    already (drain on, no kasched mark) stay as they are."""
    where = f"{hosts_clause(nodes)} AND (drain='NO' OR {OURS})"
    return ["oarnodesetting", "--sql", where, "--drain", "on", "-p", f"{PROPERTY}={hold_reason(job_id)}"]


def back_args(nodes: Sequence[str], only_reason: str | None = None) -> list[str]:
    """Put back into service the resources of ``nodes`` that kasched holds (only those holding
    ``only_reason`` if given): drain off, reason cleared."""
    mark = f"{PROPERTY} = '{safe_reason(only_reason)}'" if only_reason else OURS
    return ["oarnodesetting", "--sql", f"{hosts_clause(nodes)} AND {mark}", "--drain", "off", "-p", f"{PROPERTY}="]


def failed_args(node: str, reason: str) -> list[str]:
    """Keep ``node``'s resources held (drained) by kasched with ``reason``, if kasched holds them."""
    where = f"{hosts_clause([node])} AND {OURS}"
    return ["oarnodesetting", "--sql", where, "--drain", "on", "-p", f"{PROPERTY}={safe_reason(reason)}"]


def set_resources(args: list[str], settings: OarSettings) -> bool:
    """Run one oarnodesetting change; True if it changed resources, False if its clause selected none.
    OarError if it failed."""
    command = settings.command(args)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings.timeout, check=False, cwd="/")
    except FileNotFoundError:
        raise OarError(f"{command[0]} not found (install Debian package oar-server)") from None
    except subprocess.TimeoutExpired:
        raise OarError(f"oarnodesetting did not answer within {settings.timeout:.0f} s") from None
    if done.returncode == NOTHING_SELECTED and "SQL clause returns nothing" in done.stderr:
        return False
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise OarError(f"oarnodesetting failed (exit {done.returncode}): {lines[-1] if lines else ''}".rstrip(": "))
    return True


def hold(nodes: Sequence[str], job_id: str, settings: OarSettings) -> bool:
    """Drain the job's resources with the hold reason, before ``kasched job end``; False if there was
    nothing to hold (every resource drained by an admin already). OarError if OAR refused."""
    return set_resources(hold_args(nodes, job_id), settings)


def release(back: Sequence[str], failed: Mapping[str, str], settings: OarSettings) -> list[str]:
    """``back`` into service, each node of ``failed`` kept drained with its reason; only resources
    kasched holds. The problems met, one line each."""
    problems = [f"{n}: not an OAR host name, left alone" for n in [*back, *failed] if not HOST_NAME.match(n)]
    back = [n for n in back if HOST_NAME.match(n)]
    if back:
        try:
            set_resources(back_args(back), settings)
        except OarError as error:
            problems.append(f"{', '.join(back)} not put back into service: {error}")
    for node, reason in sorted((n, r) for n, r in failed.items() if HOST_NAME.match(n)):
        try:
            set_resources(failed_args(node, reason), settings)
        except OarError as error:
            problems.append(f"{node}: reason not recorded: {error}")
    return problems


def held_resources(settings: OarSettings) -> dict[str, tuple[str, str]]:
    """Every resource kasched holds now: host -> (drain, reason), from ``oarnodes --sql ... -J``."""
    out = run(["oarnodes", "--sql", OURS, "-J"], settings)
    data: dict[str, Any] = json_object(out, "oarnodes -J", OarError) if out.strip() else {}
    return {
        str(r.get("network_address")): (str(r.get("drain")), str(r.get(PROPERTY)))
        for r in data.values()
        if isinstance(r, dict)
    }


def property_exists(settings: OarSettings) -> bool:
    """Whether OAR's resources have the :data:`PROPERTY` column (``oarproperty -l``)."""
    return PROPERTY in run(["oarproperty", "-l"], settings).split()
