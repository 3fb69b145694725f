"""bench/agent_cpu.py runs real agents on loopback and prints its ratios. Speed is not asserted: the
figures are in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "agent_cpu.py"


@pytest.mark.slow
def test_agent_cpu_bench_prints_its_ratios() -> None:
    # 8 MiB: 64 KiB batches cost about 8 ms of CPU per MiB and node, and the kernel counts 10 ms ticks
    # (1 MiB measured 0 ms once the agents' socket buffers were enlarged: the bench now says so)
    argv = [sys.executable, str(BENCH), "--nodes", "2", "--size-mib", "8", "--rate-mbit", "80", "--rounds", "1",
            "--batches", "16,64"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    costs = re.findall(r"^\s*(\d+) KiB batches: best\s+(\d+\.\d+) ms/MiB per node$", done.stdout, re.MULTILINE)
    assert [kib for kib, _ in costs] == ["16", "64"] and all(float(ms) > 0 for _, ms in costs)
    ratios = dict(re.findall(r"^RATIO (.+) = (\d+\.\d+)$", done.stdout, re.MULTILINE))
    assert list(ratios) == ["agent CPU per MiB, 16 KiB / 64 KiB batches"]
    assert float(ratios["agent CPU per MiB, 16 KiB / 64 KiB batches"]) > 0


@pytest.mark.parametrize(
    ("option", "message"),
    [("--batches=16,x", "--batches must be KiB counts"), ("--nodes=0", "must be positive")],
)
def test_agent_cpu_bench_refuses_bad_options(option: str, message: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH), option], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
