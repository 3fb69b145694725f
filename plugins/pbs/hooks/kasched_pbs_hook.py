"""kasched's PBS server hook: grants a deploy job's nodes when it starts, revokes the grant when it ends.

Imported into PBS with qmgr (docs/pbs.md) for the events queuejob, runjob and jobobit, and run by the
PBS server inside its own Python with the ``pbs`` module. It uses only the standard library and that
module: kasched itself need not be importable by PBS's Python. It hands the job to the ``kasched job
start|end --scheduler pbs`` command, with the job's data in KASCHED_PBS_* environment variables that
kasched_pbs.plugin reads; it waits at most ``timeout`` seconds (hook configuration file) for the start.

- queuejob: a deploy job (``-l deploy=true``) is made not rerunnable, so that PBS never runs it a
  second time under the same job id (kasched refuses a second grant for one job).
- runjob: a deploy job gets its grant. If kasched fails, times out or cannot be run, the hook rejects
  the run with kasched's one-line reason: PBS leaves the job queued with "Not Running: PBS Error:
  <reason>" in its comment and tries again at a later scheduling cycle. Other jobs are accepted at once.
  Once granted, its vnodes are set OFFLINE (comment "kasched: in deploy job ID"): the job keeps them,
  and when it ends they are already out of the scheduling pool, whatever the server does first.
- jobobit (named endjob in its design, PP-912): a deploy job's vnodes are kept out of scheduling
  (OFFLINE, comment "kasched: giving back after job ID") before its grant is revoked and its nodes
  go back to the reference environment; kaschedd puts them back into service once that revert has
  ended (kasched_pbs.hold). The hook hands all of it to a background helper and accepts at once.

Why a helper: pbs_server runs a server hook inside its own single-threaded process (and the jobobit
hook before it releases the job's vnodes), so it answers no PBS command (``pbsnodes -o``) until the
hook returns, and neither could kaschedd's ``pbsnodes`` if the hook waited for ``kasched job end``.
The hook reads the vnodes' state in the server (``pbs.server().vnode(name)``: vnodes an admin already
set offline with another comment are left alone) and starts a helper, which runs in this order once
the server answers again: ``pbsnodes -o -C COMMENT``; at the end, ``kasched job end``, and when
kasched says the job had no grant (exit 3), ``pbsnodes -r -C ""`` at once. Each step is one line in
the helper's log (``end_log``).

Every outcome of the hook itself is one line in the server log (pbs.logmsg); it never lets a
traceback escape.
"""

import json
import os
import re
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
    # pbsnodes, to hold a deploy job's vnodes at its end; default: PBS_EXEC/bin/pbsnodes of pbs.conf
    "pbsnodes": None,
    "end_log": "/var/log/kasched-pbs-jobs.log",  # the helper's log: one line per step
}
NOT_FOUND = 3  # kasched's exit code when a job has no grant
DEADLINE_MARGIN = 3.0  # as kasched.deadline.HOOK_MARGIN
HOLD_MARK = "kasched:"  # as kasched.schedulers.HOLD_MARK: how kasched's vnode comments start
VNODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # as kasched_pbs.plugin.NODE_NAME
# The helper that sets a deploy job's vnodes offline, and at its end runs kasched job end, once the
# server answers again (see the module's docstring).
# Its data comes in the environment (HOLD_*) and its command line ("$@": kasched job end ...), never in
# the script's text. It starts itself again in the background, so that the hook waits for nothing.
HELPER = r"""
say() { printf '%s job %s: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$PBS_JOBID" "$*"; }
if [ "$HOLD_STEP" != run ]; then
  HOLD_STEP=run; export HOLD_STEP
  "$0" -c "$HOLD_SCRIPT" "$0" "$@" </dev/null >>"$HOLD_LOG" 2>&1 &
  exit 0
fi
if [ -n "$HOLD_NODES" ]; then
  if timeout -s KILL "$HOLD_WAIT" "$HOLD_PBSNODES" -o -C "$HOLD_COMMENT" $HOLD_NODES; then
    say "offline: $HOLD_NODES ($HOLD_COMMENT)"
  else
    say "could not set $HOLD_NODES offline (pbsnodes exit $?)"
  fi
fi
[ $# -gt 0 ] || exit 0
KASCHED_DEADLINE=$(( $(date +%s) + HOLD_TIMEOUT - HOLD_MARGIN )) timeout -s KILL "$HOLD_TIMEOUT" "$@"
code=$?
case $code in
  0) say "kasched job end: done" ;;
  "$HOLD_NO_GRANT") if [ -n "$HOLD_NODES" ] && "$HOLD_PBSNODES" -r -C "" $HOLD_NODES; then
       say "had no grant (its start was refused): back into service: $HOLD_NODES"
     else
       say "had no grant (its start was refused)"
     fi ;;
  124|137) say "ended but its grant was not revoked: kasched job end did not answer within $HOLD_TIMEOUT s" ;;
  *) say "ended but its grant was not revoked: kasched job end failed (exit $code)" ;;
esac
"""


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
    env = kasched_env(action, job, variables, config)
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


def kasched_env(action, job, variables, config):
    """The environment of ``kasched job start|end``: the job in KASCHED_PBS_* variables."""
    env = {"PATH": config["path"], "KASCHED_PBS_EVENT": action, "PBS_JOBID": str(job.id)}
    env["KASCHED_PBS_CLUSTER"] = config["cluster"] or str(pbs.server().name)
    if config["kasched_config"]:
        env["KASCHED_CONFIG"] = config["kasched_config"]
    env.update(variables)
    return env


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
    try:
        held = to_hold(vnodes(job.exec_vnode))
        if held:
            start_helper(job, held, f"{HOLD_MARK} in deploy job {job.id}", settings(), [])
    except HookFailure as failure:  # its end sets them offline too
        log(pbs.LOG_WARNING, f"job {job.id}: its vnodes stay in the scheduling pool: {failure.args[0]}")
    log(pbs.LOG_DEBUG, f"job {job.id}: {outcome}")
    event.accept()


def on_endjob(event):
    job = event.job
    if not is_deploy(job):
        event.accept()
    try:
        config = settings()
        held = to_hold(vnodes(job.exec_vnode))
        end = [config["kasched"], "job", "end", "--scheduler", "pbs"]
        log_path = start_helper(job, held, f"{HOLD_MARK} giving back after job {job.id}", config, end)
    except HookFailure as failure:
        log(pbs.LOG_ERROR, f"job {job.id} ended but its grant was not revoked: {failure.args[0]}")
        event.accept()
    what = "offline: " + " ".join(held) if held else "no vnode to set offline"
    log(pbs.LOG_DEBUG, f"job {job.id} ended: {what}; kasched job end runs once the server is free (log {log_path})")
    event.accept()


def to_hold(names):
    """The vnodes to set offline: valid names, but those an admin set offline with another comment."""
    held = []
    for name in names:
        if not VNODE_NAME.match(name):
            log(pbs.LOG_WARNING, f"vnode name {name!r} left alone: not a node name kasched knows")
            continue
        try:
            vnode = pbs.server().vnode(name)
            admins = bool(int(vnode.state or 0) & pbs.ND_OFFLINE) and not str(vnode.comment or "").startswith(HOLD_MARK)
        except Exception as error:  # the hold matters more than an admin's comment
            log(pbs.LOG_WARNING, f"cannot read vnode {name} ({error}): set offline anyway")
            admins = False
        if not admins:
            held.append(name)
    return held


def pbsnodes_path(config):
    if config["pbsnodes"]:
        return config["pbsnodes"]
    try:
        return os.path.join(pbs.get_pbs_conf()["PBS_EXEC"], "bin", "pbsnodes")
    except Exception:  # no pbs.conf entry: the one on the configured path
        return "pbsnodes"


def start_helper(job, held, comment, config, command):
    """Start the helper that sets ``held`` offline with ``comment`` and then runs ``command`` (kasched
    job end, or nothing), in the background, its own session, once the server answers. Its log."""
    env = kasched_env("end", job, end_variables(job), config)
    env.update({
        "HOLD_SCRIPT": HELPER, "HOLD_NODES": " ".join(held), "HOLD_PBSNODES": pbsnodes_path(config),
        "HOLD_COMMENT": comment[:79], "HOLD_LOG": config["end_log"], "HOLD_WAIT": "120",
        "HOLD_TIMEOUT": str(int(float(config["timeout"]))), "HOLD_MARGIN": str(int(DEADLINE_MARGIN)),
        "HOLD_NO_GRANT": str(NOT_FOUND),
    })
    try:
        starter = subprocess.Popen(["/bin/sh", "-c", HELPER, "/bin/sh", *command], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   universal_newlines=True, start_new_session=True)
        _, err = starter.communicate(timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HookFailure(f"cannot start kasched's helper: {error}") from None
    if starter.returncode != 0:
        raise HookFailure(f"cannot start kasched's helper: {err.strip() or starter.returncode}")
    return config["end_log"]


def main():
    event = pbs.event()
    try:
        if event.type == pbs.QUEUEJOB:
            on_queuejob(event)
        elif event.type == pbs.RUNJOB:
            on_runjob(event)
        else:  # the hook is configured for queuejob, runjob and jobobit (or endjob) only (docs/pbs.md)
            on_endjob(event)
    except SystemExit:  # how accept() and reject() end a hook
        raise
    except Exception as error:  # never a traceback in the server's hook run: one line, and the documented outcome
        log(pbs.LOG_ERROR, f"job {event.job.id}: unexpected {type(error).__name__}: {error}")
        if event.type == pbs.RUNJOB and is_deploy(event.job):
            event.reject(f"kasched: unexpected {type(error).__name__}: {error}")
        event.accept()


main()
