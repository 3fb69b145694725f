"""The environment catalog: add, list, show, check, remove; visibility and ownership; checksums."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kasched.api import Kasched
from kasched.errors import ConflictError, InputError, IntegrityError, NotFoundError, PermissionDenied
from tests.conftest import write


def make_image(directory: Path, name: str = "root.tar.gz", marker: str = "hello") -> Path:
    root = directory / "root"
    write(root / "etc" / "marker", marker)
    image = directory / name
    with tarfile.open(image, "w:gz") as tar:
        tar.add(root, arcname=".")
    return image


def env_yaml(
    directory: Path, name: str = "tiny", visibility: str = "private", extra: str = "", image: str = "root.tar.gz"
) -> Path:
    return write(
        directory / f"{name}-{visibility}.yaml",
        f"""
name: {name}
description: a tiny test image
visibility: {visibility}
image: {{file: {image}, kind: tar}}
boot: {{kernel: /vmlinuz, initrd: /initrd.img, cmdline: "console=ttyS0"}}
{extra}""",
    )


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A scratch directory every user may read: the test users read their files as themselves."""
    path = Path(tempfile.mkdtemp(prefix="kasched-envs-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def users() -> None:
    from tests.test_cli import unix_user  # (test_cli imports this module)

    for name in ("kasched-alice", "kasched-bob", "kasched-carol"):
        unix_user(name)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


def test_add_records_size_checksum_and_versions(
    admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path
) -> None:
    alice = as_user("kasched-alice")
    first = alice.add_environment(env_yaml(tmp_path))
    assert (first.name, first.version, first.owner, first.compression) == ("tiny", 1, "kasched-alice", "gz")
    assert first.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert first.image_size == image.stat().st_size
    second = alice.add_environment(env_yaml(tmp_path))
    assert second.version == 2
    assert alice.show_environment("tiny").version == 2
    assert alice.show_environment("tiny:1").version == 1
    with pytest.raises(ConflictError, match="tiny@kasched-alice:1 exists already"):
        alice.add_environment(env_yaml(tmp_path, extra="version: 1"))


def test_visibility_rules(admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path) -> None:
    alice, bob = as_user("kasched-alice"), as_user("kasched-bob")
    alice.add_environment(env_yaml(tmp_path, "secret", "private"))
    alice.add_environment(env_yaml(tmp_path, "team", "shared"))
    admin.add_environment(env_yaml(tmp_path, "site", "public"))
    assert {e.name for e in bob.list_environments()} == {"site"}
    assert {e.name for e in bob.list_environments(include_shared=True)} == {"site", "team"}
    assert {e.name for e in alice.list_environments()} == {"secret", "team", "site"}
    assert {e.name for e in admin.list_environments(include_shared=True)} == {"secret", "team", "site"}
    assert bob.show_environment("team@kasched-alice").owner == "kasched-alice"
    with pytest.raises(NotFoundError, match="no environment secret@kasched-alice that you \\(kasched-bob\\) may use"):
        bob.show_environment("secret@kasched-alice")
    with pytest.raises(PermissionDenied, match="only admins may make an environment public"):
        bob.add_environment(env_yaml(tmp_path, "mine", "public"))
    with pytest.raises(PermissionDenied, match="reference environment"):
        bob.add_environment(env_yaml(tmp_path, "ref", "shared", extra="reference: true"))
    with pytest.raises(PermissionDenied, match="another user"):
        bob.add_environment(env_yaml(tmp_path, "x", "private"), owner="kasched-alice")


def test_ambiguous_name_needs_an_owner(
    admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path
) -> None:
    as_user("kasched-alice").add_environment(env_yaml(tmp_path, "dup", "shared"))
    as_user("kasched-bob").add_environment(env_yaml(tmp_path, "dup", "shared"))
    carol = as_user("kasched-carol")
    with pytest.raises(InputError, match="dup is ambiguous: name one of dup@kasched-alice, dup@kasched-bob"):
        carol.show_environment("dup")
    assert carol.show_environment("dup@kasched-bob").owner == "kasched-bob"
    assert as_user("kasched-alice").show_environment("dup").owner == "kasched-alice"  # one's own comes first


def test_remove_only_by_owner_or_admin_and_never_the_reference(
    admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path
) -> None:
    as_user("kasched-alice").add_environment(env_yaml(tmp_path, "team", "shared"))
    with pytest.raises(PermissionDenied, match="owned by kasched-alice"):
        as_user("kasched-bob").remove_environment("team@kasched-alice")
    assert admin.remove_environment("team@kasched-alice").name == "team"
    admin.add_environment(env_yaml(tmp_path, "ref1", "public", extra="reference: true"))
    with pytest.raises(ConflictError, match="reference environment"):
        admin.remove_environment("ref1")
    admin.add_environment(env_yaml(tmp_path, "ref2", "public", extra="reference: true"))
    assert admin.reference_environment().name == "ref2"  # type: ignore[union-attr]
    admin.remove_environment("ref1")


def tamper(location: str, data: bytes = b"tampered") -> None:
    """Change kaschedd's own copy (as a broken disk or a careless admin would)."""
    Path(location).chmod(0o600)
    with open(location, "ab") as handle:
        handle.write(data)


def test_checksum_is_checked_again_before_use(admin: Kasched, tmp_path: Path, image: Path) -> None:
    added = admin.add_environment(env_yaml(tmp_path))
    assert added.image_location == str(admin.config.image_dir / "store" / added.sha256)
    assert admin.check_environment("tiny").name == "tiny"
    with image.open("ab") as handle:  # the user's file is not read again after env add
        handle.write(b"tampered")
    image.unlink()
    assert admin.check_environment("tiny").sha256 == added.sha256
    tamper(added.image_location)
    with pytest.raises(IntegrityError, match=r"has sha256 .* recorded"):
        admin.check_environment("tiny")
    Path(added.image_location).unlink()
    with pytest.raises(NotFoundError, match="does not exist"):
        admin.check_environment("tiny")


@pytest.mark.parametrize(
    ("extra", "name", "message"),
    [
        ("", "../../etc", "is not a valid environment name"),
        ("", "a/b", "is not a valid environment name"),
        ("colour: red", "x", "unknown field(s) colour"),
        ("visibility2: x", "x", "unknown field(s) visibility2"),
        ("destructive: maybe", "x", "destructive: expected true or false"),
        ("version: 0", "x", "version: 0 is not a positive whole number"),
        ("postinstall: [missing.sh]", "x", "missing.sh does not exist"),
        # control characters: newlines must never reach an iPXE, PXELINUX or GRUB file (one line each)
        ('description: "two\\nlines"', "x", "description: 'two\\nlines': control characters"),
        ('boot: {cmdline: "quiet\\ninitrd http://evil/x"}', "x", "boot.cmdline: 'quiet\\ninitrd"),
        ('boot: {kernel: "/vmlinuz\\nboot"}', "x", "boot.kernel: '/vmlinuz\\nboot': control characters"),
        ('boot: {initrd: "/initrd.img\\x1b[2J"}', "x", "boot.initrd: '/initrd.img\\x1b[2J': control characters"),
        ('boot: {kernel: "/vmlinuz initrd=/x"}', "x", "boot.kernel: '/vmlinuz initrd=/x': no spaces"),
        ("", '"tiny\\n"', "name: 'tiny\\n': control characters"),
    ],
)
def test_bad_descriptions(admin: Kasched, tmp_path: Path, image: Path, extra: str, name: str, message: str) -> None:
    path = write(tmp_path / "bad.yaml", f"name: {name}\nimage: {{file: root.tar.gz}}\n{extra}\n")
    with pytest.raises((InputError, NotFoundError)) as error:
        admin.add_environment(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert admin.list_environments(include_shared=True) == []


def test_bad_kind_boot_path_and_missing_image(admin: Kasched, tmp_path: Path, image: Path) -> None:
    with pytest.raises(InputError, match=r"image.kind: 'iso' is not one of tar, raw"):
        admin.add_environment(write(tmp_path / "a.yaml", "name: a\nimage: {file: root.tar.gz, kind: iso}\n"))
    with pytest.raises(InputError, match=r"boot.kernel: .* without '..'"):
        admin.add_environment(
            write(tmp_path / "b.yaml", "name: b\nimage: {file: root.tar.gz}\nboot: {kernel: ../../vmlinuz}\n")
        )
    with pytest.raises(NotFoundError, match=r"nothere.tar.gz does not exist"):
        admin.add_environment(write(tmp_path / "c.yaml", "name: c\nimage: {file: nothere.tar.gz}\n"))
    with pytest.raises(InputError, match="only files and http"):
        admin.add_environment(write(tmp_path / "d.yaml", "name: d\nimage: {file: 'ftp://x/y'}\n"))


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving tmp_path (what a site's image store would be)."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_images_need_an_allowed_prefix_and_never_loopback(
    admin: Kasched, tmp_path: Path, image: Path, http_server: str
) -> None:
    """Not under image_url_allow: refused before any connection. Under it, but the host is loopback:
    refused by the address check (the allowed case is served from a network namespace in
    tests/test_urlfetch.py)."""
    with pytest.raises(InputError, match="is not under a URL prefix the site allows"):
        admin.add_environment(env_yaml(tmp_path, image=f"{http_server}/root.tar.gz"))
    allowing = admin.as_caller(admin.caller)
    allowing.config = dataclasses.replace(admin.config, image_url_allow=(f"{http_server}/",))
    with pytest.raises(InputError, match="its host's address is refused"):
        allowing.add_environment(env_yaml(tmp_path, image=f"{http_server}/root.tar.gz"))
    assert admin.list_environments(include_shared=True) == []


def test_direct_mode_follows_no_link_and_reads_regular_files_only(admin: Kasched, tmp_path: Path, image: Path) -> None:
    """The CLI on the database (``env_catalog.load``) reads the description and its files the same way
    as kaschedd: no symlink in any component, regular files only."""
    (tmp_path / "link.tar.gz").symlink_to(image)
    (tmp_path / "dir").symlink_to(tmp_path)
    for extra, where in (("image: {file: link.tar.gz}", "link.tar.gz"), ("image: {file: dir/root.tar.gz}", "dir")):
        with pytest.raises(InputError, match=f"{where}.*: a symbolic link"):
            admin.add_environment(write(tmp_path / "l.yaml", f"name: l\n{extra}\n"))
    (tmp_path / "desc.yaml").symlink_to(env_yaml(tmp_path))
    with pytest.raises(InputError, match=r"desc\.yaml: a symbolic link"):
        admin.add_environment(tmp_path / "desc.yaml")
    with pytest.raises(InputError, match="is not a regular file"):
        admin.add_environment(write(tmp_path / "z.yaml", "name: z\nimage: {file: /dev/zero, kind: raw}\n"))
    with pytest.raises(InputError, match="a symbolic link"):
        admin.add_environment(write(tmp_path / "p.yaml", "name: p\nimage: {file: root.tar.gz}\npostinstall: [link.tar.gz]\n"))
    assert admin.list_environments(include_shared=True) == []


def test_an_image_dir_reached_through_a_link_of_the_site(admin: Kasched, tmp_path: Path, image: Path) -> None:
    """image_dir is the site's: a link in its own path (set by the admin) is resolved once, and the
    store's copies are named by their real path (they are then opened without following links)."""
    (tmp_path / "real-images").mkdir()
    (tmp_path / "images").symlink_to(tmp_path / "real-images")
    site = admin.as_caller(admin.caller)
    site.config = dataclasses.replace(admin.config, image_dir=tmp_path / "images")
    added = site.add_environment(env_yaml(tmp_path))
    assert added.image_location == str(tmp_path / "real-images" / "store" / added.sha256)
    assert site.check_environment("tiny").sha256 == added.sha256
