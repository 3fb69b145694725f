"""The SSH power driver's client over real sshd fake nodes: it runs commands through the same SSH layer
as the transports (same :class:`CommandOutput`), and a node with a pinned host key must answer with it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from sshd_nodes import SshdCluster

from kasched.drivers.base import NodeTarget, PowerState
from kasched.drivers.ssh import SshClient, SshPowerDriver
from kasched.errors import DriverError
from kasched.transports.ssh_session import CommandOutput


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdCluster]:
    if os.geteuid() != 0:
        pytest.skip("fake sshd nodes need root")
    cluster = SshdCluster(tmp_path_factory.mktemp("sshd1"), 1, subnet=43)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def target(cluster: SshdCluster, host_key: str | None = None) -> tuple[SshClient, NodeTarget]:
    host, port = cluster.addresses["n1"].rsplit(":", 1)
    client = SshClient(cluster.key_file, user="root", port=int(port), timeout=10)
    return client, NodeTarget("n1", "02:00:00:00:00:01", host, host_key=host_key)


def test_run_gives_the_transports_command_output(one_node: SshdCluster) -> None:
    client, node = target(one_node)
    output = client.run(node, "echo out; echo err >&2; exit 3")
    assert isinstance(output, CommandOutput)
    # stderr may have more lines before ours: this host's root shell rc files print warnings
    assert (output.stdout, output.exit_status) == ("out\n", 3) and output.stderr.endswith("err\n")
    assert SshPowerDriver(client).status(node) == PowerState.ON


def test_a_pinned_host_key_must_be_the_nodes(one_node: SshdCluster) -> None:
    own = (one_node.root / "host_ed25519.pub").read_text().strip()
    client, node = target(one_node, host_key=own)
    assert client.run(node, "true").exit_status == 0
    other = one_node.root / "other_host"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    client, node = target(one_node, host_key=other.with_suffix(".pub").read_text().strip())
    with pytest.raises(DriverError, match="host key mismatch"):
        client.run(node, "true")
