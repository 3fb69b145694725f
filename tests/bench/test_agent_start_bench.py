"""bench/agent_start.py runs and prints its ratios (no lab: agents start on loopback). Speed is not
asserted: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import os
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


@pytest.mark.slow
def test_agent_start_bench_measures_the_system_python_not_the_first_in_path(tmp_path: Path) -> None:
    """A ``python3`` first in ``PATH`` (a version manager's shim, say) is not what nodes run: the
    bench must not start it. The decoy here is a shell script that leaves a mark and fails."""
    decoy_dir = tmp_path / "bin"
    decoy_dir.mkdir()
    mark = tmp_path / "decoy-ran"
    decoy = decoy_dir / "python3"
    decoy.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    decoy.chmod(0o755)
    env = {**os.environ, "PATH": f"{decoy_dir}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "agent_start.py"), "--starts", "2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert not mark.exists()
    assert "RATIO agent start CPU isolated / bare interpreter" in done.stdout


def test_agent_start_bench_refuses_a_missing_interpreter() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "agent_start.py"), "--python", "/nonexistent/python3"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert "no such executable" in done.stderr and "Traceback" not in done.stderr
