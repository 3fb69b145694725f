"""The lab's network: one namespace holding the switches, the nodes' namespaces cabled to them.

* lab namespace ``kl-<lab>``: a Linux bridge per switch (``sw1``...), the switches chained by veth
  uplinks, the service address on ``sw1``, the BMC addresses on ``bmc0`` (a bridge with no ports); no default route,
  so nothing leaves the lab;
* node namespace ``kl-<lab>-<node>``: ``eth0`` (the node's MAC), the other end ``nd<i>`` plugged into
  its switch; the address comes from the lab's DHCP server at each boot.

Links and uplinks are shaped with ``tc tbf`` in both directions.
"""

from __future__ import annotations

from kasched.lab.system import netns_exists, run
from kasched.lab.topology import PREFIX_LENGTH, SERVICE_ADDRESS, LabPlan, NodePlan
from kasched.rates import rate_bits


def shaping_command(device: str, rate: str) -> str:
    """A ``tc`` batch line limiting ``device``'s egress to ``rate`` (token bucket)."""
    burst = max(32 * 1024, rate_bits(rate) // 8 // 100)
    return f"qdisc replace dev {device} root tbf rate {rate} burst {burst} latency 100ms"


def ip_batch(netns: str, lines: list[str]) -> None:
    if lines:
        run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n", timeout=120)


def tc_batch(netns: str, lines: list[str]) -> None:
    if lines:
        run(["ip", "netns", "exec", netns, "tc", "-batch", "-"], input="\n".join(lines) + "\n", timeout=120)


def create_lab_namespace(plan: LabPlan) -> None:
    """The lab namespace with its switches, uplinks, service address and BMC interface."""
    ns = plan.netns
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    lines = ["link set lo up"]
    for switch in range(1, plan.switches + 1):
        lines += [
            f"link add sw{switch} type bridge stp_state 0 forward_delay 0",
            f"link set sw{switch} up",
        ]
    for switch in range(1, plan.switches):
        a, b = f"up{switch}a", f"up{switch}b"
        lines += [
            f"link add {a} type veth peer name {b}",
            f"link set {a} master sw{switch} up",
            f"link set {b} master sw{switch + 1} up",
        ]
    lines += [
        f"addr add {SERVICE_ADDRESS}/{PREFIX_LENGTH} dev sw1",
        "link add bmc0 type bridge",
        "link set bmc0 up",
    ]
    ip_batch(ns, lines)
    shape_uplinks(plan, plan.uplink)


def shape_uplinks(plan: LabPlan, rate: str) -> None:
    """Shape the uplinks between switches, both ends, to ``rate`` (also in a running lab)."""
    ends = [f"up{switch}{end}" for switch in range(1, plan.switches) for end in "ab"]
    tc_batch(plan.netns, [shaping_command(device, rate) for device in ends])


def create_node_namespaces(plan: LabPlan, nodes: list[NodePlan]) -> None:
    """Each node's namespace and cable (veth to its switch), shaped at ``plan.link``."""
    lab_lines = []
    for node in nodes:
        if not netns_exists(node.netns):
            run(["ip", "netns", "add", node.netns])
        lab_lines += [
            f"link add {node.lab_port} type veth peer name eth0 netns {node.netns}",
            f"link set {node.lab_port} master {node.switch_name} up",
            f"addr add {node.bmc_address}/32 dev bmc0",
        ]
    ip_batch(plan.netns, lab_lines)
    for node in nodes:
        ip_batch(node.netns, ["link set lo up", f"link set eth0 address {node.mac}", "link set eth0 up"])
    shape_node_links(plan, nodes, plan.link)


def shape_node_links(plan: LabPlan, nodes: list[NodePlan], rate: str) -> None:
    """Shape the nodes' cables, both ends, to ``rate`` (also to change a running lab's link speed)."""
    tc_batch(plan.netns, [shaping_command(node.lab_port, rate) for node in nodes])
    for node in nodes:
        tc_batch(node.netns, [shaping_command("eth0", rate)])


def flush_node_addresses(netns: str) -> None:
    """What losing power does to a node's network configuration."""
    run(["ip", "-n", netns, "addr", "flush", "dev", "eth0"], check=False)


def delete_namespace(netns: str) -> None:
    if netns_exists(netns):
        run(["ip", "netns", "del", netns], check=False)
