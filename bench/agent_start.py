"""What it costs a node to start a chain agent: CPU time per start, the agent's source sent on stdin as
over SSH, with the interpreter's default start-up against the isolated one kasched uses
(``python3 -I -S``: no ``site``, no ``.pth`` files, no user site-packages).

    .venv/bin/python bench/agent_start.py [--starts 30] [--python /usr/bin/python3]

Each start runs the agent until it says ``ready`` and then gives up at once (``--accept-timeout``
0.001 s). The runs of the two ways alternate, so that the machine's load weighs on both alike. The
floor is the bare interpreter (``-I -S -c pass``). Every node of a chain starts one agent when the
broadcast starts: on the lab, where all the nodes share the host's CPUs, that CPU time is the
broadcast's start-up; on a real site each node pays it on its own CPU. Prints milliseconds of CPU
(user + system) per start and the ratio, then ``RATIO`` lines.

The interpreter is by default the system's ``python3`` (the first in ``os.defpath``), the one a
node's deployment system runs, not whichever ``python3`` comes first in ``PATH``: a version
manager's shim there (pyenv's is a bash script) measured 68 ms per bare start against 6 ms.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labkit import ratio_line

from kasched.transports.chain_ssh import AGENT_FLAGS, agent_program, new_key

SYSTEM_PYTHON = shutil.which("python3", path=os.defpath) or "python3"
ARGS = ["-", "--listen", "127.0.0.1:0", "--name", "bench", "--accept-timeout", "0.001"]


def cpu_of(argv: list[str], source: bytes) -> float:
    """CPU seconds (user + system) that one run of ``argv`` took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # microseconds; os.times() counts 10 ms ticks
    done = subprocess.run(argv, input=source, capture_output=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if source and not done.stdout.startswith(b"ready "):
        raise SystemExit(f"the agent did not start: {done.stderr.decode(errors='replace')[-300:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=30, help="starts per way (at least 1)")
    parser.add_argument("--python", default=SYSTEM_PYTHON, help=f"the interpreter (default {SYSTEM_PYTHON})")
    args = parser.parse_args()
    if args.starts < 1:
        parser.error("--starts must be at least 1")
    if shutil.which(args.python) is None:
        parser.error(f"--python {args.python!r}: no such executable")
    program = agent_program(new_key())  # the program shipped to a node, its key written in
    ways = {
        "default": ([args.python, *ARGS], program),
        "isolated": ([args.python, *AGENT_FLAGS.split(), *ARGS], program),
        "bare interpreter": ([args.python, "-I", "-S", "-c", "pass"], b""),
    }
    spent = dict.fromkeys(ways, 0.0)
    for _ in range(args.starts):
        for way, (argv, source) in ways.items():
            spent[way] += cpu_of(argv, source)
    per_start = {way: 1000 * total / args.starts for way, total in spent.items()}
    print(f"chain agent start-up, {args.starts} starts per way, CPU ms per start (user + system)")
    for way, value in per_start.items():
        print(f"  {way:<17} {value:7.1f} ms")
    print(ratio_line("agent start CPU default / isolated", per_start["default"] / per_start["isolated"]))
    floor = per_start["bare interpreter"]
    if floor <= 0:  # the kernel accounted no CPU to so few, so short runs
        raise SystemExit("the bare interpreter's starts took no measurable CPU: take more --starts")
    print(ratio_line("agent start CPU isolated / bare interpreter", per_start["isolated"] / floor))


if __name__ == "__main__":
    main()
