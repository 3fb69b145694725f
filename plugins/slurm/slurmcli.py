"""Slurm's own commands as a small typed API, for Slurm 22.05 as Debian 12 ships it.

pyslurm has no release for 22.05 (only 18.08 and 25.11 on the package index), and Debian's 22.05
``scontrol`` refuses ``--json`` ("unrecognized option"), but ``squeue --json`` and ``sinfo --json`` work:
reads go through those, node updates through ``scontrol update``. Every call has a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kasched.errors import KaschedError
from kasched.schedulers import json_object, run_command

TIMEOUT = 20.0


class SlurmCommandError(KaschedError):
    """A Slurm command failed or printed something unreadable."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    user: str
    state: str
    nodes: str
    features: str
    comment: str
    time_limit: float | None  # seconds; None: unlimited
    restarts: int
    start_time: int = 0  # epoch seconds
    end_time: int = 0
    exit_status: int = 0  # raw wait status: signal in the low 7 bits, exit code above

    @property
    def base_state(self) -> str:
        """How the job ended. While EpilogSlurmctld runs squeue says only COMPLETING: a job that ran its
        whole time limit is TIMEOUT, one killed by a signal is SIGNALED (scancel sends SIGTERM)."""
        if self.state != "COMPLETING":
            return self.state
        ran = self.end_time - self.start_time
        if self.time_limit and self.start_time and ran >= self.time_limit - 1:
            return "TIMEOUT"
        if self.signal:
            return "SIGNALED"
        return "COMPLETING"

    @property
    def signal(self) -> int:
        """The signal that ended the batch script: from the wait status, or a shell's exit code 128+N (a
        script whose child scancel's SIGTERM reached first exits 143 instead of dying of it; seen under
        load on a lab)."""
        code = self.exit_status >> 8
        return self.exit_status & 0x7F or (code - 128 if 128 < code < 160 else 0)


@dataclass(frozen=True)
class SlurmNode:
    name: str
    address: str
    hostname: str
    port: int
    states: tuple[str, ...]  # base state and flags, upper case: ("ALLOCATED", "COMPLETING")
    reason: str


def run(args: list[str], timeout: float = TIMEOUT) -> str:
    """Run a Slurm command; its stdout, or SlurmCommandError naming the command and its complaint."""
    return run_command(args, timeout, SlurmCommandError, "slurm-client")


def _json(args: list[str]) -> dict[str, Any]:
    return json_object(run(args), " ".join(args), SlurmCommandError, " (needs Slurm 22.05 or later)")


def job(job_id: str) -> SlurmJob | None:
    """The job as ``squeue --json`` shows it (finished jobs stay visible for MinJobAge), or None."""
    for entry in _json(["squeue", "--json"]).get("jobs", []):
        if str(entry.get("job_id")) == str(job_id):
            return _job(entry)
    return None


def _job(entry: dict[str, Any]) -> SlurmJob:
    limit = entry.get("time_limit")
    # squeue prints minutes; INFINITE and NO_VAL show up as large or negative numbers.
    seconds = float(limit) * 60 if isinstance(limit, int) and 0 < limit < 0xFFFFFFFE else None
    return SlurmJob(
        job_id=str(entry.get("job_id")),
        user=str(entry.get("user_name", "")),
        state=str(entry.get("job_state", "")),
        nodes=str(entry.get("nodes", "")),
        features=str(entry.get("features", "")),
        comment=str(entry.get("comment", "")),
        time_limit=seconds,
        restarts=int(entry.get("restart_cnt") or 0),
        start_time=int(entry.get("start_time") or 0),
        end_time=int(entry.get("end_time") or 0),
        exit_status=int(entry.get("exit_code") or 0),
    )


def nodes(names: list[str] | None = None) -> dict[str, SlurmNode]:
    """Nodes by name as ``sinfo --json`` shows them (all of them, or those named)."""
    found: dict[str, SlurmNode] = {}
    for entry in _json(["sinfo", "--json"]).get("nodes", []):
        name = str(entry.get("name", ""))
        if names is not None and name not in names:
            continue
        flags = entry.get("state_flags") or []
        found[name] = SlurmNode(
            name=name,
            address=str(entry.get("address", "")),
            hostname=str(entry.get("hostname", "")),
            port=int(entry.get("port") or 6818),
            states=tuple(s.upper() for s in [str(entry.get("state", "")), *map(str, flags)] if s),
            reason=str(entry.get("reason", "")),
        )
    return found


def update_nodes(names: list[str], **fields: str) -> None:
    """``scontrol update NodeName=a,b Field=value ...`` (e.g. NodeAddr=..., State=DOWN, Reason=...)."""
    if not names:
        return
    args = ["scontrol", "update", f"NodeName={','.join(names)}"]
    args += [f"{key}={value}" for key, value in fields.items()]
    run(args)


ACTIVE_STATES = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}


def active_job_ids() -> set[str]:
    """Jobs that hold their nodes now (running, starting, ending, suspended), as ``squeue --json``
    lists them."""
    jobs = _json(["squeue", "--json"]).get("jobs", [])
    return {str(entry.get("job_id")) for entry in jobs if str(entry.get("job_state", "")).upper() in ACTIVE_STATES}


def config() -> dict[str, str]:
    """``scontrol show config`` as a mapping (``ClusterName``, ``PrologSlurmctld``, ``SlurmdTimeout``...)."""
    settings = {}
    for line in run(["scontrol", "show", "config"]).splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            settings[key.strip()] = value.strip()
    return settings


def version() -> str:
    """The installed Slurm's version, e.g. ``22.05.8`` (``sinfo --version``)."""
    return run(["sinfo", "--version"]).split()[-1]
