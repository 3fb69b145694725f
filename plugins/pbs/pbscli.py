"""What kasched reads from PBS's own commands: running jobs from ``qstat -f -F json -t`` (for ``kasched
reconcile``) and the hook and resource definitions from ``qmgr`` (for ``kasched doctor``)."""

from __future__ import annotations

import json
import subprocess

from kasched_pbs.hold import pbs_command, vnodes_of

from kasched.schedulers import Check

COMMAND_TIMEOUT = 30.0
# Job states that hold nodes: Running, Exiting, Suspended, User-suspended, Begun (a job array).
HOLDING_NODES = {"R", "E", "S", "U", "B"}
HOOK_NAME = "kasched"
START_EVENTS = {"queuejob", "runjob"}
# The server-side end-of-job event: "jobobit" in OpenPBS 22.05 and later (renamed in 2021, OpenPBS
# pull request 2494, from "endjob", the name of its design PP-912).
END_EVENTS = {"jobobit", "endjob"}


def run(command: list[str]) -> str | None:
    """The command's standard output, or None if it could not be run or failed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def running_jobs(cluster: str, qstat: str | None = None) -> set[str] | None:
    command = qstat or pbs_command("qstat")
    if not command:
        return None
    output = run([command, "-f", "-F", "json", "-t"])
    return None if output is None else jobs_holding_nodes(output, cluster)


def jobs_holding_nodes(qstat_json: str, cluster: str) -> set[str] | None:
    """Ids of the jobs of ``qstat -f -F json`` output that hold nodes now; None if the output is not
    readable or is another server's (``cluster`` is the PBS server's name, full or short)."""
    try:
        status = json.loads(qstat_json)
    except ValueError:
        return None
    if not isinstance(status, dict):
        return None
    server = str(status.get("pbs_server", ""))
    if cluster not in (server, server.split(".")[0]):
        return None
    jobs = status.get("Jobs") or {}
    if not isinstance(jobs, dict):
        return None
    return {job_id for job_id, job in jobs.items() if isinstance(job, dict) and job.get("job_state") in HOLDING_NODES}


def server_checks(qmgr: str) -> list[Check]:
    hook = run([qmgr, "-c", f"list hook {HOOK_NAME}"])
    checks = [hook_check(hook)]
    for resource, kind in (("deploy", "boolean"), ("kasched_env", "string")):
        listing = run([qmgr, "-c", f"list resource {resource}"])
        attributes = qmgr_attributes(listing or "")
        ok = attributes.get("type") == kind
        create = f'qmgr -c "create resource {resource} type={kind}"'
        detail = f"type = {kind}" if ok else f"missing or not {kind}: {create}"
        checks.append(Check(f"PBS resource {resource}", ok, detail))
    return checks


def hook_check(listing: str | None) -> Check:
    """Whether ``qmgr -c "list hook kasched"`` shows the hook enabled for its three events."""
    what = f"PBS hook {HOOK_NAME}"
    if listing is None:
        return Check(what, False, "not found (qmgr list hook failed): see docs/pbs.md to import it")
    attributes = qmgr_attributes(listing)
    events = {e.strip() for e in attributes.get("event", "").split(",") if e.strip()}
    if attributes.get("enabled", "").lower() != "true":
        return Check(what, False, "disabled: qmgr -c \"set hook kasched enabled = true\"")
    missing = sorted(START_EVENTS - events) + ([] if events & END_EVENTS else ["jobobit"])
    if missing:
        return Check(what, False, f"events {','.join(sorted(events)) or 'none'}; missing {','.join(missing)}")
    return Check(what, True, f"enabled for {','.join(sorted(events))}, alarm {attributes.get('alarm', '?')} s")


def qmgr_attributes(listing: str) -> dict[str, str]:
    """``name = value`` lines of a qmgr ``list`` output."""
    attributes: dict[str, str] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            attributes[name.strip()] = value.strip()
    return attributes


def jobs_check(qstat: str | None) -> Check:
    """Whether kasched can list PBS's jobs from where it runs (reconcile needs it)."""
    what = "PBS jobs (qstat)"
    if not qstat:
        return Check(what, False, "qstat not found (set KASCHED_PBS_EXEC): kasched reconcile cannot read PBS's jobs")
    output = run([qstat, "-f", "-F", "json", "-t"])
    try:
        status = json.loads(output or "")
    except ValueError:
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("Jobs") or {}, dict):
        return Check(what, False, f"{qstat} -f -F json -t failed or printed no JSON: reconcile cannot read PBS's jobs")
    jobs = status.get("Jobs") or {}
    return Check(what, True, f"{qstat} lists {len(jobs)} jobs of server {status.get('pbs_server', '?')}")


def pbsnodes_check(pbsnodes: str | None) -> Check:
    """Whether kasched can give held vnodes back (pbsnodes -r) from where it runs."""
    if not pbsnodes:
        return Check("PBS pbsnodes", False, "not found (set KASCHED_PBS_EXEC): held vnodes are never put back")
    vnodes = vnodes_of(run([pbsnodes, "-av", "-F", "json"]) or "")
    if vnodes is None:
        return Check("PBS pbsnodes", False, f"{pbsnodes} -av -F json failed: held vnodes cannot be put back")
    held = sorted(v.name for v in vnodes.values() if v.offline and v.held_by_kasched)
    detail = f"{pbsnodes}: {len(vnodes)} vnodes, {len(held)} offline for kasched{': ' if held else ''}{' '.join(held)}"
    return Check("PBS pbsnodes", True, detail)
