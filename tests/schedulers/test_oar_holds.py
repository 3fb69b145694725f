"""How the OAR plugin holds a deploy job's resources while kasched gives its nodes back, and releases
them, without OAR: the command lines (oarnodesetting --sql ... --drain on|off -p kasched=REASON), the
reasons OAR can store safely, KASCHED_OAR_COMMAND_PREFIX, the epilogue's order (hold, then kasched job
end, released at once when the job had no grant) and doctor's lines. A stand-in OAR command (run
through the prefix) records every command line and answers as OAR 2.5.9 does. The same on real OAR:
test_oar_lab.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from kasched_oar import holds, hooks
from kasched_oar.oarjobs import OarError, OarSettings
from kasched_oar.plugin import OarAdapter

from kasched.schedulers import HOLD_MARK

# Stands in for OAR behind KASCHED_OAR_COMMAND_PREFIX: records argv; oarstat prints a deploy job of
# node-1,node-2; oarproperty -l lists the properties; oarnodesetting exits FAKE_OAR_EXIT (12: "Your SQL
# clause returns nothing", as OAR 2.5.9 says when no resource matches).
FAKE_OAR = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
command = sys.argv[1]
if command == "oarstat" and os.environ.get("FAKE_OARSTAT_FAILS"):
    sys.exit("DB error: could not connect to server")
if command == "oarstat":
    job = {{"Job_Id": 7, "owner": "alice", "state": "Finishing", "types": ["deploy"], "assigned_network_address":
           ["node-1", "node-2"], "walltime": 600, "events": []}}
    print(json.dumps({{"7": job}}) if "-fj" in sys.argv else json.dumps({{"7": job, "8": {{"state": "Terminated"}}}}))
elif command == "oarproperty":
    print("cpuset\\nkasched\\ndrain")
elif command == "oarnodesetting":
    code = int(os.environ.get("FAKE_OAR_EXIT", "0"))
    if code == 12:
        sys.stderr.write("/!\\\\ Your SQL clause returns nothing and there is no resource specified.\\n")
        sys.exit(12)
    sys.exit(code and "DB error: boom")
"""


@pytest.fixture
def fake_oar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in as the command prefix; the file where it records its command lines."""
    log = tmp_path / "commands.log"
    log.touch()
    script = tmp_path / "fake-oar"
    script.write_text(FAKE_OAR.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    monkeypatch.setenv("KASCHED_OAR_COMMAND_PREFIX", str(script))
    monkeypatch.delenv("KASCHED_OAR_API_URL", raising=False)
    monkeypatch.delenv("FAKE_OAR_EXIT", raising=False)
    return log


def commands(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_hold_drains_the_jobs_resources_with_the_reason_but_not_an_admins_drain() -> None:
    assert holds.hold_args(["node-2", "node-1"], "7") == [
        "oarnodesetting", "--sql",
        "network_address IN ('node-1','node-2') AND (drain='NO' OR kasched LIKE 'kasched:%')",
        "--drain", "on", "-p", "kasched=kasched: giving back after job 7",
    ]  # fmt: skip
    assert holds.hold_reason("7").startswith(HOLD_MARK)


def test_release_touches_only_resources_kasched_holds() -> None:
    assert holds.back_args(["node-1"]) == [
        "oarnodesetting", "--sql", "network_address IN ('node-1') AND kasched LIKE 'kasched:%'",
        "--drain", "off", "-p", "kasched=",
    ]  # fmt: skip
    assert holds.back_args(["node-1"], only_reason=holds.hold_reason("7"))[2].endswith(
        "AND kasched = 'kasched: giving back after job 7'"
    )
    failed = holds.failed_args("node-3", "kasched: revert 12 failed: node-3: BMC 10.0.0.3:623 did not answer")
    assert failed[2] == "network_address IN ('node-3') AND kasched LIKE 'kasched:%'"
    assert failed[3:] == [
        "--drain",
        "on",
        "-p",
        "kasched=kasched: revert 12 failed: node-3: BMC 10.0.0.3:623 did not answer",
    ]


@pytest.mark.parametrize(
    ("reason", "stored"),
    [
        ("kasched: revert 3 failed: it's x=1", "kasched: revert 3 failed: it s x 1"),  # OAR quotes nothing
        ("revert failed'); DROP TABLE resources; --", "kasched: revert failed ); DROP TABLE resources; --"),
        ("kasched: a\nb\\c", "kasched: a b c"),
        ("kasched: " + "x" * 400, "kasched: " + "x" * (holds.MAX_REASON - 9)),
    ],
)
def test_reasons_are_stored_with_safe_characters_only(reason: str, stored: str) -> None:
    assert holds.safe_reason(reason) == stored
    assert "'" not in stored and "=" not in stored and len(stored) <= holds.MAX_REASON


@pytest.mark.parametrize("node", ["node-1'); --", "node 1", "", "-h"])
def test_node_names_that_are_not_host_names_are_refused(node: str) -> None:
    with pytest.raises(OarError, match="not OAR host names"):
        holds.hosts_clause([node])


def test_the_prefix_goes_before_every_oar_command_and_ssh_gets_one_quoted_word() -> None:
    args = holds.back_args(["node-1"])
    nsenter = OarSettings.from_environ({"KASCHED_OAR_COMMAND_PREFIX": "nsenter --net=/proc/1/ns/net"})
    assert nsenter.command(args) == ["nsenter", "--net=/proc/1/ns/net", *args]
    ssh = OarSettings.from_environ({"KASCHED_OAR_COMMAND_PREFIX": "/usr/bin/ssh -o BatchMode=yes oar-server"})
    assert ssh.command(args)[:4] == ["/usr/bin/ssh", "-o", "BatchMode=yes", "oar-server"]
    assert ssh.command(args)[4] == (
        "oarnodesetting --sql 'network_address IN ('\"'\"'node-1'\"'\"') AND kasched LIKE '\"'\"'kasched:%'\"'\"'' "
        "--drain off -p kasched="
    )
    assert OarSettings.from_environ({}).command(args) == args
    with pytest.raises(OarError, match="KASCHED_OAR_COMMAND_PREFIX"):
        OarSettings.from_environ({"KASCHED_OAR_COMMAND_PREFIX": "ssh 'oar"})


def test_adapter_release_runs_oar_through_the_prefix(fake_oar: Path) -> None:
    problems = OarAdapter().release("7", ["node-1", "node-2"], {"node-3": f"{HOLD_MARK} revert 4 failed: no BMC"})
    assert problems == []
    done = commands(fake_oar)
    assert [c[0] for c in done] == ["oarnodesetting", "oarnodesetting"]
    assert done[0][1:4] == ["--sql", "network_address IN ('node-1','node-2') AND kasched LIKE 'kasched:%'", "--drain"]
    assert done[0][4:] == ["off", "-p", "kasched="]
    assert done[1][2].startswith("network_address IN ('node-3')") and done[1][4:] == [
        "on",
        "-p",
        "kasched=kasched: revert 4 failed: no BMC",
    ]


def test_adapter_release_skips_nodes_oar_does_not_hold_and_never_raises(
    fake_oar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_OAR_EXIT", "12")  # no resource of kasched's among them: nothing to do
    assert OarAdapter().release(None, ["node-1"], {"node-2": "kasched: x"}) == []
    monkeypatch.setenv("FAKE_OAR_EXIT", "1")
    problems = OarAdapter().release("7", ["node-1", "bad'name"], {"node-2": "kasched: x"})
    assert problems == [
        "bad'name: not an OAR host name, left alone",
        "node-1 not put back into service: oarnodesetting failed (exit 1): DB error: boom",
        "node-2: reason not recorded: oarnodesetting failed (exit 1): DB error: boom",
    ]
    monkeypatch.setenv("KASCHED_OAR_COMMAND_PREFIX", "/nonexistent/oar")
    assert OarAdapter().release("7", ["node-1"], {}) == [
        "node-1 not put back into service: /nonexistent/oar not found (install Debian package oar-server)"
    ]


def fake_kasched(tmp_path: Path, code: int) -> str:
    script = tmp_path / "kasched"
    script.write_text(f"#!/bin/sh\necho kasched $*\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(("code", "released"), [(0, False), (1, False), (hooks.NOT_FOUND, True)])
def test_epilogue_holds_before_kasched_job_end_and_releases_a_job_without_grant(
    fake_oar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    code: int, released: bool,
) -> None:  # fmt: skip
    monkeypatch.setenv("KASCHED", fake_kasched(tmp_path, code))
    assert hooks.main(["epilogue", "7"]) == 0
    done = commands(fake_oar)
    assert done[0][:2] == ["oarstat", "-fj"]
    assert done[1] == holds.hold_args(["node-1", "node-2"], "7")
    if released:  # only what this epilogue held, by its exact reason
        assert done[2] == holds.back_args(["node-1", "node-2"], only_reason=holds.hold_reason("7"))
    assert len(done) == 2 + released
    out = capsys.readouterr().out
    assert "node-1,node-2 held in" in out
    if code == 1:
        assert "resources stay held" in out


def test_epilogue_still_ends_the_grant_when_the_hold_fails(
    fake_oar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KASCHED", fake_kasched(tmp_path, 0))
    monkeypatch.setenv("FAKE_OAR_EXIT", "1")
    assert hooks.main(["epilogue", "7"]) == 0
    out = capsys.readouterr().out
    assert "holding node-1,node-2 failed" in out and "kasched job end --scheduler oar -- 7" in out


def test_doctor_says_whether_oar_jobs_can_be_listed_from_here(fake_oar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = {c.what: c for c in OarAdapter().doctor()}
    assert checks["OAR jobs from here"].ok and "1 active job(s) listed behind" in checks["OAR jobs from here"].detail
    assert checks["resource property kasched"].ok
    monkeypatch.setenv("FAKE_OARSTAT_FAILS", "1")
    jobs = {c.what: c for c in OarAdapter().doctor()}["OAR jobs from here"]
    assert not jobs.ok and "could not connect" in jobs.detail and "a lost epilogue is never repaired" in jobs.detail
    assert OarAdapter().running_jobs("oar") is None
