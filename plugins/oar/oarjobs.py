"""OAR 2.5's jobs as a small typed API: read from OAR's REST API (``requests``), or from
``oarstat -fj ID -J`` when the API is not configured or fails.

Settings come from the environment, like the Slurm plugin's (the hook wrappers set them):
``KASCHED_OAR_API_URL`` (e.g. ``http://127.0.0.1:6680/oarapi``; unset: oarstat only),
``KASCHED_OAR_API_IDENT`` (the identity sent in ``X-Remote-Ident``, default ``oar``),
``KASCHED_OAR_TIMEOUT`` (seconds per API call or command, default 10), ``KASCHED_OAR_CLUSTER``
(kasched's cluster name for OAR's jobs, default ``oar``), ``KASCHED_OAR_OARSTAT`` (default ``oarstat``),
``KASCHED_OAR_COMMAND_PREFIX`` (words put before every OAR command, to reach OAR from where kaschedd
runs: ``ssh oar-server``, or in the lab ``nsenter --net=/run/netns/kasched-oar-host``; unset: here).
Field names were read from Debian 12's OAR 2.5.9 (../shared/LAB-NOTES.md, docs/oar.md).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kasched.errors import KaschedError
from kasched.schedulers import json_object, run_command

# Jobs that hold (or are about to hold) their nodes; Terminated and Error ones do not.
ACTIVE_STATES = frozenset(
    {"toLaunch", "Launching", "Running", "Suspended", "Resuming", "Finishing", "toError", "toAckReservation"}
)


class OarError(KaschedError):
    """OAR's API or commands failed, or answered something unreadable."""


@dataclass(frozen=True)
class OarSettings:
    api_url: str | None = None
    api_ident: str = "oar"
    timeout: float = 10.0
    cluster: str = "oar"
    oarstat: str = "oarstat"
    command_prefix: tuple[str, ...] = ()  # KASCHED_OAR_COMMAND_PREFIX, split into words

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> OarSettings:
        raw = environ.get("KASCHED_OAR_TIMEOUT", "")
        try:
            timeout = float(raw) if raw else cls.timeout
        except ValueError:
            raise OarError(f"KASCHED_OAR_TIMEOUT={raw!r} is not a number of seconds") from None
        prefix = environ.get("KASCHED_OAR_COMMAND_PREFIX") or ""
        try:
            words = tuple(shlex.split(prefix))
        except ValueError as error:
            raise OarError(f"KASCHED_OAR_COMMAND_PREFIX={prefix!r}: {error}") from None
        return cls(
            api_url=(environ.get("KASCHED_OAR_API_URL") or "").rstrip("/") or None,
            api_ident=environ.get("KASCHED_OAR_API_IDENT") or cls.api_ident,
            timeout=timeout if timeout > 0 else cls.timeout,
            cluster=environ.get("KASCHED_OAR_CLUSTER") or cls.cluster,
            oarstat=environ.get("KASCHED_OAR_OARSTAT") or cls.oarstat,
            command_prefix=words,
        )

    def command(self, args: Sequence[str]) -> list[str]:
        """An OAR command line as run from here: behind the prefix, if any. ``ssh`` runs its command
        through the remote user's shell: after an ``ssh`` prefix the command is one shell-quoted word."""
        if not self.command_prefix:
            return list(args)
        if self.command_prefix[0].rsplit("/", 1)[-1] == "ssh":
            return [*self.command_prefix, shlex.join(args)]
        return [*self.command_prefix, *args]


@dataclass(frozen=True)
class OarJob:
    job_id: str
    user: str
    state: str
    nodes: tuple[str, ...]
    walltime: float | None  # seconds
    types: tuple[str, ...]
    name: str = ""
    exit_code: int | None = None
    events: tuple[str, ...] = ()  # event types: FRAG_JOB_REQUEST, WALLTIME, SWITCH_INTO_ERROR_STATE...
    source: str = field(default="", compare=False)  # "api" or "oarstat"

    @property
    def is_deploy(self) -> bool:
        """``oarsub -t deploy`` (or ``-t deploy=standby``)."""
        return any(t == "deploy" or t.startswith("deploy=") for t in self.types)

    @property
    def environment(self) -> str | None:
        """The environment the user named with ``oarsub -t env=NAME``, if any."""
        return next((t.partition("=")[2] for t in self.types if t.startswith("env=") and len(t) > 4), None)

    @property
    def end_reason(self) -> str:
        """How the job ended, as far as OAR tells while its epilogue runs."""
        code = f"job ended (exit {self.exit_code})" if self.exit_code is not None else "job ended"
        if "WALLTIME" in self.events:
            return f"walltime ({code})"
        if "FRAG_JOB_REQUEST" in self.events:
            return f"cancelled, oardel ({code})"
        if self.state == "Error" or "SWITCH_INTO_ERROR_STATE" in self.events:
            return f"failed, OAR state Error ({code})"
        return code

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "user": self.user, "state": self.state, "nodes": list(self.nodes),
            "walltime": self.walltime, "types": list(self.types), "name": self.name,
            "exit_code": self.exit_code, "events": list(self.events), "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OarJob:
        return _job(data, nodes=data.get("nodes") or [], source=str(data.get("source") or ""))


def read_job(job_id: str, settings: OarSettings) -> OarJob:
    """The job, from the API if configured, else (or if the API fails) from oarstat; OarError if neither."""
    if not job_id.isdigit():
        raise OarError(f"OAR job ids are numbers, not {job_id!r}")
    api_error = ""
    if settings.api_url:
        try:
            return _api_job(job_id, settings)
        except OarError as error:
            api_error = f"{error}; "
    try:
        return _oarstat_job(job_id, settings)
    except OarError as error:
        raise OarError(f"{api_error}{error}") from None


def running_job_ids(settings: OarSettings) -> set[str]:
    """Ids of the jobs that hold nodes now (ACTIVE_STATES), from the API or ``oarstat -J``."""
    if settings.api_url:
        try:
            data = _get(settings, "/jobs.json?state=" + ",".join(sorted(ACTIVE_STATES)))
            return {str(item["id"]) for item in data.get("items", []) if item.get("state") in ACTIVE_STATES}
        except (OarError, KeyError, TypeError):
            pass
    out = run([settings.oarstat, "-J"], settings)
    jobs = _loads(out, "oarstat -J") if out.strip() else {}
    return {str(key) for key, job in jobs.items() if isinstance(job, dict) and job.get("state") in ACTIVE_STATES}


def api_reachable(settings: OarSettings) -> str:
    """What the API says about itself (``/oarapi/version.json``); OarError if it does not answer."""
    data = _get(settings, "/version.json")
    return f"OAR {data.get('oar_version') or data.get('oar') or '?'}, API {data.get('api_version') or '?'}"


def _api_job(job_id: str, settings: OarSettings) -> OarJob:
    data = _get(settings, f"/jobs/{job_id}.json")
    nodes = _get(settings, f"/jobs/{job_id}/nodes.json").get("items", [])
    names = sorted({str(n.get("network_address")) for n in nodes if isinstance(n, dict) and n.get("network_address")})
    return _job(data, nodes=names, source="api")


def _oarstat_job(job_id: str, settings: OarSettings) -> OarJob:
    out = run([settings.oarstat, "-fj", job_id, "-J"], settings)
    data = _loads(out, f"oarstat -fj {job_id} -J")
    entry = data.get(job_id) or data.get(str(int(job_id)))
    if not isinstance(entry, dict):
        raise OarError(f"oarstat knows no job {job_id}")
    return _job(entry, nodes=entry.get("assigned_network_address") or [], source="oarstat")


def _job(data: Mapping[str, Any], nodes: Any, source: str) -> OarJob:
    walltime = data.get("walltime")
    code = data.get("exit_code")
    events = data.get("events") or []
    return OarJob(
        job_id=str(data.get("id") or data.get("Job_Id") or data.get("job_id") or ""),
        user=str(data.get("owner") or data.get("job_user") or data.get("user") or ""),
        state=str(data.get("state") or ""),
        nodes=tuple(sorted({str(n) for n in nodes})),
        walltime=float(walltime) if isinstance(walltime, int | float) and walltime > 0 else None,
        types=tuple(str(t) for t in data.get("types") or []),
        name=str(data.get("name") or ""),
        exit_code=code if isinstance(code, int) else None,
        events=tuple(str(e.get("type")) if isinstance(e, dict) else str(e) for e in events),
        source=source,
    )


def _get(settings: OarSettings, path: str) -> dict[str, Any]:
    import requests  # here: every hook loads this plugin, and requests alone costs 0.1 s to import

    url = f"{settings.api_url}{path}"
    try:
        response = requests.get(url, headers={"X-Remote-Ident": settings.api_ident}, timeout=settings.timeout)
    except requests.RequestException as error:
        raise OarError(f"OAR API {url}: {type(error).__name__}") from None
    if response.status_code != 200:
        raise OarError(f"OAR API {url}: HTTP {response.status_code}")
    return _loads(response.text, f"OAR API {url}")


def _loads(text: str, what: str) -> dict[str, Any]:
    return json_object(text, what, OarError)


def run(args: list[str], settings: OarSettings) -> str:
    """Run an OAR command (behind the settings' prefix); its stdout, or OarError naming the command
    and its complaint."""
    return run_command(settings.command(args), settings.timeout, OarError, "oar-user", cwd="/")
