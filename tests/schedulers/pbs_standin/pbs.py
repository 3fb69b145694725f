"""STAND-IN for PBS's ``pbs`` hook module. This is not PBS.

No PBS server (OpenPBS or PBS Professional) could be installed where kasched's PBS hook was written,
so its tests run the real hook script (plugins/pbs/hooks/kasched_pbs_hook.py) with this module first on
the import path, the way pbs_server runs a hook with its own ``pbs`` module. It provides only what
the hook uses, following the documented interface (man page pbs_module(7B) of OpenPBS, "PBS Hooks
Guide"), and behaves as documented there:

- ``pbs.event()``: the event that triggered the hook; ``.type``, ``.job``, ``.accept()`` and
  ``.reject(msg)``. Both accept() and reject() end the hook by raising SystemExit ("SystemExit: raised
  when accepting or rejecting an action"); a hook that ends without either accepts.
- event types ``pbs.QUEUEJOB``, ``pbs.RUNJOB``, ``pbs.EXECJOB_BEGIN``, ``pbs.EXECJOB_END``, and the
  server-side end-of-job event ``pbs.JOBOBIT`` (OpenPBS 22.05 and later; ``endjob`` in its design
  PP-912, driven as ENDJOB here).
- vnode states ``pbs.ND_FREE``, ``pbs.ND_OFFLINE``, ``pbs.ND_DOWN``, ``pbs.ND_JOB_EXCLUSIVE`` (the bits
  of OpenPBS's INUSE_* values).
- ``pbs.logmsg(level, msg)`` with ``pbs.LOG_DEBUG``, ``pbs.LOG_WARNING``, ``pbs.LOG_ERROR``.
- ``pbs.hook_config_filename``: path of the hook's configuration file, or None.
- ``pbs.server().name``, and ``pbs.server().vnode(name)``: a vnode of the stand-in server
  (standin_server.py) with ``state`` (an int of ND_* bits, e.g. ``pbs.ND_OFFLINE``) and ``comment``, read in
  the server's own state as pbs_server's hooks read it (no PBS command).
- ``pbs.get_pbs_conf()``: the stand-in server's pbs.conf entries, PBS_EXEC (its bin/ holds the
  stand-in pbsnodes and qstat) and PBS_SERVER.
- job attributes ``id``, ``euser``, ``Job_Owner``, ``queue``, ``exec_vnode``, ``Exit_status``,
  ``Rerunable`` (an unset attribute reads as None), and ``Resource_List[name]`` (None when unset).
- ``pbs.duration`` (an int of seconds, made from ``[[hours:]minutes:]seconds`` or an int) and
  ``pbs.exec_vnode`` (its str() is the ``(vnodeA:ncpus=N:mem=M)+(vnodeB:...)`` specification).

The test driver (run_hook.py next to this file) fills in the event from a JSON description and
reports what the hook did: accepted or rejected with which message, the log lines, the job's changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUEUEJOB = 1
RUNJOB = 2
EXECJOB_BEGIN = 3
EXECJOB_END = 4
ENDJOB = 5  # stand-in value for the design-era name of the server-side end-of-job event
JOBOBIT = 6
EVENT_TYPES = {"queuejob": QUEUEJOB, "runjob": RUNJOB, "execjob_begin": EXECJOB_BEGIN, "execjob_end": EXECJOB_END}
EVENT_TYPES.update({"endjob": ENDJOB, "jobobit": JOBOBIT})
ND_FREE = 0x00
ND_OFFLINE = 0x01
ND_DOWN = 0x02
ND_JOB_EXCLUSIVE = 0x40

LOG_DEBUG = 4
LOG_WARNING = 2
LOG_ERROR = 1

hook_config_filename: str | None = None
log_lines: list[tuple[int, str]] = []
_server_name = "pbs-server"
_home: Path | None = None  # the stand-in server's directory (standin_server.py), if the hook runs in one
_event: event_object | None = None  # set by run_hook.py


class duration(int):  # PBS's name
    """A time interval in seconds: ``pbs.duration("1:30:00")`` or ``pbs.duration(5400)``."""

    def __new__(cls, value: int | str) -> duration:
        if isinstance(value, str):
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
            return super().__new__(cls, int(seconds))
        return super().__new__(cls, value)


class exec_vnode:  # PBS's name
    """The vnodes a job runs on, managed through str(): ``(n1:ncpus=1)+(n2:ncpus=1)``."""

    def __init__(self, spec: str) -> None:
        self._spec = spec

    def __str__(self) -> str:
        return self._spec

    __repr__ = __str__


class _ResourceList(dict):  # type: ignore[type-arg]
    def __getitem__(self, name: str) -> Any:
        return self.get(name)


class job:  # PBS's name
    """A PBS job; attributes that are not set read as None."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        resources = dict(attributes.pop("Resource_List", {}))
        if isinstance(resources.get("walltime"), str | int):
            resources["walltime"] = duration(resources["walltime"])
        self.Resource_List = _ResourceList(resources)
        if attributes.get("exec_vnode") is not None:
            attributes["exec_vnode"] = exec_vnode(attributes["exec_vnode"])
        self.__dict__.update(attributes)

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class event_object:
    """What ``pbs.event()`` returns."""

    def __init__(self, type_: int, job_: job) -> None:
        self.type = type_
        self.job = job_
        self.accepted: bool | None = None
        self.reject_message: str | None = None

    def accept(self) -> None:
        self.accepted = True
        raise SystemExit(0)

    def reject(self, message: str = "") -> None:
        self.accepted = False
        self.reject_message = message
        raise SystemExit(0)


class vnode:  # PBS's name
    """A vnode as a server hook reads it: ``state`` (ND_* bits) and ``comment`` (None when unset)."""

    def __init__(self, name: str, state: int, comment: str | None) -> None:
        self.name = name
        self.state = state
        self.comment = comment


class _Server:
    def __init__(self, name: str) -> None:
        self.name = name

    def vnode(self, name: str) -> vnode:
        if _home is None:
            raise RuntimeError("stand-in pbs: no stand-in server holds vnodes here")
        record = json.loads((_home / "state.json").read_text())["vnodes"][name]
        bits = (ND_OFFLINE if record["offline"] else 0) | (ND_DOWN if record["down"] else 0)
        bits |= ND_JOB_EXCLUSIVE if record["jobs"] else 0
        return vnode(name, bits, record["comment"] or None)


def event() -> event_object:
    if _event is None:
        raise RuntimeError("stand-in pbs: no event was set up (run the hook through run_hook.py)")
    return _event


def server() -> _Server:
    return _Server(_server_name)


def get_pbs_conf() -> dict[str, str]:
    if _home is None:
        return {"PBS_SERVER": _server_name}
    return {"PBS_EXEC": str(_home), "PBS_SERVER": _server_name}


def logmsg(level: int, message: str) -> None:
    log_lines.append((level, message))
