"""``kasched console -m NODE``: a node's console, for the holder of a grant on it (or an admin)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kasched.cli.common import Context
from kasched.errors import InputError


def register(subparsers: Any) -> None:
    console = subparsers.add_parser("console", help="a node's console (the nodes of your grants; admins any)")
    console.add_argument("-m", "--node", required=True, metavar="NODE", help="one node")
    console.add_argument("-n", "--lines", type=int, default=40, help="how many last lines (default 40)")
    console.add_argument("-f", "--follow", action="store_true", help="then print what comes, until Ctrl-C")
    console.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    console.set_defaults(handler=show_console)


def show_console(args: argparse.Namespace, context: Context) -> int:
    if args.lines < 0:
        raise InputError("expected zero or more", field="--lines")
    if "," in args.node or "[" in args.node:
        raise InputError("one node at a time", field="--node")
    shown = context.front.console(args.node, None, args.lines)
    sys.stdout.write(shown.text)
    sys.stdout.flush()
    try:
        while args.follow:
            time.sleep(args.interval)
            shown = context.front.console(args.node, shown.offset, args.lines)
            sys.stdout.write(shown.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0
