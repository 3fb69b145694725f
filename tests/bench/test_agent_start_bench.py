"""bench/agent_start.py runs and prints its ratios (no lab: agents start on loopback). Speed is not
asserted: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_agent_start_bench_prints_its_ratios() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "agent_start.py"), "--starts", "2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = dict(re.findall(r"^RATIO (.+) = (\d+\.\d+)$", done.stdout, re.MULTILINE))
    assert set(ratios) == {"agent start CPU default / isolated", "agent start CPU isolated / bare interpreter"}
    assert all(float(value) > 0 for value in ratios.values())


def test_agent_start_bench_refuses_no_starts() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "agent_start.py"), "--starts", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert "--starts must be at least 1" in done.stderr and "Traceback" not in done.stderr
