"""The environment catalog: add, list, show, check, remove; visibility and ownership; checksums."""

from __future__ import annotations

import hashlib
import http.server
import tarfile
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
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


def test_add_records_size_checksum_and_versions(
    admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path
) -> None:
    alice = as_user("alice")
    first = alice.add_environment(env_yaml(tmp_path))
    assert (first.name, first.version, first.owner, first.compression) == ("tiny", 1, "alice", "gz")
    assert first.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert first.image_size == image.stat().st_size
    second = alice.add_environment(env_yaml(tmp_path))
    assert second.version == 2
    assert alice.show_environment("tiny").version == 2
    assert alice.show_environment("tiny:1").version == 1
    with pytest.raises(ConflictError, match="tiny@alice:1 exists already"):
        alice.add_environment(env_yaml(tmp_path, extra="version: 1"))


def test_visibility_rules(admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path) -> None:
    alice, bob = as_user("alice"), as_user("bob")
    alice.add_environment(env_yaml(tmp_path, "secret", "private"))
    alice.add_environment(env_yaml(tmp_path, "team", "shared"))
    admin.add_environment(env_yaml(tmp_path, "site", "public"))
    assert {e.name for e in bob.list_environments()} == {"site"}
    assert {e.name for e in bob.list_environments(include_shared=True)} == {"site", "team"}
    assert {e.name for e in alice.list_environments()} == {"secret", "team", "site"}
    assert {e.name for e in admin.list_environments(include_shared=True)} == {"secret", "team", "site"}
    assert bob.show_environment("team@alice").owner == "alice"
    with pytest.raises(NotFoundError, match="no environment secret@alice that you \\(bob\\) may use"):
        bob.show_environment("secret@alice")
    with pytest.raises(PermissionDenied, match="only admins may make an environment public"):
        bob.add_environment(env_yaml(tmp_path, "mine", "public"))
    with pytest.raises(PermissionDenied, match="reference environment"):
        bob.add_environment(env_yaml(tmp_path, "ref", "shared", extra="reference: true"))
    with pytest.raises(PermissionDenied, match="another user"):
        bob.add_environment(env_yaml(tmp_path, "x", "private"), owner="alice")


def test_ambiguous_name_needs_an_owner(
    admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path
) -> None:
    as_user("alice").add_environment(env_yaml(tmp_path, "dup", "shared"))
    as_user("bob").add_environment(env_yaml(tmp_path, "dup", "shared"))
    carol = as_user("carol")
    with pytest.raises(InputError, match="dup is ambiguous: name one of dup@alice, dup@bob"):
        carol.show_environment("dup")
    assert carol.show_environment("dup@bob").owner == "bob"
    assert as_user("alice").show_environment("dup").owner == "alice"  # one's own comes first


def test_remove_only_by_owner_or_admin_and_never_the_reference(
    admin: Kasched, as_user: Callable[[str], Kasched], tmp_path: Path, image: Path
) -> None:
    as_user("alice").add_environment(env_yaml(tmp_path, "team", "shared"))
    with pytest.raises(PermissionDenied, match="owned by alice"):
        as_user("bob").remove_environment("team@alice")
    assert admin.remove_environment("team@alice").name == "team"
    admin.add_environment(env_yaml(tmp_path, "ref1", "public", extra="reference: true"))
    with pytest.raises(ConflictError, match="reference environment"):
        admin.remove_environment("ref1")
    admin.add_environment(env_yaml(tmp_path, "ref2", "public", extra="reference: true"))
    assert admin.reference_environment().name == "ref2"  # type: ignore[union-attr]
    admin.remove_environment("ref1")


def test_checksum_is_checked_again_before_use(admin: Kasched, tmp_path: Path, image: Path) -> None:
    admin.add_environment(env_yaml(tmp_path))
    assert admin.check_environment("tiny").name == "tiny"
    with image.open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(IntegrityError, match=r"has sha256 .* recorded .* when it was added"):
        admin.check_environment("tiny")
    image.unlink()
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
        ("postinstall: [missing.sh]", "x", "script"),
    ],
)
def test_bad_descriptions(admin: Kasched, tmp_path: Path, image: Path, extra: str, name: str, message: str) -> None:
    path = write(tmp_path / "bad.yaml", f"name: {name}\nimage: {{file: root.tar.gz}}\n{extra}\n")
    with pytest.raises((InputError, NotFoundError)) as error:
        admin.add_environment(path)
    assert message in str(error.value)
    assert admin.list_environments(include_shared=True) == []


def test_bad_kind_boot_path_and_missing_image(admin: Kasched, tmp_path: Path, image: Path) -> None:
    with pytest.raises(InputError, match=r"image.kind: 'iso' is not one of tar, raw"):
        admin.add_environment(write(tmp_path / "a.yaml", "name: a\nimage: {file: root.tar.gz, kind: iso}\n"))
    with pytest.raises(InputError, match=r"boot.kernel: .* without '..'"):
        admin.add_environment(
            write(tmp_path / "b.yaml", "name: b\nimage: {file: root.tar.gz}\nboot: {kernel: ../../vmlinuz}\n")
        )
    with pytest.raises(NotFoundError, match=r"image .*nothere.tar.gz does not exist"):
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


def test_image_over_http(admin: Kasched, tmp_path: Path, image: Path, http_server: str) -> None:
    env = admin.add_environment(env_yaml(tmp_path, image=f"{http_server}/root.tar.gz"))
    assert env.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert admin.check_environment("tiny").image_location.startswith("http://127.0.0.1")
    with pytest.raises(NotFoundError, match="HTTP 404"):
        admin.add_environment(env_yaml(tmp_path, "other", image=f"{http_server}/nothere.tar.gz"))
