"""``kasched lab``: build, inspect and remove a virtual cluster (see docs/lab.md)."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

from kasched.cli.common import Context, print_json, print_mapping, print_table
from kasched.errors import InputError, LabError


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser("lab", help="a virtual cluster to try kasched on (needs root)")
    commands = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    up = commands.add_parser("up", help="create the lab, boot its nodes, write its inventory")
    _common(up)
    up.add_argument("--nodes", type=int, default=16, help="number of nodes (default 16)")
    up.add_argument("--switches", type=int, default=1, help="number of switches (default 1)")
    up.add_argument("--link", default="1gbit", help="node link rate, e.g. 100mbit (default 1gbit)")
    up.add_argument("--uplink", default="10gbit", help="rate between switches (default 10gbit)")
    up.add_argument("--cache-dir", type=Path, help="rootfs cache (default /var/cache/kasched-lab)")
    up.add_argument("--boot-timeout", type=float, default=180, help="seconds for all nodes to boot")
    up.add_argument(
        "--kind",
        choices=("namespace", "qemu"),
        default="namespace",
        help="namespace: light nodes sharing the host's kernel (default); qemu: VMs that boot from the network",
    )
    up.add_argument("--json", action="store_true")
    up.set_defaults(handler=lab_up)

    status = commands.add_parser("status", help="show the lab and its nodes")
    _common(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=lab_status)

    down = commands.add_parser("down", help="remove everything the lab created (also after a crash)")
    _common(down)
    down.set_defaults(handler=lab_down)

    run = commands.add_parser("exec", help="run a command inside the lab's network namespace")
    _common(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    run.set_defaults(handler=lab_exec)

    env = commands.add_parser("make-env", help="write a bootable test environment (tar.gz) for the lab")
    _common(env)
    env.add_argument("archive", type=Path, help="the .tar.gz to write")
    env.add_argument("--system", default="userenv", help="what /etc/kasched-system says (default userenv)")
    env.set_defaults(handler=lab_make_env)

    console = commands.add_parser("console", help="print a lab node's console log")
    _common(console)
    console.add_argument("node")
    console.add_argument("-n", "--lines", type=int, default=40)
    console.set_defaults(handler=lab_console)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="lab", help="lab name (default lab)")
    parser.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/kasched-lab/NAME)")


def _lab(args: argparse.Namespace) -> Any:
    from kasched.lab.lab import Lab

    if os.geteuid() != 0:
        raise LabError("kasched lab needs root (network namespaces, loop devices)")
    kwargs: dict[str, Any] = {"name": args.name, "state_dir": args.state_dir}
    if getattr(args, "cache_dir", None):
        kwargs["cache_dir"] = args.cache_dir
    if getattr(args, "kind", None):
        kwargs["kind"] = args.kind
    return Lab(**kwargs)


def lab_up(args: argparse.Namespace, context: Context) -> int:
    from kasched.lab.topology import LabPlan

    plan = LabPlan(args.name, args.nodes, args.switches, args.link, args.uplink)
    lab = _lab(args)
    state = lab.up(plan, boot_timeout=args.boot_timeout)
    if args.json:
        print_json(state)
        return 0
    verb = "was already up" if state.get("already_up") else f"is up in {state.get('up_seconds')} s"
    print(f"lab {args.name} {verb}: {plan.nodes} nodes on {plan.switches} switch(es)")
    print_mapping(
        {
            "inventory": lab.inventory_file,
            "credentials": lab.credentials_file,
            "config": lab.state_dir / "kasched.yaml",
            "ssh key": lab.service_key,
            "enter": f"kasched lab exec --name {args.name} -- COMMAND",
        }
    )
    return 0


def lab_status(args: argparse.Namespace, context: Context) -> int:
    status = _lab(args).status()
    if args.json:
        print_json(status)
        return 0 if status["status"] != "absent" else 3
    if status["status"] == "absent":
        print(f"lab {args.name}: absent ({status['state_dir']})")
        return 3
    print(f"lab {args.name}: {status['status']} ({status['state_dir']}), dnsmasq "
          f"{'running' if status['dnsmasq_running'] else 'STOPPED'}")  # fmt: skip
    rows = [
        (n["node"], n["switch"], n["ip"], n["bmc"], "up" if n["bmc_running"] else "DOWN", n["power"],
         n["bootdev"], "yes" if n["ssh"] else "no", n["disk"])
        for n in status["nodes"]
    ]  # fmt: skip
    print_table(["node", "switch", "ip", "bmc", "bmc_state", "power", "bootdev", "ssh", "disk"], rows)
    return 0


def lab_down(args: argparse.Namespace, context: Context) -> int:
    removed = _lab(args).down()
    print(f"lab {args.name}: removed {len(removed)} item(s)" if removed else f"lab {args.name}: nothing to remove")
    for item in removed:
        print(f"  {item}")
    return 0


def lab_exec(args: argparse.Namespace, context: Context) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise InputError("give the command to run after --")
    lab = _lab(args)
    netns = f"kl-{lab.name}"
    from kasched.lab.system import netns_exists

    if not netns_exists(netns):
        raise LabError(f"lab {lab.name} is not up (no namespace {netns})")
    env = {**os.environ, "KASCHED_LAB_KEY": str(lab.service_key)}
    env.setdefault("KASCHED_CONFIG", str(lab.state_dir / "kasched.yaml"))
    return subprocess.call(["ip", "netns", "exec", netns, *command], env=env)


def lab_console(args: argparse.Namespace, context: Context) -> int:
    lab = _lab(args)
    log = lab.state_dir / "nodes" / args.node / "console.log"
    if not log.exists():
        raise InputError(f"lab {lab.name} has no node {args.node} (no {log})")
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.lines :]))
    return 0


def lab_make_env(args: argparse.Namespace, context: Context) -> int:
    lab = _lab(args)
    if not lab.state_file.exists():
        raise LabError(f"lab {lab.name} is not up ({lab.state_dir}): its keys go into the environment")
    archive = lab.make_environment(args.archive, args.system)
    print(f"{archive}: BusyBox init, DHCP, sshd with the lab's service key; /etc/kasched-system: {args.system}")
    return 0
