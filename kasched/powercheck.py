"""Reconcile's check of idle nodes against their BMCs: a node recorded as running a system whose BMC
says it is off, or cannot say, is not what kasched records.

A deploy job's user can power their node off through its BMC, or with ``kasched power off``, and
neither changes the node's recorded state; as root on the node they can also reconfigure its BMC from
inside (in-band IPMI) so that it refuses kasched or stops answering. A node recorded ``reference``
that is off, or whose BMC kasched can no longer ask, must not be handed to the next job as clean.

So for every node recorded ``reference`` or ``deployed`` that no active grant and no running operation
holds, reconcile asks the BMC for its power status (through the node's power driver, as
``kasched power status`` does), in parallel, each BMC given ``timeout`` seconds. A node whose BMC says
off, answers with an error, or does not answer in time is reported and marked ``deploy_failed`` (the
reason in its history, ``kasched stats --kind reconcile``): the orphan sweep then gives it back through
the trusted revert, which power-cycles it from its BMC. A node kasched cannot address at all (no power
driver, credentials or BMC address in the site's inventory: the site's configuration, not the node's
doing) is reported as not checked and left as it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from kasched.api import Kasched
from kasched.deploy import reclaim
from kasched.deploy.operations import Operations
from kasched.deploy.targets import targets
from kasched.drivers.base import NodeTarget, PowerDriver, PowerState
from kasched.errors import KaschedError
from kasched.messages import StepEvent
from kasched.models import Node, NodeState, Operation, OperationNode, OperationState, utcnow

CHECKED = (NodeState.REFERENCE, NodeState.DEPLOYED)  # recorded as running a system
BMC_TIMEOUT = 5.0  # seconds each BMC has to answer
FANOUT = 64  # BMCs asked at once


@dataclass(frozen=True)
class PowerFinding:
    """A node whose BMC contradicts its recorded state (or could not be asked)."""

    node: str
    recorded: str  # its recorded state when asked
    bmc: str  # what the BMC said: "off", "cannot tell: ...", "no answer in 5 s", "not checked: ..."
    marked: bool = False  # set deploy_failed, for the orphan sweep to give back

    @property
    def checked(self) -> bool:
        return not self.bmc.startswith("not checked")


@dataclass(frozen=True)
class _Idle:
    state: NodeState
    changed_at: datetime


def idle_nodes(session: Session) -> dict[str, _Idle]:
    """Nodes recorded ``reference`` or ``deployed`` that no active grant and no running operation holds."""
    rows = session.execute(select(Node.name, Node.state, Node.state_changed_at).where(Node.state.in_(CHECKED))).all()
    found = {name: _Idle(state, changed) for name, state, changed in rows}
    taken = reclaim.held(session, list(found)) | _in_running_operations(session)
    return {name: idle for name, idle in found.items() if name not in taken}


def _in_running_operations(session: Session) -> set[str]:
    running = (
        select(OperationNode.node)
        .join(Operation, Operation.id == OperationNode.deployment_id)
        .where(Operation.state == OperationState.RUNNING)
    )
    return set(session.scalars(running))


def check(api: Kasched, *, dry_run: bool = False, timeout: float = BMC_TIMEOUT) -> list[PowerFinding]:
    """Ask the BMC of every idle node recorded as running a system; mark (unless ``dry_run``) those
    whose BMC says off or cannot say. The findings, by node name."""
    with api.database.session() as session:
        idle = idle_nodes(session)
    answers = ask_bmcs(api, sorted(idle), timeout)
    findings = [
        PowerFinding(name, idle[name].state.value, answer) for name, answer in answers.items() if answer != "on"
    ]
    if dry_run:
        return findings
    marked = _mark(api, {f.node: idle[f.node] for f in findings if f.checked}, {f.node: f.bmc for f in findings})
    return [PowerFinding(f.node, f.recorded, f.bmc, f.node in marked) for f in findings]


def ask_bmcs(api: Kasched, names: Sequence[str], timeout: float) -> dict[str, str]:
    """Each node's power status as its BMC gives it ("on", "off", "cannot tell: ...", "no answer in
    N s", "not checked: ..."), FANOUT BMCs at a time, none waited on longer than ``timeout`` seconds
    (a BMC that hangs is left to its own thread, a daemon)."""
    answers: dict[str, str] = {}
    asking: list[_Asking] = []
    wanted = set(names)
    views = {view.name: view for view in api.list_nodes() if view.name in wanted}
    operations = Operations(api)
    for name in names:
        try:
            target = targets(api.config, [views[name]])[0]
            driver = operations._power_drivers([views[name]], {name: target})[name]
        except KeyError:
            continue  # removed from the inventory meanwhile
        except KaschedError as error:
            answers[name] = f"not checked: {error}"
            continue
        asking.append(_Asking(name, driver, target))
    for start in range(0, len(asking), FANOUT):
        batch = asking[start : start + FANOUT]
        for one in batch:
            one.thread.start()
        deadline = time.monotonic() + timeout
        for one in batch:
            one.thread.join(max(0.0, deadline - time.monotonic()))
            answers[one.name] = one.answer or f"no answer in {timeout:g} s"
    return {name: answers[name] for name in names if name in answers}


class _Asking:
    """One node's question to its BMC, in a daemon thread."""

    def __init__(self, name: str, driver: PowerDriver, target: NodeTarget) -> None:
        self.name, self.answer = name, ""
        self.thread = threading.Thread(target=self._ask, args=(driver, target), daemon=True, name=f"bmc-{name}")

    def _ask(self, driver: PowerDriver, target: NodeTarget) -> None:
        try:
            state = driver.status(target)
        except KaschedError as error:
            self.answer = f"cannot tell: {error}"
            return
        except Exception as error:  # a driver plugin's own failure: the BMC could not be asked
            self.answer = f"cannot tell: {type(error).__name__}: {error}"
            return
        self.answer = "on" if state == PowerState.ON else "off"


def _mark(api: Kasched, seen: dict[str, _Idle], why: dict[str, str]) -> set[str]:
    """Set to ``deploy_failed`` each node still as it was when its BMC was asked (same state, unchanged
    since, still idle), in one transaction; record why in its history. The nodes marked."""
    if not seen:
        return set()
    marked: set[str] = set()
    with api.database.session() as session:
        nodes = session.scalars(select(Node).where(Node.name.in_(list(seen))).order_by(Node.id).with_for_update())
        still = idle_nodes(session)
        for node in nodes:
            if node.name in still and still[node.name] == seen[node.name]:
                node.state, node.state_changed_at = NodeState.DEPLOY_FAILED, utcnow()
                node.trusted, node.host_key = False, None  # whatever it boots next, kasched did not boot it
                marked.add(node.name)
    for name in sorted(marked):
        reason = f"recorded {seen[name].state.value} but its BMC: {why[name]}: marked deploy_failed, to give back"
        api.record_step(
            StepEvent(
                kind="reconcile",
                node=name,
                user=api.caller.user,
                step="power_check",
                variant="",
                attempt=1,
                started_at=utcnow(),
                duration=0.0,
                ok=False,
                error=reason,
            )
        )
    return marked
