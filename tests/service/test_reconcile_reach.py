"""``kasched doctor`` asks kaschedd itself which schedulers its reconcile can read (kaschedd may run on
another host, or in another network namespace, than the doctor): a scheduler it cannot read is a
PROBLEM line saying that a lost epilog would never be repaired. A real kaschedd in a thread."""

from __future__ import annotations

import json

import pytest

from kasched.compose import open_site
from kasched.identity import Caller
from kasched.messages import JobInfo
from tests.service.tcpsite import Site, kasched_as
from tests.service.test_small_ones import site  # noqa: F401 (the fixture: kaschedd on a scratch site)

pytestmark = pytest.mark.slow


def test_doctor_reports_what_kaschedd_sees_of_each_scheduler(site: Site) -> None:  # noqa: F811
    admin = open_site(site.config, Caller("root", is_admin=True), load_entry_points=False)
    try:
        admin.record_job_start(JobInfo("slurm", "nowhere", "41", "kasched-alice", ("node-1",)))
    finally:
        admin.close()
    doctor = kasched_as("root", site.client_config, "doctor", "--json", KASCHED_DIRECT="1")
    checks = {c["what"]: c for c in json.loads(doctor.stdout)}
    line = checks["kaschedd: slurm:nowhere: reconcile"]
    assert not line["ok"] and "a lost epilog is never repaired" in line["detail"], line
    assert checks["kaschedd: oar: reconcile"]["detail"] == "no job of this scheduler was granted yet"
    assert not any(what.startswith("here: ") for what in checks), "kaschedd answered: its view, not this host's"
    refused = kasched_as("kasched-alice", site.client_config, "doctor")
    assert refused.returncode != 0 and "kaschedd: slurm" not in refused.stdout
