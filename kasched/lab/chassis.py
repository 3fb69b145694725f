"""The chassis control program ``ipmi_sim`` runs for a lab node's BMC.

``ipmi_sim`` calls it as ``<program> <mc-address> get <parameter>...`` and expects one
``<parameter>:<value>`` line per parameter, or ``<program> <mc-address> set <parameter> <value>``:

* ``power`` 1/0: power the node on / off;  ``reset`` 1: hard reset;
* ``boot`` ``pxe`` / ``default`` / ...: the device of the next boot (stored in the node's ``bootdev``).

Run as ``python -m kasched.lab.chassis <node-dir> <mc-address> get|set ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kasched.lab import power
from kasched.lab.nodedir import NodeDir


def get(node: NodeDir, parameters: list[str]) -> list[str]:
    lines = []
    for parameter in parameters:
        if parameter == "power":
            lines.append(f"power:{1 if power.is_on(node) else 0}")
        elif parameter == "boot":
            lines.append(f"boot:{node.bootdev()}")
    return lines


def set_(node: NodeDir, parameter: str, value: str) -> None:
    if parameter == "power":
        (power.power_on if value == "1" else power.power_off)(node)
    elif parameter == "reset" and value == "1":
        power.reset(node)
    elif parameter == "boot":
        node.set_bootdev(value)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: chassis NODE_DIR MC_ADDRESS get PARAM... | set PARAM VALUE", file=sys.stderr)
        return 2
    node = NodeDir(Path(argv[0]))
    action, rest = argv[2], argv[3:]
    if action == "get":
        print("\n".join(get(node, rest)))
    elif action == "set" and len(rest) >= 2:
        set_(node, rest[0], rest[1])
    else:
        print(f"chassis: unknown request {' '.join(argv[2:])}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
