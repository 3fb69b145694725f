"""kasched's PBS server hook: grants a deploy job's nodes when it starts, revokes the grant when it ends.

Imported into PBS with qmgr (docs/pbs.md) for the events queuejob, runjob and endjob, and run by the
PBS server inside its own Python with the ``pbs`` module. It uses only the standard library and that
module: kasched itself need not be importable by PBS's Python. It hands the job to the ``kasched job
start|end --scheduler pbs`` command, with the job's data in KASCHED_PBS_* environment variables that
kasched_pbs.plugin reads, and waits at most ``timeout`` seconds (hook configuration file) for it.

- queuejob: a deploy job (``-l deploy=true``) is made not rerunnable, so that PBS never runs it a
  second time under the same job id (kasched refuses a second grant for one job).
- runjob: a deploy job gets its grant. If kasched fails, times out or cannot be run, the hook rejects
  the run with kasched's one-line reason: PBS leaves the job queued with "Not Running: PBS Error:
  <reason>" in its comment and tries again at a later scheduling cycle. Other jobs are accepted at once.
- endjob: the grant of a deploy job is revoked (its nodes go back to the reference environment). The
  hook always accepts: the job is over whatever happens, and a failure is logged for the admin
  (``kasched reconcile`` revokes what is left).

Every outcome is one line in the server log (pbs.logmsg); the hook never lets a traceback escape.
"""

import json
import os
import signal
import subprocess
import time

import pbs

DEFAULTS = {
    "kasched": "kasched",  # the command; an absolute path is best
    "kasched_config": None,  # KASCHED_CONFIG for the command
    "cluster": None,  # the cluster name kasched records; default: the PBS server's name
    "timeout": 20,  # seconds; keep it below the hook's alarm (qmgr: set hook kasched alarm = 30)
    # kasched gets a deadline DEADLINE_MARGIN seconds before the timeout (KASCHED_DEADLINE, a Unix time):
    # kaschedd answers and stores the grant before it, or stores nothing.
    "path": "/usr/local/bin:/usr/bin:/bin",
}
NOT_FOUND = 3  # kasched's exit code when a job has no grant
DEADLINE_MARGIN = 3.0  # as kasched.deadline.HOOK_MARGIN


class HookFailure(Exception):
    """Why kasched could not record the job: one line for the server log and the job's comment."""


def log(level, message):
    pbs.logmsg(level, "kasched: " + message)


def settings():
    """The hook configuration file (JSON, imported with qmgr ... import hook kasched application/x-config)."""
    values = dict(DEFAULTS)
    path = pbs.hook_config_filename
    if path:
        try:
            with open(path) as config:
                values.update(json.load(config))
        except (OSError, ValueError) as error:
            raise HookFailure(f"cannot read the hook configuration {path}: {error}") from None
    return values


def resource(job, name):
    value = job.Resource_List[name]
    return None if value is None else value


def is_deploy(job):
    value = resource(job, "deploy")
    return value is True or str(value).lower() in ("true", "1", "yes", "y")


def vnodes(exec_vnode):
    """Vnode names of an exec_vnode such as ``(n1:ncpus=2)+(n2:ncpus=1+n3:mem=1gb)``, in order, once each."""
    names = []
    for chunk in str(exec_vnode or "").split("+"):
        name = chunk.strip().strip("()").split(":", 1)[0].strip()
        if name and name not in names:
            names.append(name)
    return names


def job_user(job):
    if job.euser:
        return str(job.euser)
    return str(job.Job_Owner or "").split("@", 1)[0]


def start_variables(job):
    walltime = resource(job, "walltime")
    environment = resource(job, "kasched_env")
    return {
        "KASCHED_PBS_USER": job_user(job),
        "KASCHED_PBS_NODES": ",".join(vnodes(job.exec_vnode)),
        "KASCHED_PBS_WALLTIME": "" if walltime is None else str(int(walltime)),
        "KASCHED_PBS_ENV": "" if environment is None else str(environment),
        "KASCHED_PBS_QUEUE": str(job.queue or ""),
        "KASCHED_PBS_DEPLOY": "true",
    }


def end_variables(job):
    status = job.Exit_status
    return {"KASCHED_PBS_EXIT_STATUS": "" if status is None else str(int(status))}


def run_kasched(action, job, variables, config):
    """Run ``kasched job start|end`` for the job; its output, or HookFailure with one line."""
    env = {"PATH": config["path"], "KASCHED_PBS_EVENT": action, "PBS_JOBID": str(job.id)}
    env["KASCHED_PBS_CLUSTER"] = config["cluster"] or str(pbs.server().name)
    if config["kasched_config"]:
        env["KASCHED_CONFIG"] = config["kasched_config"]
    env.update(variables)
    timeout = float(config["timeout"])
    env["KASCHED_DEADLINE"] = "%.3f" % (time.time() + max(1.0, timeout - DEADLINE_MARGIN))
    command = [config["kasched"], "job", action, "--scheduler", "pbs"]
    out, err, code = run_bounded(command, env, timeout)
    if code is None:
        raise HookFailure("kasched job {} did not answer within {} s".format(action, config["timeout"]))
    lines = [line for line in (out + err).splitlines() if line.strip()]
    if code != 0:
        raise HookFailure(f"kasched job {action} failed (exit {code}): {error_line(lines)}", code)
    return lines[-1] if lines else "done"


def error_line(lines):
    """kasched's own error line (``kasched: error: ...``) without its prefix, else its last line."""
    for line in lines:
        if line.startswith("kasched: "):
            line = line[len("kasched: "):]
            return line[len("error: "):] if line.startswith("error: ") else line
    return lines[-1] if lines else "no output"


def run_bounded(command, env, timeout):
    """(stdout, stderr, exit code) of the command, exit code None if it ran out of time: then it and
    everything it started are killed (its own session), so that nothing holds the hook up."""
    try:
        # PIPE and universal_newlines: PBS's Python may be 3.6 (no capture_output, no text=)
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, start_new_session=True,
        )
    except OSError as error:
        raise HookFailure(f"cannot run {command[0]}: {error.strerror or error}") from None
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "", "", None
    return out, err, process.returncode


def on_queuejob(event):
    job = event.job
    if is_deploy(job):
        job.Rerunable = False
    event.accept()


def on_runjob(event):
    job = event.job
    if not is_deploy(job):
        event.accept()
    try:
        outcome = run_kasched("start", job, start_variables(job), settings())
    except HookFailure as failure:
        log(pbs.LOG_ERROR, f"job {job.id} not run: {failure.args[0]}")
        event.reject("kasched: " + failure.args[0])
    log(pbs.LOG_DEBUG, f"job {job.id}: {outcome}")
    event.accept()


def on_endjob(event):
    job = event.job
    if not is_deploy(job):
        event.accept()
    try:
        outcome = run_kasched("end", job, end_variables(job), settings())
    except HookFailure as failure:
        if len(failure.args) > 1 and failure.args[1] == NOT_FOUND:
            outcome = "had no grant (its start was refused)"
        else:
            log(pbs.LOG_ERROR, f"job {job.id} ended but its grant was not revoked: {failure.args[0]}")
            event.accept()
    log(pbs.LOG_DEBUG, f"job {job.id}: {outcome}")
    event.accept()


def main():
    event = pbs.event()
    try:
        if event.type == pbs.QUEUEJOB:
            on_queuejob(event)
        elif event.type == pbs.RUNJOB:
            on_runjob(event)
        else:  # the hook is configured for queuejob, runjob and endjob only (docs/pbs.md)
            on_endjob(event)
    except SystemExit:  # how accept() and reject() end a hook
        raise
    except Exception as error:  # never a traceback in the server's hook run: one line, and the documented outcome
        log(pbs.LOG_ERROR, f"job {event.job.id}: unexpected {type(error).__name__}: {error}")
        if event.type == pbs.RUNJOB and is_deploy(event.job):
            event.reject(f"kasched: unexpected {type(error).__name__}: {error}")
        event.accept()


main()
