"""``kasched deploy``, ``revert``, ``reboot`` and ``power``: operations on the nodes of your job."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasched.cli.common import Context, print_json, print_table
from kasched.cli.progress import ProgressView
from kasched.errors import InputError
from kasched.nodeset import expand, fold

if TYPE_CHECKING:
    from kasched.deploy.operations import OperationResult
    from kasched.deploy.records import DeploymentView
    from kasched.front import Listener


def register(subparsers: Any) -> None:
    deploy = subparsers.add_parser("deploy", help="deploy an environment on nodes")
    deploy.add_argument("-e", "--env", metavar="NAME[@OWNER][:VERSION]")
    _node_arguments(deploy)
    deploy.add_argument("-k", "--key", metavar="PUBKEY", help="public SSH key to install for root")
    deploy.add_argument("-o", "--ok-file", metavar="FILE", help="write the nodes that succeeded here")
    deploy.add_argument("-n", "--failed-file", metavar="FILE", help="write the nodes that failed here")
    deploy.add_argument("--fanout", type=int, default=0, help="tree exec fan-out (0: direct)")
    deploy.add_argument("--stateless", action="store_true", help="boot the environment into RAM, no disk write")
    deploy.add_argument("--cancel", metavar="ID", help="cancel a running deployment")
    deploy.add_argument("--status", metavar="ID", help="show a deployment and its nodes")
    deploy.add_argument("--list", action="store_true", help="list the running and recent operations (admins: anyone's)")
    deploy.add_argument("--running", action="store_true", help="with --list: the running operations only")
    deploy.add_argument("--json", action="store_true")
    deploy.set_defaults(handler=deploy_command)

    revert = subparsers.add_parser("revert", help="return nodes to the site's reference environment")
    _node_arguments(revert)
    revert.add_argument("--json", action="store_true")
    revert.set_defaults(handler=revert_command)

    reboot = subparsers.add_parser("reboot", help="reboot nodes")
    _node_arguments(reboot)
    reboot.add_argument("--level", choices=["soft", "hard", "very_hard"], default="soft")
    reboot.add_argument("--to", default="reference", metavar="reference|deploy|ENV")
    reboot.add_argument("--json", action="store_true")
    reboot.set_defaults(handler=reboot_command)

    power = subparsers.add_parser("power", help="power nodes on or off, or show their power state")
    power.add_argument("action", choices=["on", "off", "status"])
    _node_arguments(power)
    power.add_argument("--json", action="store_true")
    power.set_defaults(handler=power_command)


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--machines", metavar="NODES", action="append", help="node range (repeatable)")
    parser.add_argument("-f", "--file", metavar="NODEFILE", help="file of node names, one per line")


def job_nodes(args: argparse.Namespace) -> list[str]:
    """The nodes named with -m/-f, or else those of the job this command runs in."""
    names: list[str] = []
    for pattern in args.machines or []:
        names.extend(expand(pattern))
    if args.file:
        try:
            names.extend(line.strip() for line in Path(args.file).read_text().splitlines() if line.strip())
        except OSError as error:
            raise InputError(f"{args.file}: {error.strerror}", field="file") from None
    if not names and os.environ.get("SLURM_JOB_NODELIST"):
        names = expand(os.environ["SLURM_JOB_NODELIST"], field="SLURM_JOB_NODELIST")
    if not names and os.environ.get("OAR_NODEFILE"):
        try:
            names = Path(os.environ["OAR_NODEFILE"]).read_text().split()
        except OSError as error:
            raise InputError(f"OAR_NODEFILE: {error.strerror}", field="nodes") from None
    if not names:
        raise InputError("no nodes: give -m NODES or -f NODEFILE, or run inside a deploy job", field="nodes")
    return list(dict.fromkeys(names))


@contextmanager
def cancellable() -> Iterator[threading.Event]:
    """Ctrl-C sets the event (the operation stops after its current step, nodes in a known state);
    a second Ctrl-C stops at once."""
    cancel = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        print("\nkasched: cancelling after the current step (Ctrl-C again to stop at once)", file=sys.stderr)
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def deploy_command(args: argparse.Namespace, context: Context) -> int:
    front = context.front
    if args.cancel:
        front.cancel(args.cancel)
        print(f"deployment {args.cancel}: cancel requested")
        return 0
    if args.status:
        return _show_status(front.status(args.status), args.json)
    if args.list:
        return _show_list(front.operations(running=args.running), args.json)
    if not args.env:
        raise InputError("give the environment to deploy with -e NAME[@OWNER][:VERSION]", field="env")
    key = _read_key(args.key)
    nodes = job_nodes(args)
    return _run(
        args,
        len(nodes),
        lambda listener, stop: front.deploy(
            args.env, nodes, key, stateless=args.stateless, fanout=args.fanout, listener=listener, stop=stop
        ),
    )


def revert_command(args: argparse.Namespace, context: Context) -> int:
    nodes = job_nodes(args)
    return _run(args, len(nodes), lambda listener, stop: context.front.revert(nodes, listener=listener, stop=stop))


def reboot_command(args: argparse.Namespace, context: Context) -> int:
    from kasched.drivers.reboot import RebootLevel

    nodes = job_nodes(args)
    level, front = RebootLevel(args.level), context.front
    return _run(
        args, len(nodes), lambda listener, stop: front.reboot(nodes, level, args.to, listener=listener, stop=stop)
    )


def power_command(args: argparse.Namespace, context: Context) -> int:
    nodes = job_nodes(args)
    results = [r.as_dict() for r in context.front.power(nodes, args.action)]
    if args.json:
        print_json(results)
    else:
        print_table(
            ["node", "result", "detail"],
            [(r["node"], "ok" if r["ok"] else "failed", r["value"] if r["ok"] else r["error"]) for r in results],
        )
    return 0 if all(r["ok"] for r in results) else 1


def _run(
    args: argparse.Namespace, count: int, operation: Callable[[Listener, threading.Event], OperationResult]
) -> int:
    """Run an operation through the front, its progress in the live view; print its result."""
    view = ProgressView(count)
    with cancellable() as stop:
        try:
            result = operation(view, stop)
        finally:
            view.close()
    _write_node_files(args, result.succeeded, result.failed)
    if args.json:
        print_json(
            {
                "id": result.deployment_id,
                "kind": result.kind,
                "state": result.state,
                "nodes": {n: o.as_dict() for n, o in result.results.items()},
            }
        )
    else:
        print(
            f"{result.kind} {result.deployment_id}: {result.state}; ok {fold(result.succeeded) or '-'}"
            f"; failed {fold(result.failed) if result.failed else '-'}"
        )
        print_table(
            ["node", "result", "step", "variant", "seconds", "error"],
            [
                (n, "ok" if o.ok else "failed", o.step, _variant(o), f"{o.duration:.1f}", o.error or "")
                for n, o in result.results.items()
            ],
        )
    return 0 if not result.failed else 1


def _variant(outcome: Any) -> str:
    """The variant that worked, and those of its step that failed before it (``pxe (after kexec)``)."""
    prefix = f"{outcome.step}/"
    failed = [e.split(":", 1)[0].removeprefix(prefix) for e in outcome.fallbacks if e.startswith(prefix)]
    return f"{outcome.variant} (after {', '.join(failed)})" if outcome.ok and failed else outcome.variant


def _write_node_files(args: argparse.Namespace, ok: list[str], failed: list[str]) -> None:
    for path, names in ((getattr(args, "ok_file", None), ok), (getattr(args, "failed_file", None), failed)):
        if path:
            Path(path).write_text("".join(f"{name}\n" for name in names))


def _read_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as error:
        raise InputError(f"{path}: {error.strerror}", field="key") from None


def _show_list(listed: list[DeploymentView], as_json: bool) -> int:
    """Operations, newest first: one line each (their nodes folded)."""
    if as_json:
        print_json([{key: value for key, value in vars(shown).items() if key != "steps"} for shown in listed])
        return 0
    print_table(
        ["id", "kind", "user", "state", "environment", "started", "nodes"],
        [
            (
                d.id,
                d.kind,
                d.user,
                d.state,
                d.environment or "-",
                f"{d.created_at:%Y-%m-%d %H:%M:%S}",
                fold(list(d.nodes)),
            )
            for d in listed
        ],
    )
    return 0


def _show_status(shown: DeploymentView, as_json: bool) -> int:
    if as_json:
        print_json(vars(shown))
        return 0
    print(f"{shown.kind} {shown.id} of {shown.user}: {shown.state} ({shown.environment or '-'})")
    print_table(
        ["node", "result", "step", "seconds", "error"],
        [
            (
                n,
                ("ok" if d["ok"] else "failed") if isinstance(d["ok"], bool) else "running",
                d["step"],
                f"{d['duration']:.1f}",
                d["error"] or "",
            )
            for n, d in shown.nodes.items()
        ],
    )
    return 0
