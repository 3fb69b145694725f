"""Tree exec over real sshd fake nodes on loopback: same results direct and through relays."""

from __future__ import annotations

import pytest
from sshd_nodes import RELAY_COMMAND, SshdCluster, free_port

from kasched.transports import tree
from kasched.transports.ssh_session import HostKeyPolicy

COMMAND = "echo out-$((6*7)); echo err >&2; exit 0"


def run(cluster: SshdCluster, nodes: list[str], command: str, **options: object) -> tree.GroupResult:
    options.setdefault("command_timeout", 20.0)
    return tree.run(
        nodes, command, key_file=str(cluster.key_file), addresses=cluster.addresses,
        relay_command=RELAY_COMMAND, **options,
    )  # fmt: skip


def test_plan_subtrees_covers_every_node_once() -> None:
    nodes = [f"n{i}" for i in range(17)]
    plan = tree.plan_subtrees(nodes, 4)
    assert len(plan) == 4
    assert [head for head, _ in plan] == ["n0", "n5", "n9", "n13"]
    assert sorted(n for head, rest in plan for n in [head, *rest]) == sorted(nodes)
    assert tree.plan_subtrees(nodes[:3], 4) == [("n0", []), ("n1", []), ("n2", [])]
    assert tree.plan_subtrees(nodes, 0) == [(n, []) for n in nodes]


@pytest.mark.slow
@pytest.mark.parametrize("fanout", [2, 4])
def test_tree_gives_the_same_results_as_direct(sshd_cluster: SshdCluster, fanout: int) -> None:
    direct = run(sshd_cluster, sshd_cluster.nodes, COMMAND, window=8)
    through_tree = run(sshd_cluster, sshd_cluster.nodes, COMMAND, fanout=fanout)
    assert direct.ok and through_tree.ok
    assert list(through_tree) == list(direct) == sshd_cluster.nodes
    # stderr may have more lines before ours: this host's root shell rc files print warnings
    outputs = [r.value for r in [*direct.values(), *through_tree.values()]]
    assert {(output.stdout, output.exit_status) for output in outputs} == {("out-42\n", 0)}
    assert all(output.stderr.endswith("err\n") for output in outputs)


@pytest.mark.slow
@pytest.mark.parametrize("fanout", [0, 2])
def test_unreachable_failing_and_hanging_nodes_are_reported_per_node(sshd_cluster: SshdCluster, fanout: int) -> None:
    nodes = sshd_cluster.nodes[:8]
    addresses = dict(sshd_cluster.addresses)
    addresses["n01"] = f"127.41.9.9:{free_port('127.41.9.9')}"  # a head of the tree, nobody listens
    addresses["n06"] = f"127.41.9.8:{free_port('127.41.9.8')}"
    port_of = {node: addresses[node].rsplit(":", 1)[1] for node in nodes}
    # every fake node shares the host, so the command tells which node it runs on by its sshd port
    command = (
        'case "$SSH_CONNECTION" in'
        f' *" {port_of["n03"]}") echo broken >&2; exit 3;;'
        f' *" {port_of["n04"]}") sleep 30;;'
        " esac; echo fine"
    )
    result = tree.run(
        nodes, command, key_file=str(sshd_cluster.key_file), addresses=addresses, fanout=fanout,
        relay_command=RELAY_COMMAND, command_timeout=3.0, connect_timeout=3.0,
    )  # fmt: skip
    assert list(result) == nodes
    assert sorted(result.failed) == ["n01", "n03", "n04", "n06"]
    assert "SSH connection failed" in (result["n01"].error or "")
    assert result["n03"].value.exit_status == 3
    assert result["n03"].value.stderr.endswith("broken\n")
    assert "status 3" in (result["n03"].error or "")
    assert "timed out" in (result["n04"].error or "")
    for node in ["n02", "n05", "n07", "n08"]:
        assert (result[node].value.stdout, result[node].value.exit_status) == ("fine\n", 0)


@pytest.mark.slow
def test_host_keys_are_recorded_then_enforced(sshd_cluster: SshdCluster, tmp_path) -> None:
    known_hosts = tmp_path / "known_hosts"
    nodes = sshd_cluster.nodes[:4]
    first = run(sshd_cluster, nodes, "true", fanout=2, known_hosts_file=str(known_hosts))
    assert first.ok
    assert len(known_hosts.read_text().splitlines()) == 4
    strict = run(
        sshd_cluster, nodes, "true", fanout=2, known_hosts_file=str(known_hosts),
        host_key_policy=HostKeyPolicy.STRICT,
    )  # fmt: skip
    assert strict.ok
    known_hosts.write_text("")
    refused = run(sshd_cluster, nodes, "true", known_hosts_file=str(known_hosts), host_key_policy="strict")
    assert refused.failed == nodes


@pytest.mark.slow
def test_a_relay_that_cannot_start_leaves_its_nodes_failed_with_the_reason(sshd_cluster: SshdCluster) -> None:
    nodes = sshd_cluster.nodes[:6]
    result = tree.run(
        nodes, "true", key_file=str(sshd_cluster.key_file), addresses=sshd_cluster.addresses, fanout=2,
        relay_command="echo relay unavailable >&2; exit 5", command_timeout=10.0,
    )  # fmt: skip
    assert result.failed == nodes
    assert "relay on n01 exited with status 5 (relay unavailable)" in (result["n02"].error or "")
