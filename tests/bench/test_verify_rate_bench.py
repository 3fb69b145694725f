"""bench/verify_rate.py on a 64 MiB loop device: it prints the three rates and ``RATIO verify``, and its
verify's hashes match the image's block list (it fails otherwise). Speed is not asserted: the figures
are in docs/benchmarks.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "verify_rate.py"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="a loop device and dropping the page cache need root")
def test_verify_rate_bench_prints_its_ratio() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ratios = dict(re.findall(r"^RATIO (.+) = (\d+\.\d+)$", done.stdout, re.MULTILINE))
    assert list(ratios) == ["verify"] and float(ratios["verify"]) > 0
    assert re.search(r"^hash sha256 in memory, \d+ threads: +\d+ MiB/s", done.stdout, re.MULTILINE)


def test_verify_rate_bench_refuses_bad_options() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--size-mib", "0"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip
    assert done.returncode == 2 and "must be positive" in done.stderr and "Traceback" not in done.stderr
