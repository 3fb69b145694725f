"""Chain agents for transport tests and benches: real agent processes listening on 127.0.x.y, each running
the program shipped to nodes (``chain_ssh.agent_program(key)``) read on its stdin, as over SSH, under
``python3 -I -S``: it must need nothing but the standard library. The group's ``key`` is the one to
broadcast to them with."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kasched.transports.chain import ChainNode
from kasched.transports.chain_ssh import AGENT_FLAGS, agent_program, new_key


@dataclass
class AgentGroup:
    """``count`` agents; node i listens on 127.<subnet>.0.<i+1>, on switch sw<i // per_switch>."""

    count: int
    subnet: int = 42
    per_switch: int = 4
    accept_timeout: float = 60.0
    # where node i runs: (argv prefix, listen address); None: on this host, on 127.<subnet>.0.<i+1>
    placement: Callable[[int], tuple[list[str], str]] | None = None
    key: bytes = field(default_factory=new_key)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nodes: list[ChainNode] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> AgentGroup:
        try:
            for index in range(self.count):
                self._start_one(index)
            deadline = time.monotonic() + timeout
            self.nodes = [self._wait_ready(name, deadline) for name in self.processes]
        except BaseException:
            self.stop()
            raise
        return self

    def _start_one(self, index: int) -> None:
        name = f"a{index + 1:02d}"
        prefix, host = self.placement(index) if self.placement else ([], f"127.{self.subnet}.0.{index + 1}")
        argv = [*prefix, sys.executable, *AGENT_FLAGS.split(), "-", "--listen", f"{host}:0"]
        argv += ["--name", name, "--accept-timeout", str(self.accept_timeout)]
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.processes[name] = process
        assert process.stdin is not None
        process.stdin.write(agent_program(self.key))
        process.stdin.close()

    def _wait_ready(self, name: str, deadline: float) -> ChainNode:
        process = self.processes[name]
        assert process.stdout is not None
        if not select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise RuntimeError(f"agent {name} did not start")
        line = process.stdout.readline().decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"agent {name} failed: {process.stderr.read().decode() if process.stderr else ''}")
        index = int(name[1:]) - 1
        return ChainNode(name, line[1], switch=f"sw{index // self.per_switch}", rack="r1")

    def wait(self, timeout: float = 30.0) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
