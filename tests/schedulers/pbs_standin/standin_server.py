"""STAND-IN for a PBS server and its ``pbsnodes`` and ``qstat``. This is not PBS.

No PBS server could be installed where kasched's PBS hook was written. This stand-in keeps a server's
vnodes and running jobs in a JSON file (``state.json`` in its directory, its "home") and behaves as
documented PBS does, for what kasched's hook and adapter use:

- **One request at a time.** pbs_server is single-threaded and runs a server hook inside its own
  process: while a hook runs, no PBS command is answered. Here every operation (a job's run or end,
  each ``pbsnodes`` or ``qstat``) holds ``server.lock`` (flock) from start to end.
- **Scheduling rule** (:meth:`StandinServer.run`, the scheduler asking to run a job on its vnodes): a
  vnode that is OFFLINE or DOWN, or that runs a job, is never given to a job ("removed from the
  scheduling pool", pbsnodes(8B)). Else the runjob hook runs; if it rejects, the job stays queued.
- **A job's end** (:meth:`StandinServer.end`): the jobobit hook runs first, then the job's vnodes are
  released, in that order (OpenPBS's end_job(): process_hooks, then rel_resc).
- ``bin/pbsnodes`` (pbsnodes(8B)): ``-o``/``-r`` [``-C COMMENT``] HOST... (OFFLINE set or cleared; an
  empty comment unsets it; a comment keeps at most 79 characters; Manager privilege, i.e. root here),
  ``-C COMMENT`` HOST..., ``-l`` (vnodes DOWN or OFFLINE: name, state, comment), ``-a[v] -F json``
  (``{"timestamp", "pbs_version", "pbs_server", "nodes": {NAME: {"state", "comment", "jobs", ...}}}``,
  attributes at their default left out, as pbsnodes prints only the others), ``-v VNODE...`` (text).
- ``bin/qstat -f -F json -t``: the running jobs, ``{"pbs_server", "Jobs": {ID: {"job_state": "R"...}}}``.

Hooks run through run_hook.py (the stand-in ``pbs`` module), in a bare environment, as root.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VERSION = "23.06.06 (stand-in)"
COMMENT_LIMIT = 79


class StandinServer:
    def __init__(self, home: Path) -> None:
        self.home = home

    @classmethod
    def create(cls, home: Path, vnodes: list[str], hook: Path, hook_config: Path, name: str = "pbs-server") -> StandinServer:
        """A stand-in server in ``home`` with idle vnodes and kasched's hook (imported "with qmgr")."""
        (home / "bin").mkdir(parents=True, exist_ok=True)
        state = {"server": name, "hook": str(hook), "hook_config": str(hook_config), "jobs": {},
                 "vnodes": {v: {"offline": False, "down": False, "comment": "", "jobs": []} for v in vnodes}}
        (home / "state.json").write_text(json.dumps(state, indent=1))
        for command in ("pbsnodes", "qstat"):
            wrapper = home / "bin" / command
            wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "standin_server.py"} {home} {command} "$@"\n')
            wrapper.chmod(0o755)
        home.chmod(0o755)
        return cls(home)

    @contextmanager
    def busy(self) -> Iterator[dict[str, Any]]:
        """The server's state, while the server does this one thing (and answers nothing else)."""
        with open(self.home / "server.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads((self.home / "state.json").read_text())
            before = json.dumps(state)
            yield state
            if json.dumps(state) != before:
                temporary = self.home / "state.json.new"
                temporary.write_text(json.dumps(state, indent=1))
                temporary.replace(self.home / "state.json")

    def state(self) -> dict[str, Any]:
        with self.busy() as state:
            return state

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """The scheduler runs ``job`` on the vnodes of its exec_vnode, if the rule allows: the outcome,
        ``{"ran": bool, "why": ..., "hook": run_hook.py's report}``."""
        with self.busy() as state:
            names = vnode_names(job["exec_vnode"])
            for name in names:
                vnode = state["vnodes"].get(name)
                if vnode is None or vnode["offline"] or vnode["down"] or vnode["jobs"]:
                    return {"ran": False, "why": f"{name} is {'unknown' if vnode is None else states(vnode)}"}
            report = self._hook(state, "runjob", job)
            if not report["accepted"]:
                return {"ran": False, "why": f"runjob rejected: {report['reject_message']}", "hook": report}
            for name in names:
                state["vnodes"][name]["jobs"].append(job["id"])
            state["jobs"][job["id"]] = job
            return {"ran": True, "why": "", "hook": report}

    def end(self, job_id: str, exit_status: int = 0) -> dict[str, Any]:
        """The job ends: the jobobit hook runs, then its vnodes are released. The hook's report."""
        with self.busy() as state:
            job = {**state["jobs"][job_id], "Exit_status": exit_status}
            started = time.monotonic()
            report = self._hook(state, "jobobit", job)
            report["seconds"] = time.monotonic() - started
            for vnode in state["vnodes"].values():
                vnode["jobs"] = [j for j in vnode["jobs"] if j != job_id]
            del state["jobs"][job_id]
            return report

    def _hook(self, state: dict[str, Any], event: str, job: dict[str, Any]) -> dict[str, Any]:
        (self.home / "state.json").write_text(json.dumps(state, indent=1))  # what the hook reads
        description = self.home / f"event-{event}.json"
        description.write_text(json.dumps({"type": event, "job": job, "server": state["server"],
                                           "hook_config": state["hook_config"], "home": str(self.home)}))
        done = subprocess.run([sys.executable, str(HERE / "run_hook.py"), str(description), state["hook"]],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
                              timeout=120)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"run_hook.py failed: {done.stderr}")
        report: dict[str, Any] = json.loads(done.stdout)
        return report


def vnode_names(exec_vnode: str) -> list[str]:
    return [chunk.strip("()").split(":", 1)[0] for chunk in exec_vnode.split("+") if chunk.strip("()")]


def states(vnode: dict[str, Any]) -> str:
    found = [name for name, on in (("offline", vnode["offline"]), ("down", vnode["down"])) if on]
    if vnode["jobs"]:
        found.append("job-exclusive")
    return ",".join(found) or "free"


def pbsnodes(server: StandinServer, args: list[str]) -> int:
    with server.busy() as state:
        if not args:
            print("usage: pbsnodes [-{o|r}][-C comment] host ...", file=sys.stderr)
            return 1
        if args[0] == "-l":
            for name, vnode in sorted(state["vnodes"].items()):
                if vnode["offline"] or vnode["down"]:
                    print(f"{name:<20} {states(vnode)} {vnode['comment']}".rstrip())
            return 0
        if args[0] in ("-a", "-av") and args[1:] == ["-F", "json"]:
            print(json.dumps(_json(state), indent=4))
            return 0
        if args[0] == "-v":
            for name in args[1:]:
                print(name + "".join(f"\n     {key} = {value}" for key, value in _attributes(state, name).items()))
                print()
            return 0
        return _mark(state, args)


def _mark(state: dict[str, Any], args: list[str]) -> int:
    operation, comment, hosts = None, None, list(args)
    while hosts and hosts[0] in ("-o", "-r", "-C"):
        option = hosts.pop(0)
        if option == "-C":
            if not hosts:
                return 1
            comment = hosts.pop(0)
        else:
            operation = option
    if not hosts or (operation is None and comment is None):
        print("usage: pbsnodes [-{o|r}][-C comment] host ...", file=sys.stderr)
        return 1
    code = 0
    for host in hosts:
        vnode = state["vnodes"].get(host)
        if os.geteuid() != 0 or vnode is None:
            print(f"Error marking node {host} - {'Unknown node' if vnode is None else 'Unauthorized Request'}",
                  file=sys.stderr)  # fmt: skip
            code = 1
            continue
        if operation:
            vnode["offline"] = operation == "-o"
        if comment is not None:
            vnode["comment"] = comment[:COMMENT_LIMIT]
    return code


def _attributes(state: dict[str, Any], name: str) -> dict[str, Any]:
    vnode = state["vnodes"][name]
    attributes: dict[str, Any] = {"Mom": name, "ntype": "PBS", "state": states(vnode), "pcpus": 1}
    if vnode["jobs"]:
        attributes["jobs"] = vnode["jobs"]
    attributes["resources_available"] = {"host": name, "ncpus": 1, "vnode": name}
    if vnode["comment"]:
        attributes["comment"] = vnode["comment"]
    return attributes


def _json(state: dict[str, Any]) -> dict[str, Any]:
    nodes = {name: _attributes(state, name) for name in sorted(state["vnodes"])}
    return {"timestamp": int(time.time()), "pbs_version": VERSION, "pbs_server": state["server"], "nodes": nodes}


def qstat(server: StandinServer, args: list[str]) -> int:
    if args != ["-f", "-F", "json", "-t"]:
        print("qstat stand-in: only -f -F json -t", file=sys.stderr)
        return 2
    with server.busy() as state:
        jobs = {job_id: {**job, "job_state": "R"} for job_id, job in state["jobs"].items()}
        print(json.dumps({"timestamp": int(time.time()), "pbs_version": VERSION, "pbs_server": state["server"],
                          "Jobs": jobs}, indent=4))  # fmt: skip
    return 0


if __name__ == "__main__":
    home, command, *rest = sys.argv[1:]
    sys.exit({"pbsnodes": pbsnodes, "qstat": qstat}[command](StandinServer(Path(home)), rest))
