"""Scheduler adapters: what a scheduler plugin provides so that prolog, epilog and reconcile can work
with any scheduler through the plugin bus."""

from __future__ import annotations

import json
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kasched.errors import KaschedError
from kasched.messages import JobEnd, JobInfo

HOLD_MARK = "kasched:"  # how every reason or comment kasched writes on a scheduler's node starts


@dataclass(frozen=True)
class Check:
    """One line of ``kasched doctor``: what was checked, whether it is fine, and what was found."""

    what: str
    ok: bool
    detail: str


class SchedulerAdapter(ABC):
    """Knows one batch scheduler: recognises its hook environment and reads its jobs."""

    name: str = ""

    @abstractmethod
    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        """Whether the current process is a hook (prolog/epilog) run by this scheduler."""

    @abstractmethod
    def read_job_start(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        """The job whose start the hook reports; a KaschedError if it cannot be read."""

    @abstractmethod
    def read_job_end(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        """The job whose end the hook reports."""

    def is_deploy_job(self, job: JobInfo) -> bool:
        """Whether the job asked to deploy its nodes; only deploy jobs get a grant. By default, all."""
        return True

    def running_jobs(self, cluster: str) -> set[str] | None:
        """Ids of the jobs this scheduler runs now on ``cluster`` (deploy or not), for ``kasched
        reconcile``. None when it cannot tell (scheduler not installed or unreachable, or another
        cluster): reconcile then leaves that scheduler's grants alone, it never guesses."""
        return None

    def release(self, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
        """The revert of nodes this scheduler kept out of scheduling at the end of job ``job_id`` (None:
        nodes reconcile gave back, no job known) has ended: put ``back`` into service again, keep each
        node of ``failed`` out with its reason (node -> why) where the admin looks, starting with
        :data:`HOLD_MARK`. Only nodes kasched itself holds (their reason starts with HOLD_MARK) are
        touched: an admin's own drain or offline stays. Nodes this scheduler does not know are skipped.
        Returns the problems met, one line each; never raises (the revert is over whatever the
        scheduler says; reconcile tries again). The hold itself is the scheduler's hook's, before it
        runs ``kasched job end``: docs/plugins.md, "Holding nodes while they are given back"."""
        return []

    def doctor(self) -> list[Check]:
        """``kasched doctor``: this scheduler's state as kasched sees it (which client library or command
        it uses, whether the prolog/epilog are configured). Empty when there is nothing to check."""
        return []


def run_command(
    args: list[str], timeout: float, error: type[KaschedError], package: str, cwd: str | None = None
) -> str:
    """Run a scheduler's command; its stdout, or ``error`` naming the command and its complaint (the
    Debian ``package`` to install when the command is missing)."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    except FileNotFoundError:
        raise error(f"{args[0]} not found (install Debian package {package})") from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(args)} did not answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise error(f"{' '.join(args)} failed: {message[-1] if message else done.returncode}")
    return done.stdout


def positive_seconds(value: str) -> float | None:
    """A walltime a hook was given as text: seconds, or None when it is missing, unreadable or not > 0."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def json_object(text: str, what: str, error: type[KaschedError], hint: str = "") -> dict[str, Any]:
    """A scheduler's JSON answer, which must be an object; else ``error`` saying what printed it."""
    try:
        data = json.loads(text)
    except ValueError:
        raise error(f"{what} printed no JSON{hint}") from None
    if not isinstance(data, dict):
        raise error(f"{what} printed unexpected JSON")
    return data
