"""``kasched deploy``, ``revert``, ``reboot`` and ``power``: operations on the nodes of your job."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from kasched.cli.common import Context, print_json, print_table
from kasched.cli.progress import ProgressView
from kasched.deploy.workflow import TransferReport
from kasched.errors import DatabaseError, InputError, KaschedError, NodesBeingGivenBack
from kasched.messages import StepEvent
from kasched.models import utcnow
from kasched.nodeset import expand, fold

T = TypeVar("T")


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
    from kasched.deploy import records

    if context.remote:
        return _deploy_remote(args, context)
    if args.cancel:
        with context.api.database.session() as session:
            records.request_cancel(session, args.cancel, context.api.caller.user, context.api.caller.is_admin)
        print(f"deployment {args.cancel}: cancel requested")
        return 0
    if args.status:
        with context.api.database.session() as session:
            shown = records.view(session, args.status)
        return _show_status(shown, args.json)
    if not args.env:
        raise InputError("give the environment to deploy with -e NAME[@OWNER][:VERSION]", field="env")
    key = _read_key(args.key)
    nodes = job_nodes(args)
    return _run(args, context, lambda ops: ops.deploy(args.env, nodes, key, stateless=args.stateless), len(nodes))


def revert_command(args: argparse.Namespace, context: Context) -> int:
    nodes = job_nodes(args)
    if context.remote:
        return _run_remote(args, context, {"kind": "revert", "nodes": ",".join(nodes)}, len(nodes))
    return _run(args, context, lambda ops: ops.revert(nodes), len(nodes))


def reboot_command(args: argparse.Namespace, context: Context) -> int:
    from kasched.drivers.reboot import RebootLevel

    nodes = job_nodes(args)
    if context.remote:
        body = {"kind": "reboot", "nodes": ",".join(nodes), "level": args.level, "to": args.to}
        return _run_remote(args, context, body, len(nodes))
    return _run(args, context, lambda ops: ops.reboot(nodes, RebootLevel(args.level), args.to), len(nodes))


def power_command(args: argparse.Namespace, context: Context) -> int:
    from kasched.deploy.operations import Operations

    nodes = job_nodes(args)
    if context.remote:  # the BMCs and their credentials are the service's
        body = {"action": args.action, "nodes": ",".join(nodes)}
        results = context.api.call("POST", "/v1/power", body=body)
    else:
        results = [r.as_dict() for r in Operations(context.api).power(nodes, args.action).values()]
    if args.json:
        print_json(results)
    else:
        print_table(
            ["node", "result", "detail"],
            [(r["node"], "ok" if r["ok"] else "failed", r["value"] if r["ok"] else r["error"]) for r in results],
        )
    return 0 if all(r["ok"] for r in results) else 1


def when_given_back(start: Callable[[], T], limit: float, view: ProgressView, cancel: threading.Event) -> T:
    """``start()``; while it is refused only because the nodes are still being given back after their
    previous job, say so in the live view and try again every POLL seconds, for at most ``limit``."""
    deadline = time.monotonic() + limit
    said = ""
    while True:
        try:
            return start()
        except NodesBeingGivenBack as error:
            if time.monotonic() >= deadline:
                waited = f" for {limit:g} s (revert_wait)" if limit else " (revert_wait: 0)"
                raise NodesBeingGivenBack(f"{error}; waited{waited}; try again later") from None
            if str(error) != said:
                view.waiting(f"{error}: waiting for it, at most {limit:g} s")
                said = str(error)
        if cancel.wait(POLL):
            raise KaschedError("interrupted while waiting for the nodes to be given back: nothing was started")


def _run(args: argparse.Namespace, context: Context, operation: Any, count: int) -> int:
    from kasched.deploy.operations import Operations

    view = ProgressView(count)
    with cancellable() as cancel:
        ops = Operations(context.api, progress=view, cancel=cancel, fanout=getattr(args, "fanout", 0))
        try:
            result = when_given_back(lambda: operation(ops), context.config.revert_wait, view, cancel)
        finally:
            view.close()
    _write_node_files(args, result.succeeded, result.failed)
    if args.json:
        print_json(
            {
                "id": result.deployment_id,
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


def _show_status(shown: Any, as_json: bool) -> int:
    if as_json:
        print_json(vars(shown))
        return 0
    print(f"{shown.kind} {shown.id} of {shown.user}: {shown.state} ({shown.environment or '-'})")
    print_table(
        ["node", "result", "step", "seconds", "error"],
        [
            (
                n,
                {True: "ok", False: "failed", None: "running"}[d["ok"]],
                d["step"],
                f"{d['duration']:.1f}",
                d["error"] or "",
            )
            for n, d in shown.nodes.items()
        ],
    )
    return 0


# --- Through kaschedd: start, then follow the operation by polling its record ---------------------------

POLL = 1.0
RESTART_WAIT = 180.0  # how long the command waits for a kaschedd that stopped answering (a restart)


def _deploy_remote(args: argparse.Namespace, context: Context) -> int:
    api = context.api
    if args.cancel:
        api.call("POST", f"/v1/deployments/{args.cancel}/cancel")
        print(f"deployment {args.cancel}: cancel requested")
        return 0
    if args.status:
        return _show_status(SimpleNamespace(**api.call("GET", f"/v1/deployments/{args.status}")), args.json)
    if not args.env:
        raise InputError("give the environment to deploy with -e NAME[@OWNER][:VERSION]", field="env")
    nodes = job_nodes(args)
    body = {
        "kind": "deploy",
        "nodes": ",".join(nodes),
        "environment": args.env,
        "key": _read_key(args.key),
        "stateless": args.stateless,
        "fanout": args.fanout,
    }
    return _run_remote(args, context, body, len(nodes))


def _run_remote(args: argparse.Namespace, context: Context, body: dict[str, Any], count: int) -> int:
    api = context.api
    view: ProgressView = ProgressView(count)
    seen = _Seen()
    with cancellable() as cancel:
        asked = False
        try:
            start = lambda: api.call("POST", "/v1/deployments", body=body)  # noqa: E731
            operation_id = when_given_back(start, context.config.revert_wait, view, cancel)["id"]
            print(
                f"{body['kind']} {operation_id} started in kaschedd (kasched deploy --status {operation_id})",
                file=sys.stderr,
            )
            while True:
                shown = _poll(api, operation_id)
                _show_poll(shown, view, seen)
                if shown["state"] != "running":
                    break
                if cancel.is_set() and not asked:
                    api.call("POST", f"/v1/deployments/{operation_id}/cancel")
                    asked = True
                time.sleep(POLL)
        finally:
            view.close()
    ok = [n for n, d in shown["nodes"].items() if d["ok"]]
    failed = [n for n, d in shown["nodes"].items() if not d["ok"]]
    _write_node_files(args, ok, failed)
    if args.json:
        print_json(shown)
    else:
        print(
            f"{shown['kind']} {operation_id}: {shown['state']}; ok {fold(ok) if ok else '-'}; "
            f"failed {fold(failed) if failed else '-'}"
        )
        _show_status(SimpleNamespace(**shown), False)
    return 0 if not failed else 1


def _poll(api: Any, operation_id: str) -> dict[str, Any]:
    """The operation's record. While kaschedd does not answer (it is restarting), keep asking for a
    while: after a crash, the restarted service marks the operation interrupted, and that is shown."""
    deadline, warned = time.monotonic() + RESTART_WAIT, False
    while True:
        try:
            shown: dict[str, Any] = api.call("GET", f"/v1/deployments/{operation_id}")
            return shown
        except DatabaseError as error:
            if time.monotonic() > deadline:
                raise
            if not warned:
                print(f"\nkasched: {error}; waiting for it to come back", file=sys.stderr)
                warned = True
            time.sleep(POLL)


@dataclass
class _Seen:
    """What the live view was fed already, from the previous polls of the operation's record."""

    history: int = 0  # entries of the step history
    nodes: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # without a history: each node's last state
    steps: set[str] = field(default_factory=set)  # the steps shown
    transfer: dict[str, Any] | None = None


def _show_poll(shown: dict[str, Any], view: ProgressView, seen: _Seen) -> None:
    """Feed the live view (the same as without the service) what happened since the last poll: every
    attempt the operation's history recorded (``final`` false: the node had another retry or variant,
    so it did not fail; older services leave it out: final); without a history, each node's last
    finished step; then the image's broadcast progress, if it streams."""
    history = shown.get("steps") or []
    for entry in history[seen.history :]:
        step, _, variant = str(entry["step"]).partition("/")
        final = entry.get("final") is not False
        seen.steps.add(step)
        duration, ok, error = entry["duration"], entry["ok"], entry["error"]
        view(StepEvent(entry["node"], step, variant, 0, utcnow(), duration, ok, error, final))
    seen.history = len(history)
    if not history:
        _show_nodes(shown, view, seen)
    _show_transfer(shown.get("transfer"), view, seen)


def _show_nodes(shown: dict[str, Any], view: ProgressView, seen: _Seen) -> None:
    for node, detail in shown["nodes"].items():
        state = (detail["step"], detail["error"], detail["ok"])
        if not detail["step"] or seen.nodes.get(node) == state:
            continue
        seen.nodes[node] = state
        seen.steps.add(detail["step"])
        ok = detail["error"] is None if detail["ok"] is None else bool(detail["ok"])
        view(StepEvent(node, detail["step"], "", 0, utcnow(), detail["duration"] or 0.0, ok, detail["error"]))


def _show_transfer(transfer: dict[str, Any] | None, view: ProgressView, seen: _Seen) -> None:
    """The service's latest report of the image's stream (not stored: ``transfer``), once per change.
    A stream of a step the view has left is not shown again (a poll may see the service's report of
    it just before the service forgets it)."""
    if not transfer or transfer == seen.transfer:
        return
    seen.transfer = transfer
    step = str(transfer["step"])
    if step != view.step and step in seen.steps:
        return
    seen.steps.add(step)
    view(TransferReport(step, int(transfer["sent"]), float(transfer["elapsed"]), bool(transfer["done"])))
