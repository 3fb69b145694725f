"""The lab's HTTP server for boot files: BusyBox ``httpd`` serving the TFTP root on the service
address, port 80, in the lab namespace (iPXE profiles may load kernels and images over HTTP)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from kasched.errors import LabError
from kasched.lab.system import read_pid
from kasched.lab.topology import SERVICE_ADDRESS
from kasched.processes import pid_alive

HTTP_PORT = 80
BOOT_URL = f"http://{SERVICE_ADDRESS}/"


class LabHttp:
    def __init__(self, state_dir: Path, netns: str, root: Path) -> None:
        self.state_dir = state_dir
        self.netns = netns
        self.root = root

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "httpd.pid"

    def running(self) -> bool:
        pid = read_pid(self.pid_file)
        return pid is not None and pid_alive(pid)

    def start(self) -> None:
        if self.running():
            return
        command = ["ip", "netns", "exec", self.netns, "busybox", "httpd", "-f",
                   "-p", f"{SERVICE_ADDRESS}:{HTTP_PORT}", "-h", str(self.root)]  # fmt: skip
        with open(self.state_dir / "httpd.log", "ab") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid_file.write_text(f"{process.pid}\n")
        time.sleep(0.05)
        if process.poll() is not None:
            raise LabError(f"busybox httpd did not start (see {self.state_dir / 'httpd.log'})")
