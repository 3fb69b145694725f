"""Checking the reference partition of nodes against its block list, and rewriting only the blocks
that differ, from the deployment system kaschedd booted.

Each node runs :mod:`kasched.transports.partition_node` (shipped on the command line, standard library
only): ``verify`` prints the hash of each block of the partition as read from its disk, and kaschedd
compares them here with the list computed from its own copy of the image
(:func:`kasched.partition_digest.expected_blocks`): the node's own verdict is never asked for.
``patch`` receives only the blocks its node got wrong, read from kaschedd's copy (decompressed once
for all nodes, each block checked against the list before it is sent), writes them, syncs and
prints the hashes of those blocks read back from the disk, which are compared here again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kasched.deploy.nodes import NodeShell, checked, stdout_of
from kasched.errors import IntegrityError, KaschedError
from kasched.partition_digest import BlockList, ImageCopy, raw_stream, read_blocks
from kasched.results import GroupResult, NodeResult
from kasched.transports import partition_node

NODE_SOURCE = Path(partition_node.__file__).read_text()
HEX = re.compile(r"^[0-9a-f]{64}$")
VERIFY_STEP, PATCH_STEP = "verify-reference", "patch-reference"


@dataclass(frozen=True)
class PartitionCheck:
    """What a node's reference partition holds against the list: the blocks that differ (indexes)."""

    device: str
    differing: tuple[int, ...]

    @property
    def identical(self) -> bool:
        return not self.differing


@dataclass(frozen=True)
class PartitionPatch:
    """The blocks a node wrote to its reference partition (as it reported them), and how many bytes."""

    device: str
    written: tuple[int, ...]
    size: int


def node_command(mode: str, device: str, *numbers: int) -> str:
    """The shell command that runs the node program in ``mode`` on ``device``."""
    arguments = " ".join(str(number) for number in numbers)
    return f"python3 -I -S -c {shlex.quote(NODE_SOURCE)} {mode} {shlex.quote(device)} {arguments}"


def verify_partitions(
    shell: NodeShell, nodes: Mapping[str, str], blocks: BlockList, timeout: float, threads: int = 0
) -> GroupResult:
    """Read and hash the reference partition (``nodes``: name -> device) on every node, compared with
    ``blocks``: ok with a :class:`PartitionCheck` for a node that answered (identical or not), failed
    with the reason for one that could not read its partition or answered something else."""
    results = checked(
        shell.run_each(
            list(nodes),
            lambda node: node_command("verify", nodes[node], blocks.size, blocks.block, threads),
            timeout,
        ),
        "verifying the reference partition",
    )
    group = GroupResult()
    for node, result in results.items():
        if result.ok:
            result = _compared(result, nodes[node], blocks)
        group.add(NodeResult(node, result.ok, VERIFY_STEP, result.error, result.duration, result.value))
    return group


def _compared(result: NodeResult, device: str, blocks: BlockList) -> NodeResult:
    hashes = stdout_of(result).split()
    if len(hashes) != len(blocks.hashes) or not all(HEX.match(value) for value in hashes):
        error = f"verifying the reference partition: {len(hashes)} block hashes answered, {len(blocks.hashes)} expected"
        return NodeResult(result.node, False, VERIFY_STEP, error, result.duration)
    differing = tuple(index for index, value in enumerate(hashes) if value != blocks.hashes[index])
    return NodeResult(result.node, True, VERIFY_STEP, None, result.duration, PartitionCheck(device, differing))


def patch_partitions(
    shell: NodeShell, checks: Mapping[str, PartitionCheck], image: ImageCopy, blocks: BlockList, timeout: float
) -> GroupResult:
    """Rewrite on each node of ``checks`` (the values :func:`verify_partitions` gave) the blocks that
    differ, read from kaschedd's copy of ``image`` (whose list ``blocks`` is): ok with a
    :class:`PartitionPatch` when every block written reads back with its expected hash."""
    needed = sorted({index for check in checks.values() for index in check.differing})
    todo = [node for node, check in checks.items() if check.differing]
    group = GroupResult()
    with tempfile.TemporaryFile(dir=os.path.dirname(image.image_location)) as spool:
        try:
            places = _spool_blocks(spool, image, blocks, needed) if needed else {}
        except KaschedError as error:  # nothing is sent to any node
            sent = GroupResult()
            for node in todo:
                sent.add(NodeResult(node, False, PATCH_STEP, f"patching the reference partition: {error}"))
        else:
            sent = checked(
                shell.feed(
                    todo,
                    lambda node: node_command("patch", checks[node].device, blocks.size, blocks.block),
                    lambda node: _records(spool.fileno(), places, checks[node].differing, blocks),
                    timeout,
                ),
                "patching the reference partition",
            )
    for node, check in checks.items():
        if node not in sent:
            group.add(NodeResult(node, True, PATCH_STEP, None, 0.0, PartitionPatch(check.device, (), 0)))
            continue
        result = sent[node]
        if result.ok:
            result = _read_back(result, check, blocks)
        group.add(NodeResult(node, result.ok, PATCH_STEP, result.error, result.duration, result.value))
    return group


def _spool_blocks(spool: BinaryIO, image: ImageCopy, blocks: BlockList, needed: Sequence[int]) -> dict[int, int]:
    """Copy the ``needed`` blocks of the decompressed image into ``spool`` (one pass over the copy,
    each block checked against the list); where each one is in it."""
    places: dict[int, int] = {}
    wanted = set(needed)
    with raw_stream(image.image_location, image.compression, image.sha256, image.label) as stream:
        for index, data in enumerate(read_blocks(stream, blocks.block)):
            if index not in wanted:
                continue
            if index >= len(blocks.hashes) or hashlib.sha256(data).hexdigest() != blocks.hashes[index]:
                raise IntegrityError(f"block {index} of the image copy does not match its block list")
            places[index] = spool.tell()
            spool.write(data)
    spool.flush()
    if len(places) != len(wanted):
        raise IntegrityError("the image copy is shorter than its block list")
    return places


def _records(fd: int, places: Mapping[int, int], indexes: Sequence[int], blocks: BlockList) -> Iterator[bytes]:
    """The patch records of ``indexes``: a header (offset, length) and the block, read from the spool."""
    for index in indexes:
        offset, length = blocks.extent(index)
        data = os.pread(fd, length, places[index])
        yield partition_node.RECORD.pack(offset, length) + data


def _read_back(result: NodeResult, check: PartitionCheck, blocks: BlockList) -> NodeResult:
    answered: dict[int, str] = {}
    for line in stdout_of(result).splitlines():
        with contextlib.suppress(ValueError):
            offset, value = line.split()
            answered[int(offset)] = value
    for index in check.differing:
        start, _ = blocks.extent(index)
        if answered.get(start) != blocks.hashes[index]:
            error = f"patching the reference partition: block {index} does not read back as the image's"
            return NodeResult(result.node, False, PATCH_STEP, error, result.duration)
    written = tuple(sorted(offset // blocks.block for offset in answered))
    size = sum(blocks.extent(index)[1] for index in written)
    patched = PartitionPatch(check.device, written, size)
    return NodeResult(result.node, True, PATCH_STEP, None, result.duration, patched)
