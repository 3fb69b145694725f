"""kasched's PBS server hook (plugins/pbs/hooks/kasched_pbs_hook.py), run as pbs_server runs a hook but
with a STAND-IN of PBS's ``pbs`` module (pbs_standin/pbs.py) and a stand-in server with its pbsnodes
(pbs_standin/standin_server.py): no PBS server could be installed here. Each test runs the real hook script
in its own process against a real kasched site (SQLite in a temporary directory) through the real
``kasched`` command, and checks the grant and what PBS would do (accept, or reject with the message
the job's comment would show), and that the server log gets one clear line and never a traceback.
Also: the adapter's reading of ``qstat -f -F json`` output, from a hand-written sample of its
documented format (pbs_samples/, not recorded from a real PBS), and its release of held vnodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kasched_pbs import pbscli
from kasched_pbs.plugin import PbsAdapter, end_reason

from tests.conftest import EXAMPLES, ROOT, write
from tests.test_cli import unix_user

sys.path.insert(0, str(Path(__file__).parent / "pbs_standin"))
from standin_server import StandinServer  # the stand-in, not PBS

HOOK = ROOT / "plugins/pbs/hooks/kasched_pbs_hook.py"
STANDIN = Path(__file__).parent / "pbs_standin"
SAMPLE = Path(__file__).parent / "pbs_samples/qstat-f-F-json.handwritten-sample.json"
KASCHED = Path(sys.executable).parent / "kasched"
SYSTEM_PYTHON = "/usr/bin/python3"


class Site:
    """A kasched site, the hook's configuration file, and the way to run the hook as PBS would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = write(  # kasched's own release finds the stand-in's pbsnodes through scheduler_settings
            directory / "kasched.yaml",
            f"site: t\nstate_dir: {directory / 'state'}\nadmin_group: kasched-test-admins\nreboot_timeout: 5\n"
            f"scheduler_settings: {{KASCHED_PBS_EXEC: {directory / 'pbs'}}}\n",
        )
        self.hook_config = directory / "kasched_pbs_hook.json"
        self.end_log = directory / "pbs-jobs.log"
        self.configure()
        nodes = [f"node-{n}" for n in range(1, 9)]
        self.server = StandinServer.create(directory / "pbs", nodes, HOOK, self.hook_config)

    def configure(self, **changes: Any) -> None:
        values = {
            "kasched": str(KASCHED),
            "kasched_config": str(self.config),
            "timeout": 30,
            "path": f"{KASCHED.parent}:/usr/bin:/bin",
            "end_log": str(self.end_log),
            **changes,
        }
        self.hook_config.write_text(json.dumps(values))
        self.hook_config.chmod(0o644)

    def kasched(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KASCHED_CONFIG": str(self.config)}
        return subprocess.run([str(KASCHED), *args], capture_output=True, text=True, env=env, timeout=60)

    def run_hook(self, event: str, job: dict[str, Any], as_user: str | None = None) -> dict[str, Any]:
        description = self.directory / f"event-{event}.json"
        description.write_text(json.dumps({"type": event, "job": job, "server": "pbs-server",
                                           "hook_config": str(self.hook_config), "home": str(self.server.home)}))
        description.chmod(0o644)
        command = [sys.executable, str(STANDIN / "run_hook.py"), str(description), str(HOOK)]
        if as_user:
            entry = unix_user(as_user)
            command[0] = SYSTEM_PYTHON  # this venv's Python may live where other users cannot reach it
            command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}  # pbs_server gives its hooks a bare environment
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        assert result["unhandled"] is None, result["unhandled"]
        assert all("Traceback" not in line for _, line in result["log"]), result["log"]
        return result

    def ended(self, job_id: str, timeout: float = 60) -> str:
        """The helper's log line saying how ``kasched job end`` of the job went, once it has run."""
        outcomes = ("kasched job end: done", "had no grant", "grant was not revoked")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.end_log.read_text() if self.end_log.exists() else ""
            for line in text.splitlines():
                if f"job {job_id}: " in line and any(outcome in line for outcome in outcomes):
                    return line
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}'s end never ran: {text}")

    def vnode(self, name: str) -> dict[str, Any]:
        vnode: dict[str, Any] = self.server.state()["vnodes"][name]
        return vnode

    def grants(self) -> list[dict[str, Any]]:
        done = self.kasched("rights", "--all", "--json")
        assert done.returncode == 0, done.stderr
        return [g for g in json.loads(done.stdout) if g["scheduler"] == "pbs"]


@pytest.fixture
def site() -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="kasched-pbs-"))
    base.chmod(0o755)
    directory = base / "site"
    directory.mkdir()
    directory.chmod(0o777)
    if not KASCHED.exists():
        pytest.fail("the kasched command is not installed in this Python's environment (run scripts/setup.sh)")
    made = Site(directory)
    imported = made.kasched("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    assert imported.returncode == 0, imported.stderr
    yield made
    shutil.rmtree(base, ignore_errors=True)


def deploy_job(job_id: str = "41.pbs-server", **changes: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": job_id,
        "euser": "alice",
        "Job_Owner": "alice@login1",
        "queue": "workq",
        "exec_vnode": "(node-1:ncpus=8:mem=4gb)+(node-2:ncpus=8:mem=4gb)",
        "Resource_List": {"deploy": True, "kasched_env": "debian12", "walltime": "1:30:00", "select": "2:ncpus=8"},
    }
    job.update(changes)
    return job


def log_text(result: dict[str, Any]) -> str:
    return "\n".join(line for _, line in result["log"])


def test_deploy_job_is_granted_at_run_and_revoked_at_end(site: Site) -> None:
    started = site.run_hook("runjob", deploy_job())
    assert started["accepted"], started
    assert "job 41.pbs-server: grant" in log_text(started) and "alice may deploy node-[1-2]" in log_text(started)
    [grant] = site.grants()
    assert grant["job_id"] == "41.pbs-server" and grant["user"] == "alice" and grant["active"]
    assert sorted(grant["nodes"]) == ["node-1", "node-2"]
    assert grant["environment_request"] == "debian12"
    from datetime import datetime

    lasts = datetime.fromisoformat(grant["expires_at"]) - datetime.fromisoformat(grant["created_at"])
    assert abs(lasts.total_seconds() - 5400) < 120, lasts
    assert site.kasched("rights", "check", "-u", "alice", "-m", "node-[1-2]").returncode == 0

    ended = site.run_hook("jobobit", deploy_job(Exit_status=271))
    assert ended["accepted"], ended
    assert "job 41.pbs-server ended: offline: node-1 node-2; kasched job end runs once" in log_text(ended)
    assert "kasched job end: done" in site.ended("41.pbs-server")
    [grant] = site.grants()
    assert not grant["active"] and grant["revoked_at"]
    assert "killed by signal 15" in json.dumps(grant), grant
    assert site.kasched("rights", "check", "-u", "alice", "-m", "node-1").returncode == 5


def test_other_jobs_are_accepted_without_kasched(site: Site) -> None:
    site.configure(kasched="/nonexistent/kasched")  # would fail if the hook ran it
    job = deploy_job("50.pbs-server", Resource_List={"walltime": "00:10:00", "select": "1:ncpus=1"})
    for event in ("queuejob", "runjob", "endjob"):
        result = site.run_hook(event, job)
        assert result["accepted"] and result["reject_message"] is None, (event, result)
        assert result["log"] == [], (event, result)
    assert site.grants() == []
    false_deploy = deploy_job("51.pbs-server", Resource_List={"deploy": False})
    assert site.run_hook("runjob", false_deploy)["accepted"]


def test_queuejob_makes_deploy_jobs_not_rerunnable(site: Site) -> None:
    result = site.run_hook("queuejob", deploy_job(Rerunable=True))
    assert result["accepted"] and result["job"]["Rerunable"] is False
    other = site.run_hook("queuejob", deploy_job(Rerunable=True, Resource_List={}))
    assert other["job"]["Rerunable"] is True


def test_unknown_node_rejects_the_run_with_a_reason(site: Site) -> None:
    result = site.run_hook("runjob", deploy_job(exec_vnode="(node-1:ncpus=1)+(gpu-9:ncpus=1)"))
    assert not result["accepted"]
    message = result["reject_message"]
    assert message.startswith("kasched: kasched job start failed (exit ") and "gpu-9" in message, message
    assert "\n" not in message
    assert "job 41.pbs-server not run: " in log_text(result)
    assert site.grants() == []


def test_unreachable_database_rejects_the_run(site: Site) -> None:
    unreachable = write(site.directory / "pg.yaml", "database: postgresql+psycopg://nobody:x@127.0.0.1:1/none\n")
    unreachable.chmod(0o644)
    site.configure(kasched_config=str(unreachable))
    result = site.run_hook("runjob", deploy_job())
    assert not result["accepted"]
    message = result["reject_message"]
    assert message.startswith("kasched: kasched job start failed (exit 7): "), message
    assert "127.0.0.1:1" in message and "\n" not in message
    ended = site.run_hook("jobobit", deploy_job())
    assert ended["accepted"]  # the job is over whatever happens; the admin reads the helper's log
    assert "job 41.pbs-server: ended but its grant was not revoked: kasched job end failed (exit 7)" in site.ended(
        "41.pbs-server")
    assert site.vnode("node-1")["offline"], "a job whose end failed keeps its nodes out"


def test_corrupt_database_rejects_the_run_with_one_line(site: Site) -> None:
    database = site.directory / "state" / "kasched.db"
    for extra in ("-wal", "-shm"):
        Path(f"{database}{extra}").unlink(missing_ok=True)
    database.write_bytes(b"this is not an SQLite database" * 100)
    result = site.run_hook("runjob", deploy_job())
    assert not result["accepted"]
    message = result["reject_message"]
    assert message.startswith("kasched: kasched job start failed (exit "), message
    assert "file is not a database" in message and "\n" not in message


def test_missing_command_or_configuration_rejects_the_run(site: Site) -> None:
    site.configure(kasched=str(site.directory / "no-such-kasched"))
    result = site.run_hook("runjob", deploy_job())
    assert not result["accepted"]
    assert result["reject_message"] == f"kasched: cannot run {site.directory / 'no-such-kasched'}: No such file or directory"
    site.hook_config.write_text("{not json")
    result = site.run_hook("runjob", deploy_job())
    assert not result["accepted"] and "cannot read the hook configuration" in result["reject_message"]


def test_kasched_that_does_not_answer_is_killed_and_the_run_rejected(site: Site) -> None:
    hanging = write(site.directory / "hanging-kasched", "#!/bin/sh\nsleep 600 &\nsleep 600\n")
    hanging.chmod(0o755)
    site.configure(kasched=str(hanging), timeout=1)
    result = site.run_hook("runjob", deploy_job())
    assert not result["accepted"]
    assert result["reject_message"] == "kasched: kasched job start did not answer within 1 s"
    leftover = subprocess.run(["pgrep", "-f", str(hanging)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the hook left kasched's processes behind"


def test_end_of_a_job_whose_start_was_refused_is_quiet(site: Site) -> None:
    """kasched says the job had no grant (exit 3): its vnodes, set offline first, are back at once."""
    result = site.run_hook("endjob", deploy_job("60.pbs-server"))  # the design-era name of jobobit
    assert result["accepted"]
    assert all(level != 1 for level, _ in result["log"])  # not an error
    assert "job 60.pbs-server: had no grant" in site.ended("60.pbs-server")
    log = site.end_log.read_text()
    assert log.index("offline: node-1 node-2 (kasched: giving back after job 60.pbs-server)") < log.index("had no grant")
    assert "had no grant (its start was refused): back into service: node-1 node-2" in log
    assert site.vnode("node-1") == site.vnode("node-2") == {"offline": False, "down": False, "comment": "", "jobs": []}


def test_hook_run_by_a_non_admin_account_rejects_with_the_reason(site: Site) -> None:
    """pbs_server runs server hooks as root; if the site runs kasched's hook under an account that is
    not in kasched's admin_group, the deploy job is not run and the comment says why."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail(f"{SYSTEM_PYTHON} is needed to run kasched as another user")
    state = site.directory / "state"
    state.chmod(0o777)
    for path in state.iterdir():
        path.chmod(0o666)
    packages = Path(sys.prefix) / f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    start = f"import site, sys; site.addsitedir({json.dumps(str(packages))}); from kasched.cli import main; sys.exit(main())"
    wrapper = write(site.directory / "kasched-as-user", f"#!/bin/sh\nexec {SYSTEM_PYTHON} -c '{start}' \"$@\"\n")
    wrapper.chmod(0o755)
    site.configure(kasched=str(wrapper))
    result = site.run_hook("runjob", deploy_job(), as_user="kasched-pbs")
    assert not result["accepted"]
    assert "only admins may record a job start" in result["reject_message"], result
    assert site.grants() == []


# --- The adapter -------------------------------------------------------------------------------------


def test_adapter_reads_the_hook_environment() -> None:
    adapter = PbsAdapter()
    environ = {
        "KASCHED_PBS_EVENT": "start", "PBS_JOBID": "41.pbs-server", "KASCHED_PBS_CLUSTER": "pbs-server",
        "KASCHED_PBS_USER": "alice", "KASCHED_PBS_NODES": "node-1,node-2", "KASCHED_PBS_WALLTIME": "5400",
        "KASCHED_PBS_ENV": "debian12", "KASCHED_PBS_DEPLOY": "true",
    }
    assert adapter.detect(environ, []) and not adapter.detect({"PBS_JOBID": "1"}, [])
    job = adapter.read_job_start(environ, [])
    assert (job.job_id, job.user, job.nodes, job.walltime, job.environment) == (
        "41.pbs-server", "alice", ("node-1", "node-2"), 5400.0, "debian12")
    assert adapter.is_deploy_job(job)
    from kasched.errors import InputError

    with pytest.raises(InputError, match="did not set KASCHED_PBS_NODES"):
        adapter.read_job_start({**environ, "KASCHED_PBS_NODES": ""}, [])
    with pytest.raises(InputError, match="not a list of vnode names"):
        adapter.read_job_start({**environ, "KASCHED_PBS_NODES": "node-1,(node-2"}, [])
    assert end_reason("0") == "job ended (exit 0)"
    assert end_reason("271") == "killed by signal 15, e.g. qdel or walltime (exit 271)"
    assert end_reason("-1") == "PBS could not run the job (exit -1)"
    assert end_reason("") == "job ended"


def test_running_jobs_from_qstat_json_sample() -> None:
    text = SAMPLE.read_text()
    assert pbscli.jobs_holding_nodes(text, "pbs-server") == {"41.pbs-server", "43[].pbs-server", "44.pbs-server"}
    assert pbscli.jobs_holding_nodes(text, "other-cluster") is None
    assert pbscli.jobs_holding_nodes("qstat: cannot connect", "pbs-server") is None
    empty = json.dumps({"timestamp": 1, "pbs_version": "22.05.11", "pbs_server": "pbs-server.example.org"})
    assert pbscli.jobs_holding_nodes(empty, "pbs-server") == set()


def test_running_jobs_through_a_standin_qstat(tmp_path: Path) -> None:
    qstat = write(tmp_path / "standin-qstat",
                  f'#!/bin/sh\n[ "$*" = "-f -F json -t" ] || exit 2\ncat {SAMPLE}\n')
    qstat.chmod(0o755)
    assert pbscli.running_jobs("pbs-server", qstat=str(qstat)) == {"41.pbs-server", "43[].pbs-server", "44.pbs-server"}
    failing = write(tmp_path / "failing-qstat", "#!/bin/sh\necho 'Connection refused' >&2\nexit 1\n")
    failing.chmod(0o755)
    assert pbscli.running_jobs("pbs-server", qstat=str(failing)) is None
    assert PbsAdapter().running_jobs("pbs-server") is None or shutil.which("qstat")


def test_doctor_reads_qmgr_listings() -> None:
    listing = "Hook kasched\n    type = site\n    enabled = true\n    event = queuejob,runjob,jobobit\n    alarm = 30\n"
    assert pbscli.hook_check(listing).ok
    assert pbscli.hook_check(listing.replace("jobobit", "endjob")).ok  # the design-era name
    disabled = pbscli.hook_check(listing.replace("enabled = true", "enabled = false"))
    assert not disabled.ok and "enabled = true" in disabled.detail
    no_end = pbscli.hook_check(listing.replace(",jobobit", ""))
    assert not no_end.ok and "missing jobobit" in no_end.detail
    assert not pbscli.hook_check(None).ok
    if not shutil.which("qstat") and not shutil.which("qmgr"):
        assert PbsAdapter().doctor() == []


# --- Holding vnodes while they are given back ---------------------------------------------------------

LISTING = {
    "timestamp": 1765100000, "pbs_version": "23.06.06", "pbs_server": "pbs-server",
    "nodes": {
        "node-1": {"Mom": "node-1", "state": "offline", "comment": "kasched: giving back after job 41.pbs-server"},
        "node-2": {"Mom": "node-2", "state": "offline,down", "comment": "kasched: giving back after job 41.pbs-server"},
        "node-3": {"Mom": "node-3", "state": "offline", "comment": "bad DIMM, ticket 4411"},
        "node-4": {"Mom": "node-4", "state": "free"},
        "node-5": {"Mom": "node-5", "state": "job-exclusive,offline", "comment": "kasched: in deploy job 42.pbs-server"},
    },
}  # fmt: skip


def recording_pbsnodes(tmp_path: Path, listing: dict[str, Any], fail_on: str = "") -> tuple[Path, Path]:
    """A pbsnodes that prints ``listing`` for -av -F json and records every other command line."""
    calls = tmp_path / "calls"
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    script = write(tmp_path / "pbsnodes", f"""#!/bin/sh
if [ "$*" = "-av -F json" ]; then cat {tmp_path / "listing.json"}; exit 0; fi
for arg in "$@"; do printf '[%s]' "$arg"; done >> {calls}; echo >> {calls}
case "$*" in *{fail_on or "@never@"}*) echo "Error marking node {fail_on} - Unauthorized Request" >&2; exit 1;; esac
""")
    script.chmod(0o755)
    return script, calls


def test_release_puts_back_only_the_vnodes_kasched_holds(tmp_path: Path) -> None:
    from kasched_pbs import hold

    pbsnodes, calls = recording_pbsnodes(tmp_path, LISTING)
    failed = {"node-4": "kasched: revert 7 failed: node-4: BMC 10.0.0.4:623 did not answer power status (timeout)",
              "node-3": "kasched: revert 7 failed: node-3: boot"}  # fmt: skip
    problems = hold.release(str(pbsnodes), ["node-1", "node-2", "node-3", "node-9"], failed)
    assert problems == []
    assert calls.read_text().splitlines() == [
        "[-r][-C][][node-1]",  # held by kasched: back into service, comment unset
        "[-r][-C][][node-2]",  # down too (its MoM not back yet): OFFLINE cleared all the same
        # node-3: an admin's offline, left alone; node-9: not PBS's
        "[-o][-C][kasched: revert 7 failed: node-4: BMC 10.0.0.4:623 did not answer power stat...][node-4]",
    ]
    assert len("kasched: revert 7 failed: node-4: BMC 10.0.0.4:623 did not answer power stat...") == hold.COMMENT_LIMIT


def test_release_reports_what_pbsnodes_refused(tmp_path: Path) -> None:
    from kasched_pbs import hold

    pbsnodes, _ = recording_pbsnodes(tmp_path, LISTING, fail_on="node-1")
    assert hold.release(str(pbsnodes), ["node-1"], {}) == [
        "node-1: pbsnodes -r failed: Error marking node node-1 - Unauthorized Request"]
    broken = write(tmp_path / "broken", "#!/bin/sh\necho 'pbsnodes: cannot connect to server pbs-server' >&2\nexit 1\n")
    broken.chmod(0o755)
    assert hold.release(str(broken), ["node-1"], {}) == [
        "cannot read the vnodes (pbsnodes -av -F json): pbsnodes: cannot connect to server pbs-server"]
    assert hold.vnodes_of("not json") is None and hold.vnodes_of('{"nodes": []}') is None
    vnodes = hold.vnodes_of(json.dumps(LISTING))
    assert vnodes is not None and vnodes["node-5"].states == {"job-exclusive", "offline"}
    assert vnodes["node-5"].held_by_kasched and not vnodes["node-3"].held_by_kasched and vnodes["node-4"].comment == ""


def test_adapter_release_finds_pbsnodes_under_pbs_exec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    _, calls = recording_pbsnodes(tmp_path / "bin", LISTING)
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(tmp_path))
    assert PbsAdapter().release("41.pbs-server", ["node-1"], {}) == []
    assert calls.read_text() == "[-r][-C][][node-1]\n"
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(tmp_path / "nowhere"))
    [problem] = PbsAdapter().release("41.pbs-server", ["node-1"], {})
    assert problem.startswith("pbsnodes not found (set KASCHED_PBS_EXEC")
    assert PbsAdapter().release(None, [], {}) == []


def test_doctor_says_whether_pbsnodes_and_qstat_answer(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(site.server.home))
    site.server.run(deploy_job())
    checks = {check.what: check for check in PbsAdapter().doctor()}
    jobs, pbsnodes = checks["PBS jobs (qstat)"], checks["PBS pbsnodes"]
    assert jobs.ok and jobs.detail.endswith("lists 1 jobs of server pbs-server"), jobs
    wait_for_vnode(site, "node-1", lambda v: v["offline"])
    pbsnodes = next(c for c in PbsAdapter().doctor() if c.what == "PBS pbsnodes")
    assert pbsnodes.ok and pbsnodes.detail.endswith("8 vnodes, 2 offline for kasched: node-1 node-2"), pbsnodes
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(site.directory / "nowhere"))
    assert PbsAdapter().doctor() == []  # no PBS command where kasched runs: nothing of PBS's to check
    (site.directory / "broken" / "bin").mkdir(parents=True)
    for name in ("qstat", "pbsnodes"):
        write(site.directory / "broken" / "bin" / name, "#!/bin/sh\necho 'cannot connect to server' >&2\nexit 1\n").chmod(0o755)
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(site.directory / "broken"))
    checks = {check.what: check for check in PbsAdapter().doctor()}
    assert not checks["PBS jobs (qstat)"].ok and "reconcile cannot read PBS's jobs" in checks["PBS jobs (qstat)"].detail
    assert not checks["PBS pbsnodes"].ok and "cannot be put back" in checks["PBS pbsnodes"].detail


def wait_for_vnode(site: Site, name: str, condition: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vnode = site.vnode(name)
        if condition(vnode):
            return vnode
        time.sleep(0.2)
    reclaims = "".join(log.read_text() for log in (site.directory / "state").glob("reclaim/*.log"))
    raise AssertionError(f"{name}: {site.vnode(name)}; helper log: {site.end_log.read_text()}; reclaim: {reclaims}")


def test_a_deploy_jobs_vnodes_stay_out_of_scheduling_until_released(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in server runs a deploy job: its vnodes go offline; the job's end marks them "giving
    back" before kasched job end revokes the grant; a next job on them is refused by the scheduling rule
    until kaschedd's release (called here as kasched job reclaim calls it: this site has no reference
    environment, so its own revert never starts; the lab test reverts for real) puts node-1 back and
    keeps node-2, whose revert failed, offline with the reason."""
    ran = site.server.run(deploy_job("70.pbs-server"))
    assert ran["ran"], ran
    held = wait_for_vnode(site, "node-1", lambda v: v["offline"])
    assert held["comment"] == "kasched: in deploy job 70.pbs-server" and held["jobs"] == ["70.pbs-server"]
    assert site.server.run(deploy_job("71.pbs-server")) == {"ran": False, "why": "node-1 is offline,job-exclusive"}
    ended = site.server.end("70.pbs-server")
    assert ended["accepted"] and ended["seconds"] < 5, ended
    assert "kasched job end: done" in site.ended("70.pbs-server")
    log = site.end_log.read_text()
    assert log.index("kasched: giving back after job 70.pbs-server") < log.index("kasched job end: done")
    [grant] = [g for g in site.grants() if g["job_id"] == "70.pbs-server"]
    assert not grant["active"]
    refused = site.server.run(deploy_job("71.pbs-server"))
    assert refused == {"ran": False, "why": "node-1 is offline"}, refused
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(site.server.home))
    reason = "kasched: revert 3 failed: node-2: BMC 10.77.0.12:623 did not answer power status (timeout)"
    assert PbsAdapter().release("70.pbs-server", ["node-1"], {"node-2": reason}) == []
    assert site.vnode("node-1") == {"offline": False, "down": False, "comment": "", "jobs": []}
    assert site.vnode("node-2")["offline"] and site.vnode("node-2")["comment"] == reason[:76] + "..."
    listed = subprocess.run([str(site.server.home / "bin" / "pbsnodes"), "-l"], capture_output=True, text=True)
    assert listed.stdout == f"node-2               offline {reason[:76]}...\n", listed.stdout
    assert site.server.run(deploy_job("71.pbs-server")) == {"ran": False, "why": "node-2 is offline"}
    alone = site.server.run(deploy_job("72.pbs-server", exec_vnode="(node-1:ncpus=8)"))
    assert alone["ran"], alone


def test_an_admins_offline_during_the_job_outlasts_its_end(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """An admin sets node-2 offline for a repair while the deploy job runs: the job's end holds node-1
    only (the hook reads node-2's comment in the server), and the release leaves node-2 offline."""
    assert site.server.run(deploy_job("80.pbs-server"))["ran"]
    wait_for_vnode(site, "node-2", lambda v: v["offline"])
    pbsnodes = str(site.server.home / "bin" / "pbsnodes")
    assert subprocess.run([pbsnodes, "-o", "-C", "bad DIMM, ticket 4411", "node-2"]).returncode == 0
    assert site.server.end("80.pbs-server")["accepted"]
    assert "kasched job end: done" in site.ended("80.pbs-server")
    assert "offline: node-1 (kasched: giving back after job 80.pbs-server)" in site.end_log.read_text()
    assert site.vnode("node-2")["comment"] == "bad DIMM, ticket 4411"
    monkeypatch.setenv("KASCHED_PBS_EXEC", str(site.server.home))
    assert PbsAdapter().release("80.pbs-server", ["node-1", "node-2"], {}) == []
    assert not site.vnode("node-1")["offline"]
    assert site.vnode("node-2") == {"offline": True, "down": False, "comment": "bad DIMM, ticket 4411", "jobs": []}
