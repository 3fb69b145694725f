"""What ``kasched doctor`` checks of Slurm: which client kasched uses (pyslurm only where its version
matches the installed Slurm; none matches Debian 12's 22.05), and whether slurmctld runs kasched's
hooks with the settings deploy jobs need."""

from __future__ import annotations

from kasched_slurm import slurmcli

from kasched.errors import KaschedError
from kasched.schedulers import Check


def checks() -> list[Check]:
    try:
        installed = slurmcli.version()
    except KaschedError as error:
        idle = "not found" in str(error) or "configuration source" in str(error)
        why = "no Slurm on this host: the plugin is idle" if idle else f"cannot run Slurm's commands: {error}"
        return [Check("slurm", idle, why)]
    found = [_client(installed)]
    try:
        settings = slurmcli.config()
    except KaschedError as error:
        return [*found, Check("slurmctld", False, f"not reachable: {error}")]
    found.append(Check("slurmctld", True, f"Slurm {installed}, cluster {settings.get('ClusterName', '?')}"))
    for key, wanted in (("PrologSlurmctld", "kasched-prolog"), ("EpilogSlurmctld", "kasched-epilog")):
        value = settings.get(key, "(null)")
        found.append(Check(key, wanted in value or "kasched" in value, f"{value} (want {wanted} or a wrapper)"))
    submit = settings.get("JobSubmitPlugins", "(null)")
    found.append(Check("JobSubmitPlugins", "lua" in submit, f"{submit} (lua: no requeue, whole nodes)"))
    back = settings.get("ReturnToService", "?")
    found.append(Check("ReturnToService", back == "2", f"{back} (2: a reverted node comes back on its own)"))
    return found


def _client(installed: str) -> Check:
    try:
        import pyslurm  # type: ignore[import-not-found]
    except ImportError:
        return Check("client", True, f"no pyslurm for Slurm {installed}: squeue/sinfo --json and scontrol")
    theirs = str(getattr(pyslurm, "__version__", "?"))
    if theirs.split(".")[:2] == installed.split(".")[:2]:
        return Check("client", True, f"pyslurm {theirs} matches Slurm {installed}")
    return Check("client", True, f"pyslurm {theirs} does not match Slurm {installed}: using squeue/sinfo --json")
