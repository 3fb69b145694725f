"""bench/scale.py on a small simulated site: it still runs end to end (a real kaschedd, the real CLI,
the hooks) and prints every figure docs/benchmarks.md reports, with its ``RATIO overhead`` lines.
Speed is not asserted: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow]
RATIO = re.compile(r"^RATIO overhead = (\d+\.\d+)  \(sqlite (.+), scale 0\.05\)$", re.MULTILINE)


def test_scale_bench_prints_its_figures_for_a_small_site() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--nodes", "16", "--db", "sqlite", "--scale", "0.05"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ratios = {kind: float(value) for value, kind in RATIO.findall(done.stdout)}
    assert set(ratios) == {"first revert (nodes not trusted yet)", "deploy", "revert"}, done.stdout
    assert all(0 <= value < 1 for value in ratios.values()), ratios
    assert "failed nodes 0" in done.stdout and "failed nodes 1" not in done.stdout
    for figure in ("rows per node", "live view: one status", "16-node job: prolog", "kaschedd peak memory"):
        assert figure in done.stdout, (figure, done.stdout)
