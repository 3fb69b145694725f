"""The simulated nodes' state on disk (``<state_dir>/simulated-nodes.json``), so that every process
that drives them sees the same nodes: kaschedd, the ``kasched job reclaim`` it starts at a job's
end, a CLI run on the site. Each node carries a version (the wall clock in ns of its last change); a
process merges what is on disk node by node, newest version first, before it writes, and reads the
file again at each operation's start when another process changed it. Two processes never change
one node at once: an operation holds its nodes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kasched.drivers.base import BootTarget, NodeTarget
from kasched.simulated.node import Content, Profile, SimulatedNode

NODES = "simulated-nodes.json"
TARGET_FIELDS = ("name", "mac", "ip", "disk_device", "reference_partition", "deploy_partition")


def record(node: SimulatedNode, now: float, wall_now: float) -> dict[str, Any]:
    """``node`` as JSON data; its up time as seconds from now (monotonic clocks differ per process)."""
    profile = node.profile
    partitions, changed = node.partitions.items(), node.changed.items()
    return {
        "version": node.version,
        "target": {name: getattr(node.target, name) for name in TARGET_FIELDS},
        "powered": node.powered,
        "system": node.system,
        "up_in": None if node.up_at == float("inf") else node.up_at - now,
        "at": wall_now,
        "host_key": node.host_key,
        "token": node.token,
        "profile": None if profile is None else {**asdict(profile), "target": profile.target.value},
        "network_boot": node.network_boot,
        "partitions": {device: [content.sha256, content.raw is not None] for device, content in partitions},
        "changed": {device: {str(index): value for index, value in blocks.items()} for device, blocks in changed},
        "boots": node.boots,
    }


def restore(contents: dict[str, Content], data: dict[str, Any], now: float, wall_now: float) -> SimulatedNode:
    """The node ``data`` describes (its contents looked up among the site's ``contents``)."""
    target = NodeTarget(**data["target"])
    node = SimulatedNode(target)
    node.version = data["version"]
    node.powered, node.system, node.host_key = data["powered"], data["system"], data["host_key"]
    up_in = data["up_in"]
    node.up_at = float("inf") if up_in is None else now + up_in - (wall_now - data["at"])
    node.token, node.network_boot, node.boots = data["token"], data["network_boot"], data["boots"]
    if data["profile"] is not None:
        profile = dict(data["profile"])
        profile["target"] = BootTarget(profile["target"])
        node.profile = Profile(**profile)
    node.partitions = {device: _content(contents, sha, raw) for device, (sha, raw) in data["partitions"].items()}
    node.changed = {device: {int(i): v for i, v in blocks.items()} for device, blocks in data["changed"].items()}
    return node


def _content(contents: dict[str, Content], sha256: str, raw: bool) -> Content:
    found = contents.get(sha256)
    return found if found is not None else Content(sha256)  # raw bytes not known here: a verify then fails


def read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data: dict[str, dict[str, Any]] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def write(path: Path, nodes: dict[str, dict[str, Any]]) -> int:
    """Write atomically; the new file's stamp."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(nodes, separators=(",", ":")))
    temporary.replace(path)
    return path.stat().st_mtime_ns
