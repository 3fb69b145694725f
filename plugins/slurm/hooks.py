"""PrologSlurmctld / EpilogSlurmctld for deploy jobs: ``python -m kasched_slurm.hooks prolog|epilog``.

prolog: only for jobs that ask for the ``deploy`` feature. Reads the job's time limit (slurmctld does
not give it to its hooks) from ``squeue --json``, runs ``kasched job start`` (the grant, through the
plugin bus) with it in KASCHED_SLURM_TIME_LIMIT, then starts the job's stand-in slurmds (standin.py).
A failure revokes what was done and exits non-zero: slurmctld then cancels the job (deploy jobs are
not requeued, see job_submit.lua). epilog: drains the job's nodes (the hold, hold.py), runs ``kasched
job end`` (the grant revoked, its operations cancelled, the revert started), then stops the stand-ins
and gives the nodes their own address back, still drained, in that order: the nodes go back into
service only when kasched's release says their revert has ended, so the user's next job never meets
the old job's end nor a node still being reverted. Both print one line per action on stdout (the
wrapper keeps it in a log).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from kasched_slurm import hold, slurmcli, standin
from kasched_slurm.plugin import SlurmAdapter

from kasched import deadline
from kasched.errors import KaschedError
from kasched.nodeset import expand

KASCHED_TIMEOUT = 60.0  # kasched gets a deadline a few seconds before: kaschedd stores nothing after it
NOT_FOUND = 3  # kasched's exit code for a missing grant


def is_deploy(environ: Mapping[str, str]) -> bool:
    return SlurmAdapter.wants_deploy(environ.get("SLURM_JOB_CONSTRAINTS", ""))


def kasched(action: str, environ: Mapping[str, str]) -> int:
    """Run ``kasched job start|end --scheduler slurm``; print its output; its exit code."""
    command = [environ.get("KASCHED", "kasched"), "job", action, "--scheduler", "slurm"]
    env = {**environ, **deadline.hook_environ(KASCHED_TIMEOUT)}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=KASCHED_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"kasched job {action}: {error}")
        return 1
    for line in (done.stdout + done.stderr).splitlines():
        print(line)
    return done.returncode


def time_limit(job_id: str) -> float | None:
    try:
        job = slurmcli.job(job_id)
    except KaschedError as error:
        print(f"time limit of job {job_id} unknown ({error}); the grant gets max_grant_hours")
        return None
    return job.time_limit if job else None


def prolog(environ: Mapping[str, str]) -> int:
    job_id = environ.get("SLURM_JOB_ID", "")
    if not is_deploy(environ):
        print(f"job {job_id}: not a deploy job, nothing to do")
        return 0
    env = dict(environ)
    limit = time_limit(job_id)
    if limit:
        env["KASCHED_SLURM_TIME_LIMIT"] = str(int(limit))
    code = kasched("start", env)
    if code != 0:
        return code
    settings = standin.StandinSettings.from_environ(environ)
    if settings is None:
        return 0
    names = expand(environ.get("SLURM_JOB_NODELIST", ""), field="SLURM_JOB_NODELIST")
    started = time.monotonic()
    try:
        standins = standin.attach(settings, job_id, list(names))
    except KaschedError as error:
        print(f"job {job_id}: stand-ins failed: {error}; revoking the grant")
        _prolog_failed(settings, job_id).touch()  # the epilog's `kasched job end` then revokes nothing
        kasched("end", {**env, "SLURM_JOB_EXIT_CODE": "stand-in failure"})
        return 1
    try:
        keeper = str(standin.ensure_keeper(settings))
    except OSError as error:  # the job runs; only a slurmctld restart would lose its nodes
        keeper = f"not started ({error})"
    pids = " ".join(f"{s.node}:{s.pid}" for s in standins)
    print(f"job {job_id}: stand-ins {pids} on {settings.addr} in {time.monotonic() - started:.2f} s, keeper {keeper}")
    return 0


def _prolog_failed(settings: standin.StandinSettings, job_id: str) -> Path:
    """A mark the prolog leaves when it revoked the grant itself: no release will follow the epilog's."""
    return settings.state_dir / f"job-{job_id}.prolog-failed"


def epilog(environ: Mapping[str, str]) -> int:
    """Hold the nodes (drain), revoke the grant (its operations cancelled, its nodes' revert started),
    then give the nodes their own address back, still held: kasched's release puts them back into
    service once their revert has ended (docs/slurm.md)."""
    job_id = environ.get("SLURM_JOB_ID", "")
    if not is_deploy(environ):
        print(f"job {job_id}: not a deploy job, nothing to do")
        return 0
    names = expand(environ.get("SLURM_JOB_NODELIST", ""), field="SLURM_JOB_NODELIST")
    hold_nodes(job_id, list(names))
    state = job_state(job_id)
    print(f"job {job_id}: ended {state or 'in an unknown state'}")
    ended = kasched("end", {**environ, "KASCHED_SLURM_JOB_STATE": state})
    settings = standin.StandinSettings.from_environ(environ)
    unreleased = ended == NOT_FOUND  # the prolog failed before granting (Slurm runs the epilog anyway)
    if settings is not None and _prolog_failed(settings, job_id).exists():
        unreleased = True  # the prolog revoked the grant before the hold: nothing releases the nodes
    if ended == NOT_FOUND:
        print(f"job {job_id}: had no grant")
        ended = 0
    code = detach(settings, job_id) if settings is not None else 0
    if unreleased:
        directory = hold.state_dir(environ)
        problems = hold.release(directory, job_id, list(names), {})
        print(f"job {job_id}: nothing to give back: nodes released {'; '.join(problems) or 'at once'}")
        (directory / f"job-{job_id}.prolog-failed").unlink(missing_ok=True)
    return code or ended


def detach(settings: standin.StandinSettings, job_id: str) -> int:
    """Stop the job's stand-ins and give its nodes their own address back, still held; 1 on failure."""
    started = time.monotonic()
    try:
        released = standin.detach(settings, job_id)
    except KaschedError as error:
        print(f"job {job_id}: giving the nodes back failed: {error}")
        return 1
    names = ",".join(s.node for s in released) or "none"
    print(f"job {job_id}: stand-ins stopped, nodes {names} given back (held) in {time.monotonic() - started:.2f} s")
    return 0


def hold_nodes(job_id: str, names: list[str]) -> None:
    """Drain the job's nodes before anything else: Slurm gives them to no job until kasched's release."""
    started = time.monotonic()
    try:
        held = hold.hold(job_id, names)
    except KaschedError as error:  # the detach drains them too; the job's end must go on
        print(f"job {job_id}: holding the nodes failed: {error}")
        return
    print(f"job {job_id}: nodes {','.join(held) or 'none'} held (drained) in {time.monotonic() - started:.2f} s")


STATE_SETTLE_SECONDS = 5.0  # how long the epilog waits for the exit status of a job scancel ended


def job_state(job_id: str, settle: float = STATE_SETTLE_SECONDS) -> str:
    """How the job ended (COMPLETED, TIMEOUT, CANCELLED, NODE_FAIL...): the epilog's environment only has
    an exit code, 0 after a walltime kill too.

    After ``scancel`` slurmctld runs EpilogSlurmctld at once, before the node reports that the batch
    script died of SIGTERM (seen on Slurm 22.05: exit status 0, then 15 about 0.3 s later). A job that
    looks like a plain exit 0 is read again for up to ``settle`` seconds; only deploy jobs pay it. 2 s was
    not enough on a loaded host (load average 45: a scancel read as a normal end)."""
    deadline = time.monotonic() + settle
    while True:
        try:
            job = slurmcli.job(job_id)
        except KaschedError:
            return ""
        if job is None:
            return ""
        state = job.base_state
        if state != "COMPLETING" or job.exit_status or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if state == "SIGNALED":
        return f"SIGNALED {job.signal}"
    return state


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["prolog"], ["epilog"]):
        print("usage: python -m kasched_slurm.hooks prolog|epilog", file=sys.stderr)
        return 2
    hook = prolog if args[0] == "prolog" else epilog
    try:
        return hook(os.environ)
    except KaschedError as error:
        print(f"kasched-slurm {args[0]}: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
