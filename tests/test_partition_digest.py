"""The block list of a reference image (kasched.partition_digest): one SHA-256 per 4 MiB block of the
decompressed image (the last block shorter), the same whatever the compression, computed from
kaschedd's copy with its recorded sha256 checked in the same pass, and kept beside it (read only)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from kasched import partition_digest
from kasched.api import Kasched
from kasched.config import Config
from kasched.errors import InputError, IntegrityError
from kasched.partition_digest import BLOCK, BlockList, blocks_path, digest_of, expected_blocks

SIZE = 2 * BLOCK + 12345  # not a multiple of the block size
COMPRESS = {"none": None, "gz": ["gzip", "-c"], "xz": ["xz", "-c", "-0"], "zst": ["zstd", "-q", "-c"]}


def store_copy(image_dir: Path, raw: bytes, compression: str) -> SimpleNamespace:
    """An environment whose image is in the store, compressed as said."""
    argv = COMPRESS[compression]
    content = raw if argv is None else subprocess.run(argv, input=raw, capture_output=True, check=True).stdout
    sha256 = hashlib.sha256(content).hexdigest()
    store = image_dir / "store"
    store.mkdir(parents=True, exist_ok=True)
    (store / sha256).write_bytes(content)
    return SimpleNamespace(
        image_kind="raw", compression=compression, image_location=str(store / sha256), sha256=sha256, label="ref@root:1"
    )


def by_hand(raw: bytes) -> list[str]:
    return [hashlib.sha256(raw[offset : offset + BLOCK]).hexdigest() for offset in range(0, len(raw), BLOCK)]


@pytest.fixture
def raw() -> bytes:
    return os.urandom(SIZE)


@pytest.mark.parametrize("compression", ["none", "gz", "xz", "zst"])
def test_the_list_is_the_hash_of_each_block_of_the_decompressed_image(
    tmp_path: Path, raw: bytes, compression: str
) -> None:
    env = store_copy(tmp_path, raw, compression)
    blocks = expected_blocks(Config(image_dir=tmp_path), env)
    assert (blocks.size, blocks.block) == (SIZE, BLOCK)
    assert list(blocks.hashes) == by_hand(raw) and len(blocks.hashes) == 3
    assert blocks.extent(2) == (2 * BLOCK, 12345)
    assert blocks.digest == digest_of(SIZE, BLOCK, by_hand(raw))


def test_the_list_is_kept_read_only_beside_the_copy_and_read_back(
    tmp_path: Path, raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = store_copy(tmp_path, raw, "zst")
    first = expected_blocks(Config(image_dir=tmp_path), env)
    kept = blocks_path(Config(image_dir=tmp_path), env.sha256)
    assert kept == Path(f"{env.image_location}.blocks")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o400
    assert [p.name for p in kept.parent.iterdir() if p.name.startswith(".incoming")] == []

    def no_second_pass(*args: object) -> None:
        raise AssertionError("the image was read again")

    monkeypatch.setattr(partition_digest, "raw_stream", no_second_pass)
    assert expected_blocks(Config(image_dir=tmp_path), env) == first


def test_a_copy_that_changed_since_env_add_gives_no_list(tmp_path: Path, raw: bytes) -> None:
    env = store_copy(tmp_path, raw, "gz")
    Path(env.image_location).write_bytes(subprocess.run(["gzip", "-c"], input=raw[:-1], capture_output=True).stdout)
    with pytest.raises(IntegrityError, match="has sha256"):
        expected_blocks(Config(image_dir=tmp_path), env)
    assert not blocks_path(Config(image_dir=tmp_path), env.sha256).exists()


def test_a_copy_that_does_not_decompress_gives_no_list(tmp_path: Path, raw: bytes) -> None:
    env = store_copy(tmp_path, raw, "none")
    env.compression = "zst"
    with pytest.raises(IntegrityError, match="zstd cannot decompress"):
        expected_blocks(Config(image_dir=tmp_path), env)
    assert not blocks_path(Config(image_dir=tmp_path), env.sha256).exists()


def test_a_kept_list_that_was_altered_is_refused(tmp_path: Path, raw: bytes) -> None:
    env = store_copy(tmp_path, raw, "none")
    expected_blocks(Config(image_dir=tmp_path), env)
    kept = blocks_path(Config(image_dir=tmp_path), env.sha256)
    forged = (
        BlockList(SIZE, BLOCK, ("0" * 64, *by_hand(raw)[1:]))
        .to_json()
        .replace(digest_of(SIZE, BLOCK, ["0" * 64, *by_hand(raw)[1:]]), digest_of(SIZE, BLOCK, by_hand(raw)))
    )
    kept.chmod(0o600)
    kept.write_text(forged)
    with pytest.raises(IntegrityError, match="does not match its digest"):
        expected_blocks(Config(image_dir=tmp_path), env)


def test_only_a_raw_image_has_a_list(tmp_path: Path, raw: bytes) -> None:
    env = store_copy(tmp_path, raw, "none")
    env.image_kind = "tar"
    with pytest.raises(InputError, match="raw image"):
        expected_blocks(Config(image_dir=tmp_path), env)


def reference_yaml(directory: Path, raw: bytes, compressed: bool = True) -> Path:
    image = directory / "reference.img.zst"
    image.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
                      if compressed else raw)  # fmt: skip
    description = directory / "reference.yaml"
    description.write_text(
        "name: reference\nvisibility: public\nreference: true\nimage: {file: reference.img.zst, kind: raw}\n"
    )
    return description


def test_env_add_of_the_reference_records_its_list_and_remove_drops_it(
    admin: Kasched, tmp_path: Path, raw: bytes
) -> None:
    env = admin.add_environment(reference_yaml(tmp_path, raw))
    kept = blocks_path(admin.config, env.sha256)
    assert kept.exists() and BlockList.from_json(kept.read_text(), str(kept)).hashes == tuple(by_hand(raw))
    admin.add_environment(reference_yaml(tmp_path, raw[:-1]))  # another reference: the first may go
    admin.remove_environment(env.label)
    assert not kept.exists() and not Path(env.image_location).exists()


def test_env_add_refuses_a_reference_image_that_does_not_decompress(admin: Kasched, tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(IntegrityError, match="zstd cannot decompress"):
        admin.add_environment(reference_yaml(tmp_path, raw, compressed=False))
    assert admin.list_environments() == []
    assert [path.name for path in (Path(admin.config.image_dir) / "store").iterdir()] == []
