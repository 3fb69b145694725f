"""A lab node's power: a supervisor process in the node's namespace that boots it, again at reboot.

"On" means the node's supervisor (``power-supply.sh``) runs. Each boot runs the simulated firmware
as PID 1 of fresh PID, mount, UTS and IPC namespaces (``unshare --kill-child``), inside the node's
network namespace; the system it starts becomes that PID 1. When the system reboots, the kernel ends
that PID namespace with SIGHUP and the supervisor boots again; any other end means power off.
"Off" kills every process of the node's network namespace, which holds only the node's processes.
"""

from __future__ import annotations

import os
import subprocess
import time

from kasched.lab.network import flush_node_addresses
from kasched.lab.nodedir import NodeDir
from kasched.lab.system import kill_and_wait, netns_pids

_SUPERVISOR = """#!/bin/sh
# Power supply of lab node {name}: boot, and boot again when the system reboots.
while :; do
  echo "kasched-lab: power on, booting {name}"
  PYTHONPATH='{pythonpath}' unshare --pid --mount --uts --ipc --fork --kill-child \\
      '{python}' -m kasched.lab.firmware '{nodedir}'
  rc=$?
  # 129 = 128 + SIGHUP: the node's init called reboot(2); anything else is a halt.
  [ "$rc" -eq 129 ] || {{ echo "kasched-lab: {name} halted (status $rc)"; exit 0; }}
  sleep 0.2
done
"""


def write_supervisor(node: NodeDir) -> None:
    facts = node.facts()
    node.power_script.write_text(
        _SUPERVISOR.format(name=facts.name, python=facts.python, pythonpath=facts.pythonpath, nodedir=node.path)
    )
    node.power_script.chmod(0o755)


def is_on(node: NodeDir) -> bool:
    return bool(netns_pids(node.facts().netns))


def power_on(node: NodeDir) -> None:
    """Start the node's supervisor (detached), unless it already runs."""
    facts = node.facts()
    if is_on(node):
        return
    with open(node.console_log, "ab") as console:
        subprocess.Popen(
            ["ip", "netns", "exec", facts.netns, str(node.power_script)],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + 5
    while not is_on(node) and time.monotonic() < deadline:
        time.sleep(0.01)


def power_off(node: NodeDir) -> None:
    """Cut the power: kill every process of the node, drop its network configuration."""
    facts = node.facts()
    for _ in range(3):  # a supervisor caught mid-fork may leave one more process
        pids = [pid for pid in netns_pids(facts.netns) if pid != os.getpid()]
        if not pids:
            break
        kill_and_wait(pids)
    flush_node_addresses(facts.netns)
    with open(node.console_log, "a") as console:
        console.write("kasched-lab: power off\n")


def reset(node: NodeDir) -> None:
    power_off(node)
    power_on(node)
