"""Fixtures of the scheduler tests: a real Slurm 22.05 on this host (slurm_cluster.py), always stopped."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from slurm_cluster import SlurmCluster, slurm_cluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs real Slurm 22.05 daemons on this host (root; scripts/setup.sh)")


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    with slurm_cluster() as cluster:
        yield cluster
