"""Fixtures of the transport tests: real sshd fake nodes on loopback, always killed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sshd_nodes import SshdCluster


@pytest.fixture(scope="module")
def sshd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdCluster]:
    if os.geteuid() != 0:
        pytest.skip("fake sshd nodes need root")
    cluster = SshdCluster(tmp_path_factory.mktemp("sshd"), 16)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
