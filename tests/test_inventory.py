"""Inventory import: what an admin can describe, and every refusal, on every database backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasched.api import Kasched
from kasched.errors import ConflictError, InputError, NotFoundError, PermissionDenied
from tests.conftest import EXAMPLES, write

NODE = """
site: s1
clusters:
  - name: c1
    defaults:
      bmc: {credentials: lab}
    nodes:
%s
"""


def inventory(tmp_path: Path, nodes: str, name: str = "inv.yaml") -> Path:
    return write(tmp_path / name, NODE % nodes)


def test_import_expands_ranges_in_order_and_keeps_topology(cluster: Kasched) -> None:
    nodes = cluster.list_nodes()
    assert [n.name for n in nodes] == [f"node-{i}" for i in range(1, 9)]
    node5 = cluster.show_node("node-5")
    assert (node5.ip, node5.mac, node5.bmc_address, node5.switch, node5.rack) == (
        "10.77.2.15",
        "02:00:00:00:02:05",
        "10.77.0.15",
        "sw2",
        "r2",
    )
    assert (node5.disk_device, node5.reference_partition, node5.deploy_partition) == ("/dev/sda", 2, 3)
    assert node5.state == "reference" and node5.site == "demo" and node5.cluster == "demo"


def test_import_again_updates_in_place(cluster: Kasched, tmp_path: Path) -> None:
    text = (EXAMPLES / "cluster.yaml").read_text().replace("switch: sw2", "switch: sw3")
    report = cluster.import_nodes(write(tmp_path / "c.yaml", text))
    assert report.updated == [f"node-{i}" for i in range(5, 9)]
    assert report.unchanged == [f"node-{i}" for i in range(1, 5)] and report.added == []
    assert cluster.show_node("node-7").switch == "sw3"


def test_ranges_with_padding_and_lists(admin: Kasched, tmp_path: Path) -> None:
    path = inventory(
        tmp_path,
        """      - name: n-[08-10]
        mac: "aa:00:00:00:00:[08-10]"
        ip: 10.0.0.[8-10]
        bmc: {address: "10.1.0.[8-10]"}""",
    )
    admin.import_nodes(path)
    assert [(n.name, n.ip, n.mac) for n in admin.list_nodes("n-[08-10]")] == [
        ("n-08", "10.0.0.8", "aa:00:00:00:00:08"),
        ("n-09", "10.0.0.9", "aa:00:00:00:00:09"),
        ("n-10", "10.0.0.10", "aa:00:00:00:00:10"),
    ]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            "      - name: n1\n        mac: zz\n        ip: 10.0.0.1\n        bmc: {address: 10.1.0.1}",
            "clusters[0].nodes[0].mac: 'zz' is not a MAC address",
        ),
        (
            "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.300\n        bmc: {address: 10.1.0.1}",
            "clusters[0].nodes[0].ip: '10.0.0.300' is not an IP address",
        ),
        (
            "      - name: n[1-3]\n        mac: aa:00:00:00:00:[1-2]\n        ip: 10.0.0.[1-3]\n        bmc: {address: 10.1.0.1}",
            "clusters[0].nodes[0].mac: 'aa:00:00:00:00:[1-2]' gives 2 values for 3 nodes",
        ),
        (
            "      - name: n[3-1]\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1",
            "clusters[0].nodes[0].name: bad range [3-1]",
        ),
        (
            "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1\n        colour: red",
            "clusters[0].nodes[0]: unknown field(s) colour",
        ),
        (
            "      - name: ../etc\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1\n        bmc: {address: 10.1.0.1}",
            "clusters[0].nodes[0].name: '../etc' is not a valid name",
        ),
        (
            "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1",
            "clusters[0].nodes[0].bmc.address: required for the ipmi driver",
        ),
        (
            "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1\n        bmc: {address: 10.1.0.1, port: 70000}",
            "bmc.port: 70000 is not a whole number from 1 to 65535",
        ),
        (
            "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1\n        bmc: {address: 10.1.0.1}\n"
            "        disk: {reference_partition: 3, deploy_partition: 3}",
            "disk.deploy_partition: must differ from the reference partition",
        ),
        (
            "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1\n        bmc: {address: 10.1.0.1}\n"
            "        disk: {device: /dev/../etc/passwd}",
            "is not a device path under /dev",
        ),
        (
            "      - name: n[1-2]\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.[1-2]\n        bmc: {address: 10.1.0.1}",
            "mac: aa:00:00:00:00:01 is given to more than one node",
        ),
    ],
)
def test_bad_inventory_is_refused_with_the_field_named(
    admin: Kasched, tmp_path: Path, nodes: str, message: str
) -> None:
    with pytest.raises(InputError) as error:
        admin.import_nodes(inventory(tmp_path, nodes))
    assert message in str(error.value)
    assert str(error.value).startswith(str(tmp_path / "inv.yaml"))
    assert admin.list_nodes() == []  # nothing half-written


def test_bad_yaml_and_missing_file(admin: Kasched, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not valid YAML"):
        admin.import_nodes(write(tmp_path / "bad.yaml", "site: [unclosed\n"))
    with pytest.raises(InputError, match="no such file"):
        admin.import_nodes(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="expected a non-empty list"):
        admin.import_nodes(write(tmp_path / "empty.yaml", "site: x\nclusters: []\n"))


def test_duplicate_against_database_is_refused_and_nothing_written(cluster: Kasched, tmp_path: Path) -> None:
    path = inventory(
        tmp_path,
        """      - name: fresh-[1-2]
        mac: "aa:00:00:00:00:[01-02]"
        ip: 10.77.1.[11-12]
        bmc: {address: 10.1.0.1}""",
    )
    with pytest.raises(ConflictError, match=r"IP 10.77.1.11 of node fresh-1 belongs to node node-1"):
        cluster.import_nodes(path)
    with pytest.raises(NotFoundError):
        cluster.show_node("fresh-1")


def test_only_admins_import_and_remove(cluster: Kasched, as_user, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice = as_user("alice")
    with pytest.raises(PermissionDenied, match="only admins may import nodes"):
        alice.import_nodes(EXAMPLES / "cluster.yaml")
    with pytest.raises(PermissionDenied):
        alice.remove_nodes("node-1")
    assert len(alice.list_nodes()) == 8  # anyone may list


def test_remove_and_state(cluster: Kasched) -> None:
    cluster.set_node_state("node-[1-2]", "down")
    assert [n.name for n in cluster.list_nodes(state="down")] == ["node-1", "node-2"]
    with pytest.raises(InputError, match="'broken' is not one of"):
        cluster.set_node_state("node-1", "broken")
    cluster.grant("alice", "node-3", hours=1)
    with pytest.raises(ConflictError, match="active grant"):
        cluster.remove_nodes("node-[3-4]")
    assert cluster.remove_nodes("node-[7-8]") == ["node-7", "node-8"]
    assert len(cluster.list_nodes()) == 6
    with pytest.raises(NotFoundError, match="unknown node"):
        cluster.remove_nodes("node-99")


@pytest.mark.parametrize("device", ["/dev/nvme0n1", "/dev/disk/by-path/pci-0000:00:1f.2-ata-1"])
def test_disk_device_may_be_nvme_or_a_stable_udev_link(admin: Kasched, tmp_path: Path, device: str) -> None:
    nodes = (
        "      - name: n1\n        mac: aa:00:00:00:00:01\n        ip: 10.0.0.1\n        bmc: {address: 10.1.0.1}\n"
        f"        disk: {{device: '{device}'}}"
    )
    admin.import_nodes(inventory(tmp_path, nodes))
    assert admin.show_node("n1").disk_device == device
