"""Helpers of the TCP and console tests: a private munged, a throwaway CA, kaschedd on a scratch site
(listening on its Unix socket and, if asked, on 127.0.0.1 with TLS), and the CLI run as a Unix user."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kasched.compose import open_site
from kasched.config import Config
from kasched.identity import Caller
from kasched.service.main import serve
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import unix_user

ADMIN_GROUP = "kasched-test-admins"


@contextlib.contextmanager
def munged(directory: Path, key: Path | None = None, origin: str = "") -> Iterator[Path]:
    """munged with its own socket in ``directory`` (run as user munge) and a new key (or a copy of
    ``key``: another host of the same site), saying it encodes on ``origin`` if given; yields the socket."""
    if shutil.which("munged", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("munged is not installed (Debian package munge)")
    directory.mkdir(mode=0o755)
    munge = unix_user("munge")
    source = key
    key = directory / "munge.key"
    key.write_bytes(source.read_bytes() if source else os.urandom(128))
    key.chmod(0o400)
    for path in (directory, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = directory / "munge.sock"
    command = [
        "setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--clear-groups",
        "/usr/sbin/munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
        f"--log-file={directory / 'munged.log'}", f"--pid-file={directory / 'munged.pid'}",
        f"--seed-file={directory / 'munged.seed'}", *([f"--origin={origin}"] if origin else []),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if sock.is_socket() or process.poll() is not None:
                break
            time.sleep(0.1)
        if not sock.is_socket():
            pytest.fail(f"munged did not start: {process.stderr.read().decode() if process.poll() is not None else ''}")
        yield sock
    finally:
        process.terminate()
        process.wait(30)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: its certificate and key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    cert.chmod(0o644)
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path], host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``host`` (an IP address) signed by ``ca``."""
    cert, key, request = directory / "server.pem", directory / "server.key", directory / "server.csr"
    subprocess.run(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kaschedd", "-keyout", str(key),
         "-out", str(request)],
        check=True, capture_output=True,
    )  # fmt: skip
    extensions = directory / "san.cnf"
    extensions.write_text(f"subjectAltName=IP:{host}\n")
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Site:
    """A running kaschedd: its configuration, and the client configuration users run the CLI with."""

    config: Config
    client_config: Path
    base: Path

    @property
    def url(self) -> str:
        scheme = "https" if self.config.service_tls_cert != Path() else "http"
        return f"{scheme}://{self.config.service_tcp}"


@contextlib.contextmanager
def kaschedd(base: Path, client: dict[str, str], **settings: object) -> Iterator[Site]:
    """kaschedd (as root, in a thread) on a site with the sample inventory, and ``client`` as the
    client configuration file (besides site, state_dir and admin_group)."""
    config = Config(site="t", state_dir=base / "state", admin_group=ADMIN_GROUP, **settings)  # type: ignore[arg-type]
    admin = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    admin.import_nodes(EXAMPLES / "cluster.yaml")
    admin.close()
    config.state_dir.chmod(0o755)
    for path in config.state_dir.glob("kasched.db*"):
        path.chmod(0o600)
    client_config = base / "client.yaml"
    common = {"site": "t", "state_dir": str(config.state_dir), "admin_group": ADMIN_GROUP}
    client_config.write_text(yaml.safe_dump({**common, **client}))
    client_config.chmod(0o644)
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(config, config.service_socket, ready, stop), daemon=True)
    thread.start()
    assert ready.wait(60), "kaschedd did not start"
    try:
        yield Site(config, client_config, base)
    finally:
        stop.set()
        thread.join(30)


def scratch() -> Path:
    base = Path(tempfile.mkdtemp(prefix="kaschedd-tcp-"))
    base.chmod(0o755)
    return base


def kasched_as(user: str, config_file: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI run as Unix user ``user`` (no supplementary groups), with ``env`` added."""
    environment = {
        "PATH": "/usr/bin:/bin",
        "KASCHED_CONFIG": str(config_file),
        "HOME": "/nonexistent",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        **env,
    }
    prefix = []
    if user != "root":
        entry = unix_user(user)
        prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "kasched", *args], capture_output=True, text=True, env=environment, timeout=120
    )
