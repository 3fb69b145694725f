"""One fast run of each lab bench (``--quick``: 2-4 nodes, a few MiB), checking it printed its ratio
lines. Speed is not asserted: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"^RATIO (.+) = (\d+\.\d+)$", re.MULTILINE)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(not (shutil.which("taktuk") and shutil.which("udp-sender")),
                       reason="taktuk and udpcast are not installed (scripts/packages/bench.txt)"),
]


def run_bench(script: str, *expected: str, options: tuple[str, ...] = (), timeout: float = 300) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *options], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ratios = {label: float(value) for label, value in RATIO.findall(done.stdout)}
    for label in expected:
        assert label in ratios, f"{label!r} not printed: {done.stdout[-2000:]}"
        assert ratios[label] > 0
    return ratios


def test_broadcast_lab_quick() -> None:
    labels = [f"{m} T(2)/T(1) {link}Mbit" for m in ("chain", "chain-paced", "chain-overlap", "http", "taktuk-chain", "taktuk-tree", "udpcast")
              for link in (100, 50)]  # fmt: skip
    run_bench("broadcast_lab.py", "chain E N=2 100Mbit", "chain E N=2 50Mbit",
              "chain-overlap/chain-paced time N=2 100Mbit", *labels)  # fmt: skip


def test_topology_lab_quick() -> None:
    """With the server paced to the link rate (``--paced``): the broadcast bench runs both ways."""
    run_bench("topology_lab.py", "topology-aware E", "name-order E", "name-order/topology-aware time",
              options=("--paced",))  # fmt: skip


def test_fault_lab_quick() -> None:
    run_bench("fault_lab.py", "kill T/T(no fault)", "kill stream T/T(no fault)")


def test_tree_exec_lab_quick() -> None:
    run_bench("tree_exec_lab.py", "N=4 kasched tree k=2 / kasched direct", "N=4 clush -f 64 / kasched direct",
              "N=4 taktuk -s / kasched direct")


def test_prepare_lab_quick() -> None:
    run_bench("prepare_lab.py", "start N=2 separate / together")


def test_prepare_lab_refuses_bad_node_counts() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "prepare_lab.py"), "--nodes", "8,x"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert "--nodes must be node counts" in done.stderr and "Traceback" not in done.stderr


def test_revert_lab_quick() -> None:
    run_bench("revert_lab.py", "trusted-over-budget N=2", "rewrite-over-trusted N=2", "verify", "trusted-over-budget",
              timeout=900)  # fmt: skip
