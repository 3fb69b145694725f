"""``kasched nodes``: import the inventory, list and show nodes."""

from __future__ import annotations

import argparse
from typing import Any

from kasched.cli.common import Context, print_json, print_table, print_view
from kasched.nodeset import fold


def register(subparsers: Any) -> None:
    nodes = subparsers.add_parser("nodes", help="the site's nodes (inventory)")
    commands = nodes.add_subparsers(dest="nodes_command", metavar="ACTION", required=True)

    imp = commands.add_parser("import", help="create or update nodes from an inventory YAML file")
    imp.add_argument("file")
    imp.set_defaults(handler=import_nodes)

    lst = commands.add_parser("list", help="list nodes")
    lst.add_argument("-m", "--machines", metavar="NODES", help="node range, e.g. node-[1-16]")
    lst.add_argument("--state", help="only nodes in this state")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=list_nodes)

    show = commands.add_parser("show", help="show one node")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=show_node)

    rm = commands.add_parser("remove", help="remove nodes from the inventory (admins)")
    rm.add_argument("-m", "--machines", metavar="NODES", required=True)
    rm.set_defaults(handler=remove_nodes)

    state = commands.add_parser("set-state", help="set the state of nodes (admins), e.g. down")
    state.add_argument("-m", "--machines", metavar="NODES", required=True)
    state.add_argument("state")
    state.set_defaults(handler=set_state)


def import_nodes(args: argparse.Namespace, context: Context) -> int:
    report = context.front.import_nodes(args.file)
    for label, names in (("added", report.added), ("updated", report.updated), ("unchanged", report.unchanged)):
        if names:
            print(f"{label}: {len(names)} node(s) {fold(names)}")
    return 0


def list_nodes(args: argparse.Namespace, context: Context) -> int:
    nodes = context.front.list_nodes(args.machines, args.state)
    if args.json:
        print_json([n.as_dict() for n in nodes])
        return 0
    print_table(
        ["name", "cluster", "state", "ip", "mac", "switch", "bmc", "environment"],
        [(n.name, n.cluster, n.state, n.ip, n.mac, n.switch, _bmc(n), n.environment or "") for n in nodes],
    )
    return 0


def show_node(args: argparse.Namespace, context: Context) -> int:
    node = context.front.show_node(args.name)
    print_view(node.as_dict(), args.json)
    return 0


def remove_nodes(args: argparse.Namespace, context: Context) -> int:
    names = context.front.remove_nodes(args.machines)
    print(f"removed: {len(names)} node(s) {fold(names)}")
    return 0


def set_state(args: argparse.Namespace, context: Context) -> int:
    names = context.front.set_node_state(args.machines, args.state)
    print(f"{fold(names)}: {args.state}")
    return 0


def _bmc(node: Any) -> str:
    if node.bmc_driver != "ipmi":
        return str(node.bmc_driver)
    return f"ipmi://{node.bmc_address}:{node.bmc_port}"
