"""bench/grants.py grants and revokes jobs on SQLite and PostgreSQL and prints p99 against the target.
Speed is not asserted: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import server_url

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "grants.py"


@pytest.mark.db
def test_grants_bench_prints_a_ratio_per_size_backend_and_kind() -> None:
    command = [sys.executable, str(BENCH), "--runs", "2", "--sizes", "20,60", "--postgresql", server_url("postgresql")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = dict(re.findall(r"^RATIO (.+) / target = (\d+\.\d+)$", done.stdout, re.MULTILINE))
    expected = [f"{kind} p99 {size} nodes {backend}" for backend in ("sqlite", "postgresql") for size in (20, 60)
                for kind in ("grant", "revoke")]  # fmt: skip
    assert sorted(ratios) == sorted(expected) and all(float(value) > 0 for value in ratios.values())
