"""Stand-in slurmd: keeps the nodes of a deploy job in their job while they run a user's system.

slurmctld pings every node's slurmd and sets a node DOWN after SlurmdTimeout without an answer; a DOWN
node is then removed from its job (``--no-kill``) or the job is killed or requeued. No node state an
admin may set on an allocated node stops this in 22.05 (see docs/slurm.md). So for the time of a deploy
job, kasched answers for the node: the prolog starts one ``slurmd -N NODE`` per node on the kasched
host (the *stand-in*) and points the node's NodeAddr at it; slurmctld then talks to the stand-in for
the whole job (pings, the batch script, steps, job end), whatever the node itself runs. At job end the
epilog (which has drained the nodes first, hold.py) stops the stand-ins, gives the nodes their own
address back and sets them DOWN, still drained: they go back into service when kasched's release says
their revert has ended (hold.py), not before.

slurmctld forgets a NodeAddr set by scontrol when it restarts or reconfigures (measured: the node is
back at its slurm.conf address at once, and the job is killed SlurmdTimeout later). The prolog therefore
also starts one *keeper* per host (``python -m kasched_slurm.standin keep``) that re-points the nodes
of every running deploy job at their stand-ins every KASCHED_SLURM_KEEP_INTERVAL seconds (default 2;
keep it well under SlurmdTimeout) and exits when no deploy job is left.

Settings (environment of the hooks):
  KASCHED_SLURM_STANDIN_ADDR     the address the stand-ins answer on (unset: no stand-ins)
  KASCHED_SLURM_STANDIN_COMMAND  how to start one, {node} and {addr} replaced
                                 (default ``slurmd -D -N {node}``)
  KASCHED_SLURM_STATE_DIR        where the stand-ins' pids and the nodes' addresses are kept
  KASCHED_SLURM_STANDIN_STOP     for hooks that run as SlurmUser=slurm with stand-ins started through
                                 sudo: how to signal one, e.g. ``sudo -n /bin/kill -s {signal} {pid}``
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from kasched_slurm import hold, slurmcli
from kasched_slurm.slurmcli import SlurmCommandError

from kasched.processes import pid_alive

DEFAULT_COMMAND = "slurmd -D -N {node}"
DEFAULT_STATE_DIR = hold.DEFAULT_STATE_DIR
# Under load a slurmd takes seconds to start (200 jobs at once on 2 busy cores: the 15 s first chosen
# failed prologs); these stay well under PrologEpilogTimeout (120 s in scripts/start-slurm.sh).
READY_TIMEOUT = 45.0
STOP_TIMEOUT = 20.0
DRAIN_TIMEOUT = 15.0
KEEP_INTERVAL = 2.0
KEEP_IDLE_ROUNDS = 3  # the keeper exits after this many rounds without any deploy job


@dataclass(frozen=True)
class StandinSettings:
    addr: str
    command: str
    state_dir: Path
    stop: str = ""  # how to signal a stand-in the hooks' user may not signal, {pid} and {signal} replaced

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> StandinSettings | None:
        addr = environ.get("KASCHED_SLURM_STANDIN_ADDR", "").strip()
        if not addr:
            return None
        return cls(
            addr=addr,
            command=environ.get("KASCHED_SLURM_STANDIN_COMMAND", "").strip() or DEFAULT_COMMAND,
            state_dir=Path(environ.get("KASCHED_SLURM_STATE_DIR", "").strip() or DEFAULT_STATE_DIR),
            stop=environ.get("KASCHED_SLURM_STANDIN_STOP", "").strip(),
        )


@dataclass(frozen=True)
class Standin:
    node: str
    pid: int
    own_addr: str  # the node's NodeAddr before the job, given back at its end
    port: int


def _record_path(settings: StandinSettings, job_id: str) -> Path:
    return settings.state_dir / f"job-{job_id}.json"


def attach(settings: StandinSettings, job_id: str, names: list[str]) -> list[Standin]:
    """Start a stand-in for each node and point the nodes at them; undo everything on failure."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    known = slurmcli.nodes(names)
    missing = sorted(set(names) - set(known))
    if missing:
        raise SlurmCommandError(f"sinfo does not know node(s) {', '.join(missing)}")
    started: list[Standin] = []
    try:
        for name in names:
            node = known[name]
            own = _own_addr(settings, node)
            started.append(Standin(name, _spawn(settings, name), own, node.port))
            _save(settings, job_id, started)
        for standin in started:
            _wait_listening(settings.addr, standin)
        for name in names:  # one node per call: a NodeAddr list must match the node list one to one
            slurmcli.update_nodes([name], NodeAddr=settings.addr)
    except BaseException:
        _stop_all(settings, started)
        _restore(started)
        _record_path(settings, job_id).unlink(missing_ok=True)
        raise
    return started


def _own_addr(settings: StandinSettings, node: slurmcli.SlurmNode) -> str:
    """The node's own address: a node still pointed at a stand-in (a crash) keeps its recorded one."""
    if node.address != settings.addr:
        return node.address
    for record in settings.state_dir.glob("job-*.json"):
        for entry in json.loads(record.read_text()):
            if entry["node"] == node.name and entry["own_addr"] != settings.addr:
                return str(entry["own_addr"])
    return node.hostname


def _spawn(settings: StandinSettings, node: str) -> int:
    args = [part.format(node=node, addr=settings.addr) for part in shlex.split(settings.command)]
    log = (settings.state_dir / f"standin-{node}.log").open("ab")
    try:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
        )
    except OSError as error:
        raise SlurmCommandError(f"cannot start the stand-in of {node} ({args[0]}): {error}") from None
    finally:
        log.close()
    return process.pid


def _wait_listening(addr: str, standin: Standin) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(standin.pid):
            raise SlurmCommandError(f"the stand-in slurmd of {standin.node} exited at once (see its log)")
        try:
            with socket.create_connection((addr, standin.port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SlurmCommandError(f"the stand-in slurmd of {standin.node} did not listen on {addr}:{standin.port}")


def _save(settings: StandinSettings, job_id: str, standins: list[Standin]) -> None:
    path = _record_path(settings, job_id)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps([asdict(s) for s in standins]))
    temporary.replace(path)


def load(settings: StandinSettings, job_id: str) -> list[Standin]:
    path = _record_path(settings, job_id)
    if not path.exists():
        return []
    return [Standin(**entry) for entry in json.loads(path.read_text())]


def detach(settings: StandinSettings, job_id: str) -> list[Standin]:
    """Stop a job's stand-ins once Slurm has finished the job on them; give the nodes their own address
    back, still held (DOWN and drained), then apply a release that came meanwhile (hold.py)."""
    standins = load(settings, job_id)
    if not standins:
        return []
    record = _record_path(settings, job_id)
    releasing = record.with_suffix(".releasing")  # out of the keeper's sight, still there after a crash
    record.replace(releasing)
    os.utime(releasing)  # its age tells a live epilog from one that died (hold.STALE_SECONDS)
    _wait_not_completing([s.node for s in standins])
    _stop_all(settings, standins)
    with hold.locked(settings.state_dir):
        _hand_back(job_id, standins)
        releasing.unlink(missing_ok=True)
        back, failed = hold.take_deferred(settings.state_dir, job_id)
        problems = hold.apply(job_id, back, failed)
    if back or failed:
        print(f"job {job_id}: the release that came meanwhile applied: back {back}, kept drained {sorted(failed)}")
    for problem in problems:
        print(f"job {job_id}: release: {problem}")
    return standins


def _wait_not_completing(names: list[str]) -> None:
    """Let the stand-ins acknowledge the job's end (bounded: a node that never does is set DOWN anyway)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            states = slurmcli.nodes(names)
        except SlurmCommandError:
            return
        if not any("COMPLETING" in node.states for node in states.values()):
            return
        time.sleep(0.3)


def _hand_back(job_id: str, standins: list[Standin]) -> None:
    """At the job's end: own address back, then DOWN (ends what is left of the job there), keeping the
    drain and its reason (the epilog's hold, a failure a release wrote, or an admin's), and draining a
    node the hold missed. Not RESUME: kasched's release does, once the node's revert has ended."""
    for standin in standins:
        slurmcli.update_nodes([standin.node], NodeAddr=standin.own_addr)
    names = [s.node for s in standins]
    known = slurmcli.nodes(names)
    reasons: dict[str, list[str]] = {}
    for name in names:
        node = known.get(name)
        reasons.setdefault(node.reason if node and node.reason else hold.hold_reason(job_id), []).append(name)
    for reason, group in reasons.items():
        slurmcli.update_nodes(group, State="DOWN", Reason=reason)
    loose = [n for n in names if n in known and "DRAIN" not in known[n].states and hold.is_ours(known[n])]
    slurmcli.update_nodes(loose, State="DRAIN", Reason=hold.hold_reason(job_id))


def _restore(standins: list[Standin]) -> None:
    """When the prolog fails: own address back, then DOWN (ends what is left of the job there) and
    RESUME: the job never ran, the nodes are as they were."""
    for standin in standins:
        slurmcli.update_nodes([standin.node], NodeAddr=standin.own_addr)
    names = [s.node for s in standins]
    slurmcli.update_nodes(names, State="DOWN", Reason="kasched: the deploy job's prolog failed")
    slurmcli.update_nodes(names, State="RESUME")


def _alive(pid: int) -> bool:
    """Whether a stand-in still runs; one that was a child of this process and exited is reaped first."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return pid_alive(pid)


def _stop_all(settings: StandinSettings, standins: list[Standin]) -> None:
    for standin in standins:
        _signal(settings, standin.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and any(_alive(s.pid) for s in standins):
        time.sleep(0.1)
    for standin in standins:
        _signal(settings, standin.pid, signal.SIGKILL)


def _signal(settings: StandinSettings, pid: int, sig: signal.Signals) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        if not settings.stop:
            raise SlurmCommandError(
                f"may not signal stand-in pid {pid}: run the hooks as root or set KASCHED_SLURM_STANDIN_STOP"
            ) from None
        args = [part.format(pid=pid, signal=sig.name.removeprefix("SIG")) for part in shlex.split(settings.stop)]
        try:
            subprocess.run(args, capture_output=True, timeout=STOP_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SlurmCommandError(f"cannot signal stand-in pid {pid} with {args[0]}: {error}") from None


@contextlib.contextmanager
def _keeper_lock(settings: StandinSettings) -> Iterator[None]:
    """Held while the prolog checks for a keeper and while the keeper decides to exit: a keeper never
    leaves a deploy job recorded just before its exit without a successor."""
    with (settings.state_dir / "keeper.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_keeper(settings: StandinSettings) -> int:
    """Start the keeper unless one runs; its pid. Call after the job's record is saved."""
    pidfile = settings.state_dir / "keeper.pid"
    with _keeper_lock(settings):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            return pid
        log = (settings.state_dir / "keeper.log").open("ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "kasched_slurm.standin", "keep"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            )  # fmt: skip
        finally:
            log.close()
        pidfile.write_text(f"{process.pid}\n")
        return process.pid


def keep_round(settings: StandinSettings) -> int:
    """Re-point every node of a running deploy job at its stand-in; the number of such nodes."""
    wanted = [s.node for record in settings.state_dir.glob("job-*.json") for s in load(settings, record.stem[4:])]
    if not wanted:
        return 0
    for node in slurmcli.nodes(wanted).values():
        if node.address != settings.addr:
            slurmcli.update_nodes([node.name], NodeAddr=settings.addr)
            print(f"{time.strftime('%FT%T')} {node.name}: NodeAddr was {node.address} (slurmctld restarted?), "
                  f"set back to {settings.addr}", flush=True)  # fmt: skip
    return len(wanted)


def keep(settings: StandinSettings, interval: float) -> None:
    idle = 0
    while True:
        try:
            idle = 0 if keep_round(settings) else idle + 1
        except (SlurmCommandError, OSError, ValueError) as error:
            print(f"{time.strftime('%FT%T')} keeper: {error}", flush=True)
        if idle >= KEEP_IDLE_ROUNDS:
            with _keeper_lock(settings):
                if not any(settings.state_dir.glob("job-*.json")):
                    (settings.state_dir / "keeper.pid").unlink(missing_ok=True)
                    return
            idle = 0
        time.sleep(interval)


def main(argv: list[str]) -> int:
    settings = StandinSettings.from_environ(os.environ)
    if argv != ["keep"] or settings is None:
        print("usage: KASCHED_SLURM_STANDIN_ADDR=... python -m kasched_slurm.standin keep", file=sys.stderr)
        return 2
    keep(settings, float(os.environ.get("KASCHED_SLURM_KEEP_INTERVAL", "") or KEEP_INTERVAL))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
