"""bench/env_add.py adds an image and prints the ratio of the copy into the store to the hash alone.
Speed is not asserted: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "env_add.py"


def test_env_add_bench_prints_its_ratio() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--size-mib", "8", "--rounds", "1"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = dict(re.findall(r"^RATIO (.+) = (\d+\.\d+)$", done.stdout, re.MULTILINE))
    assert list(ratios) == ["env add / hash alone"] and float(ratios["env add / hash alone"]) > 0


def test_env_add_bench_refuses_bad_options() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--size-mib", "0"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip
    assert done.returncode == 2 and "must be positive" in done.stderr and "Traceback" not in done.stderr
