"""The service fixture: kaschedd on a scratch site with the sample inventory, in a thread."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kasched.compose import open_site
from kasched.config import Config
from kasched.identity import Caller
from kasched.service.client import ServiceClient
from kasched.service.main import serve
from tests.conftest import EXAMPLES


def scratch_config(base: Path, **settings: Any) -> Config:
    """A site under ``base`` with the sample inventory imported, readable by ordinary users."""
    base.chmod(0o755)
    config = Config(
        site="t",
        state_dir=base / "state",
        admin_group="kasched-test-admins",
        credentials_file=base / "credentials.yaml",  # the sample inventory's BMCs: operations can start
        **settings,
    )
    config.credentials_file.write_text("demo-bmc: {user: admin, password: pw}\n")
    admin = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    admin.import_nodes(EXAMPLES / "cluster.yaml")
    admin.close()
    config.state_dir.chmod(0o755)
    return config


@contextmanager
def kaschedd(config: Config) -> Iterator[ServiceClient]:
    """kaschedd serving ``config`` in a thread of this process, until the block ends."""
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(config, config.service_socket, ready, stop), daemon=True)
    thread.start()
    assert ready.wait(30), "kaschedd did not start"
    try:
        yield ServiceClient(config.service_socket)
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def service() -> Iterator[tuple[Config, ServiceClient]]:
    base = Path(tempfile.mkdtemp(prefix="kaschedd-"))
    config = scratch_config(base)
    try:
        with kaschedd(config) as client:
            yield config, client
    finally:
        shutil.rmtree(base, ignore_errors=True)
