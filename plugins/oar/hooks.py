"""OAR's SERVER_PROLOGUE_EXEC_FILE / SERVER_EPILOGUE_EXEC_FILE: ``python -m kasched_oar.hooks prologue|epilogue ID``.

OAR puts the job in Error **and stops every queue** (until ``oarnotify -E``) when a server hook exits
non-zero or runs past SERVER_PROLOGUE_EPILOGUE_TIMEOUT (60 s by default). So both hooks always exit 0,
and call kasched with a timeout below OAR's (KASCHED_OAR_HOOK_TIMEOUT, default 40 s):

prologue: reads the job once (API or oarstat). Not a deploy job, or unreadable: nothing to do (an
unreadable job gets no grant, so its user cannot deploy: safe). A deploy job: ``kasched job start``;
if that fails (database down, node unknown...), the job is cancelled with ``oardel`` rather than run
without a grant, and the prologue still exits 0. epilogue: for a deploy job, first the job's resources
are held (drained, the ``kasched`` property saying why: holds.py) so that no next job gets a node still
being given back; then ``kasched job end`` (the grant is revoked and the nodes reverted in the
background; kaschedd releases the resources when the revert ends). A job without a grant: released at
once. If kasched fails, the resources stay held and the grant stays until kaschedd's reconcile finds
the job gone, revokes it, reverts the nodes and releases them. One line per action on stdout (the
wrapper keeps it in a log).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping

from kasched_oar import holds
from kasched_oar.oarjobs import OarError, OarJob, OarSettings, read_job, run
from kasched_oar.plugin import JOB_JSON

from kasched import deadline

DEFAULT_TIMEOUT = 40.0  # kasched gets a deadline a few seconds before: kaschedd stores nothing after it
NOT_FOUND = 3  # kasched's exit code for a missing grant


def hook_timeout(environ: Mapping[str, str]) -> float:
    try:
        return max(1.0, float(environ.get("KASCHED_OAR_HOOK_TIMEOUT") or DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def kasched(action: str, job: OarJob, environ: Mapping[str, str]) -> tuple[int, str]:
    """Run ``kasched job start|end --scheduler oar -- ID`` with the job passed along; exit code, output."""
    command = [*environ.get("KASCHED", "kasched").split(), "job", action, "--scheduler", "oar", "--", job.job_id]
    timeout = hook_timeout(environ)
    env = {**environ, JOB_JSON: json.dumps(job.as_dict()), **deadline.hook_environ(timeout)}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd="/")
    except OSError as error:
        return 1, f"{command[0]}: {error.strerror}"
    except subprocess.TimeoutExpired:
        return 1, f"kasched job {action} did not finish within {timeout:.0f} s"
    return done.returncode, " / ".join((done.stdout + done.stderr).split("\n")).strip(" /")


def prologue(job_id: str, environ: Mapping[str, str]) -> None:
    settings = OarSettings.from_environ(environ)
    started = time.monotonic()
    try:
        job = read_job(job_id, settings)
    except OarError as error:
        print(f"job {job_id}: not readable, no grant: {error}")
        return
    print(f"job {job_id}: read from {job.source} in {time.monotonic() - started:.2f} s")
    if not job.is_deploy:
        print(f"job {job_id}: not a deploy job ({','.join(job.types) or 'no types'}), nothing to do")
        return
    code, output = kasched("start", job, environ)
    print(f"job {job_id}: {output or f'kasched job start exit {code}'}")
    if code != 0:
        cancel(job_id, settings)


def cancel(job_id: str, settings: OarSettings) -> None:
    """A deploy job without its grant must not run: oardel (as oar, OAR's admin) instead of exit 1."""
    try:
        run(["oardel", job_id], settings)
    except OarError as error:
        print(f"job {job_id}: no grant, and oardel failed: {error}")
        return
    print(f"job {job_id}: no grant: cancelled with oardel")


def epilogue(job_id: str, environ: Mapping[str, str]) -> None:
    settings = OarSettings.from_environ(environ)
    started = time.monotonic()
    try:
        job = read_job(job_id, settings)
        print(f"job {job_id}: read from {job.source} in {time.monotonic() - started:.2f} s")
    except OarError as error:  # a grant of this job, if any, is revoked all the same
        print(f"job {job_id}: not readable ({error}); revoking its grant if it has one")
        job = OarJob(job_id, "", "", (), None, ("deploy",))
    if not job.is_deploy:
        print(f"job {job_id}: not a deploy job, nothing to do")
        return
    held = hold(job, settings)
    code, output = kasched("end", job, environ)
    if code == NOT_FOUND:
        print(f"job {job_id}: had no grant ({output})")
        if held:
            unhold(job, settings)
    elif code != 0:
        print(f"job {job_id}: revoking failed, kaschedd's reconcile will (resources stay held): {output}")
    else:
        print(f"job {job_id}: {output}")


def hold(job: OarJob, settings: OarSettings) -> bool:
    """Drain the job's resources with kasched's reason before the grant ends; whether any was held."""
    if not job.nodes:
        print(f"job {job.job_id}: nodes unknown, none held")
        return False
    started = time.monotonic()
    try:
        held = holds.hold(job.nodes, job.job_id, settings)
    except OarError as error:
        nodes = ",".join(job.nodes)
        print(f"job {job.job_id}: holding {nodes} failed (a next job may get them while reverting): {error}")
        return False
    what = "held" if held else "not held (drained by an admin already)"
    print(f"job {job.job_id}: {','.join(job.nodes)} {what} in {time.monotonic() - started:.2f} s")
    return held


def unhold(job: OarJob, settings: OarSettings) -> None:
    """Release at once what :func:`hold` held for a job that had no grant (nothing to give back)."""
    try:
        holds.set_resources(holds.back_args(job.nodes, only_reason=holds.hold_reason(job.job_id)), settings)
    except OarError as error:
        print(f"job {job.job_id}: releasing {','.join(job.nodes)} failed: {error}")
        return
    print(f"job {job.job_id}: {','.join(job.nodes)} released")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("prologue", "epilogue") or not args[1].isdigit():
        print("usage: python -m kasched_oar.hooks prologue|epilogue JOB_ID", file=sys.stderr)
        return 0  # OAR would stop all queues on anything else
    started = time.monotonic()
    hook = prologue if args[0] == "prologue" else epilogue
    try:
        hook(args[1], os.environ)
    except Exception as error:  # never block OAR's queues, whatever happened
        print(f"job {args[1]}: {args[0]} failed: {type(error).__name__}: {error}")
    print(f"job {args[1]}: {args[0]} done in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
