"""Environment files against a hostile user (issue 18, audit F1, F2, F8): real Unix users, through a
real kaschedd on its Unix socket. kaschedd reads each file once, at ``env add``, as the user, through
no symlink, regular files only, under the size cap, into its own store; nothing later reads the
user's path again."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kasched.compose import open_site
from kasched.config import Config
from kasched.deploy import steps
from kasched.deploy.operations import Operations
from kasched.identity import Caller
from kasched.service.main import serve
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import unix_user
from tests.test_environments import make_image

ALICE, BOB = "kasched-alice", "kasched-bob"
SECRET = "TOPSECRET-BMC-PASSWORD-7f3a"
CAP = 1 << 20  # image_max_size of this site


@dataclass
class Site:
    config: Config
    config_file: Path
    base: Path
    web: str  # the loopback HTTP server's URL, under image_url_allow

    def kasched(self, user: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI as ``user`` (a real Unix user), through kaschedd's socket."""
        entry = unix_user(user)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KASCHED_CONFIG": str(self.config_file),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}  # fmt: skip
        prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
        return subprocess.run([*prefix, sys.executable, "-m", "kasched", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)  # fmt: skip

    def home(self, user: str) -> Path:
        """A directory of ``user``'s own, mode 700 (nobody else may read what is in it)."""
        path = self.base / user
        path.mkdir(exist_ok=True)
        entry = unix_user(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)
        return path


def give(path: Path, user: str) -> Path:
    entry = unix_user(user)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chown(item, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return path


@pytest.fixture
def site() -> Iterator[Site]:
    for user in (ALICE, BOB):
        unix_user(user)
    base = Path(tempfile.mkdtemp(prefix="kaschedd-files-"))
    base.chmod(0o755)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(base))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a real HTTP server on loopback
    threading.Thread(target=web.serve_forever, daemon=True).start()
    settings = (f"site: t\nstate_dir: {base / 'state'}\nadmin_group: kasched-test-admins\nimage_max_size: {CAP}\n"
                f"image_url_allow: ['http://127.0.0.1:{web.server_address[1]}/']\n")  # fmt: skip
    config_file = base / "kasched.yaml"
    config_file.write_text(settings + f"credentials_file: {base / 'credentials.yaml'}\n")
    config_file.chmod(0o644)
    from kasched.config import load

    config = load(config_file)
    (base / "credentials.yaml").write_text(f"demo-bmc: {{user: admin, password: {SECRET}}}\n")
    (base / "credentials.yaml").chmod(0o600)
    admin = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    admin.import_nodes(EXAMPLES / "cluster.yaml")
    admin.close()
    config.state_dir.chmod(0o755)
    for path in config.state_dir.glob("kasched.db*"):
        path.chmod(0o600)
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(config, config.service_socket, ready, stop), daemon=True)
    thread.start()
    assert ready.wait(30), "kaschedd did not start"
    try:
        yield Site(config, config_file, base, f"http://127.0.0.1:{web.server_address[1]}")
    finally:
        stop.set()
        thread.join(10)
        web.shutdown()
        web.server_close()
        shutil.rmtree(base, ignore_errors=True)


def one_line(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def environment(directory: Path, name: str, extra: str = "", image: str = "root.tar.gz") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(f"name: {name}\nimage: {{file: {image}, kind: tar}}\n{extra}")
    return path


def configure_command_for(config: Config, reference: str, user: str) -> str:
    """The configure command kaschedd builds for node-1 (what the node's shell receives)."""
    api = open_site(config, Caller(user), load_entry_points=False)
    try:
        env = api.show_environment(reference)
    finally:
        api.close()
    ctx = steps.StepContext(targets={}, placement={}, power={}, soft=None, boot=None, shell=None,  # type: ignore[arg-type]
                            environment=env, partition=lambda node: 3)  # fmt: skip
    return steps.configure_command(ctx, "node-1")


def decoded_payloads(command: str) -> list[bytes]:
    return [base64.b64decode(blob) for blob in re.findall(r"echo ([A-Za-z0-9+/=]{8,}) \| base64 -d", command)]


def test_postinstall_swapped_for_a_symlink_after_add_sends_what_was_read_at_add(site: Site) -> None:
    """F1: the script is replaced by a symlink to the BMC credentials after ``env add``; the command
    built for the node carries the script read at add time, and nothing of the secret."""
    home = give(site.home(ALICE), ALICE)
    make_image(home)
    (home / "scripts").mkdir()
    (home / "scripts" / "later.sh").write_text("#!/bin/sh\necho harmless-script-read-at-add\n")
    give(home, ALICE)
    added = site.kasched(
        ALICE, "env", "add", str(environment(give(home, ALICE), "f1", "postinstall: [scripts/later.sh]\n"))
    )
    assert added.returncode == 0, added.stderr
    script = home / "scripts" / "later.sh"
    script.unlink()
    script.symlink_to(site.base / "credentials.yaml")  # what the attacker does next
    os.chown(script, unix_user(ALICE).pw_uid, -1, follow_symlinks=False)
    checked = site.kasched(ALICE, "env", "check", "f1")
    assert checked.returncode == 0, checked.stderr
    command = configure_command_for(site.config, f"f1@{ALICE}", ALICE)
    payloads = decoded_payloads(command)
    assert payloads == [b"#!/bin/sh\necho harmless-script-read-at-add\n"]
    assert SECRET not in command and all(SECRET.encode() not in p for p in payloads)
    assert base64.b64encode(SECRET.encode())[:12].decode() not in command
    # A symlink at add time is refused in one line, and so is a root-only file.
    refused = site.kasched(ALICE, "env", "add", str(environment(home, "f1b", "postinstall: [scripts/later.sh]\n")))
    one_line(refused, 2, "a symbolic link")
    (home / "scripts" / "root.sh").write_text("secret\n")
    (home / "scripts" / "root.sh").chmod(0o600)
    refused = site.kasched(ALICE, "env", "add", str(environment(home, "f1c", "postinstall: [scripts/root.sh]\n")))
    one_line(refused, 5, "you may not read")


RACE_CLIENT = """
import json, sys, time
from kasched.service.client import ServiceClient
socket_path, description, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
text = open(description).read()
client, outcomes, end = ServiceClient(socket_path, timeout=30), {}, time.monotonic() + seconds
while time.monotonic() < end:
    status, answer = client.request("POST", "/v1/environments", body={"path": description, "text": text})
    key = "added" if status == 201 or status == 200 else (answer.get("error", "?")[-60:] if isinstance(answer, dict) else "?")
    outcomes[key] = outcomes.get(key, 0) + 1
print(json.dumps(outcomes))
"""


def test_rename_race_never_records_a_root_only_file(site: Site) -> None:
    """F2: a thread swaps a directory of the image's path with a symlink to a root-only directory
    (holding a file of the same name) for 6 s while the user adds the environment again and again:
    kaschedd never records the root-only file, nor keeps a copy of it."""
    home = give(site.home(ALICE), ALICE)
    (home / "img").mkdir()
    (home / "img" / "disk.raw").write_bytes(b"alice's own image\n" * 64)
    give(home / "img", ALICE)
    vault = site.base / "vault"
    vault.mkdir(mode=0o700)
    (vault / "disk.raw").write_bytes(SECRET.encode() * 64)
    (vault / "disk.raw").chmod(0o600)
    secret_sha = hashlib.sha256((vault / "disk.raw").read_bytes()).hexdigest()
    (home / "evil").symlink_to(vault)
    description = environment(home, "race", image="img/disk.raw")
    description.write_text("name: race\nimage: {file: img/disk.raw, kind: raw}\n")
    give(home, ALICE)
    stop, swaps = threading.Event(), [0]

    def swap() -> None:
        while not stop.is_set():
            os.rename(home / "img", home / "img.real")
            os.rename(home / "evil", home / "img")  # img is now a symlink to the root-only directory
            os.rename(home / "img", home / "evil")
            os.rename(home / "img.real", home / "img")
            swaps[0] += 1

    racer = threading.Thread(target=swap, daemon=True)
    started = time.monotonic()
    racer.start()
    try:
        entry = unix_user(ALICE)
        done = subprocess.run(
            ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", sys.executable, "-c",
             RACE_CLIENT, str(site.config.service_socket), str(description), "6"],
            capture_output=True, text=True, timeout=120,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    finally:
        stop.set()
        racer.join(10)
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    assert time.monotonic() - started >= 5 and swaps[0] > 1000, swaps
    print("race outcomes", outcomes, "swaps", swaps[0])
    assert sum(outcomes.values()) >= 20, outcomes
    api = open_site(site.config, Caller("root", is_admin=True), load_entry_points=False)
    try:
        recorded = [e for e in api.list_environments(include_shared=True) if e.name == "race"]
    finally:
        api.close()
    assert recorded, outcomes  # some adds won the race honestly, with alice's own file
    assert all(e.sha256 != secret_sha for e in recorded), outcomes
    stored = list((site.config.image_dir / "store").glob("*"))
    assert all(SECRET.encode() not in path.read_bytes() for path in stored)


def test_fifo_and_dev_zero_are_refused_at_once(site: Site) -> None:
    """F8: a FIFO and /dev/zero as the image: one error line each, quickly, and no kaschedd thread
    left waiting on them."""
    home = give(site.home(ALICE), ALICE)
    os.mkfifo(home / "pipe.raw")
    give(home, ALICE)
    for image in (str(home / "pipe.raw"), "/dev/zero"):
        description = environment(home, "dev", image=image)
        give(description, ALICE)
        started = time.monotonic()
        refused = site.kasched(ALICE, "env", "add", str(description), timeout=30)
        one_line(refused, 2, "is not a regular file")
        assert time.monotonic() - started < 10
    time.sleep(0.5)
    stuck = [thread_id for thread_id, frame in sys._current_frames().items()
             if any(name in frame.f_code.co_filename for name in ("safeopen", "imagestore", "environments"))]  # fmt: skip
    assert not stuck


def test_image_over_the_cap_is_refused_and_leaves_nothing(site: Site) -> None:
    home = give(site.home(ALICE), ALICE)
    (home / "big.raw").write_bytes(os.urandom(CAP + 1))
    description = environment(home, "big", image="big.raw")
    give(home, ALICE)
    refused = site.kasched(ALICE, "env", "add", str(description))
    one_line(refused, 2, f"larger than {CAP} bytes (image_max_size)")
    store = site.config.image_dir / "store"
    assert not store.exists() or list(store.iterdir()) == []


def test_shared_environment_needs_no_access_to_the_owners_files(site: Site) -> None:
    """bob checks and deploys alice's shared environment: he cannot read her files (mode 700), and
    they may even be gone; kaschedd uses its own copies."""
    home = give(site.home(ALICE), ALICE)
    make_image(home)
    (home / "post.sh").write_text("#!/bin/sh\necho alice-postinstall\n")
    description = environment(home, "team", "visibility: shared\npostinstall: [post.sh]\n")
    give(home, ALICE)
    assert site.kasched(ALICE, "env", "add", str(description)).returncode == 0
    assert site.kasched(BOB, "env", "check", f"team@{ALICE}").returncode == 0
    shutil.rmtree(home)
    checked = site.kasched(BOB, "env", "check", f"team@{ALICE}")
    assert checked.returncode == 0 and "matches sha256" in checked.stdout, checked.stderr
    assert site.kasched("root", "rights", "grant", "-u", BOB, "-m", "node-1").returncode == 0
    api = open_site(site.config, Caller(BOB), load_entry_points=False)
    try:
        pending = Operations(api).prepare_deploy(f"team@{ALICE}", "node-1")  # the pre-deploy check passed
        assert decoded_payloads(steps.configure_command(pending.context, "node-1")) == [
            b"#!/bin/sh\necho alice-postinstall\n"
        ]
    finally:
        api.close()


def test_removing_an_environment_drops_copies_nothing_else_uses(site: Site) -> None:
    home = give(site.home(ALICE), ALICE)
    make_image(home)
    (home / "a.sh").write_text("echo a\n")
    give(home, ALICE)
    for name in ("one", "two"):
        assert (
            site.kasched(
                ALICE, "env", "add", str(give(environment(home, name, "postinstall: [a.sh]\n"), ALICE))
            ).returncode
            == 0
        )
    store = site.config.image_dir / "store"
    assert len(list(store.iterdir())) == 2  # one image, one script: shared by both
    assert oct(store.stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_uid == 0 and p.stat().st_mode & 0o077 == 0 for p in store.iterdir())
    assert site.kasched(ALICE, "env", "remove", "one").returncode == 0
    assert len(list(store.iterdir())) == 2
    assert site.kasched(ALICE, "env", "remove", "two").returncode == 0
    assert list(store.iterdir()) == []


def test_url_images_through_kaschedd_never_from_loopback(site: Site) -> None:
    """F7: an http URL outside image_url_allow is refused before any connection; one under it whose
    host is loopback (kaschedd's own host) is refused by the address check, though the server answers."""
    home = give(site.home(ALICE), ALICE)
    make_image(site.base)
    (site.base / "root.tar.gz").chmod(0o644)
    port = int(site.web.rsplit(":", 1)[1])
    for url, text in (
        (f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/root.tar.gz", "is not under a URL prefix"),
        (f"{site.web}/root.tar.gz", "its host's address is refused"),
        (f"http://127.0.0.1:{port}/../root.tar.gz", "is not under a URL prefix"),
    ):
        description = give(environment(home, "web", image=url), ALICE)
        one_line(site.kasched(ALICE, "env", "add", str(description)), 2, text)
    assert not (site.config.image_dir / "store").exists() or not list((site.config.image_dir / "store").iterdir())
