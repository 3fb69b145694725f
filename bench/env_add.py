"""``env add`` of a large image: the copy into kaschedd's store against the hash alone.

Run: .venv/bin/python bench/env_add.py [--size-mib 1024] [--rounds 3] [--sparse]
Writes a random (or sparse) image in a scratch directory, then, in each round and side by side:
hashes it alone (sha256 of the file, what ``env add`` did before the store), and adds it as an
environment (opened without following links, copied into ``image_dir/store`` while hashed, fsync'd,
renamed; then removed again, which drops the copy). Prints the best time of each and their ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from kasched.api import Kasched  # noqa: E402
from kasched.compose import open_site  # noqa: E402
from kasched.config import Config  # noqa: E402
from kasched.identity import Caller  # noqa: E402

CHUNK = 1 << 20


def make_image(path: Path, size_mib: int, sparse: bool) -> None:
    with path.open("wb") as out:
        if sparse:
            out.truncate(size_mib << 20)
            return
        for _ in range(size_mib):
            out.write(os.urandom(CHUNK))


def hash_alone(path: Path) -> float:
    start = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as image:
        while chunk := image.read(CHUNK):
            digest.update(chunk)
    digest.hexdigest()
    return time.perf_counter() - start


def env_add(api: Kasched, description: Path) -> float:
    start = time.perf_counter()
    env = api.add_environment(description)
    elapsed = time.perf_counter() - start
    api.remove_environment(env.label)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparse", action="store_true", help="a sparse image (no disk reads) instead of random data")
    args = parser.parse_args()
    if args.size_mib <= 0 or args.rounds <= 0:
        parser.error("--size-mib and --rounds must be positive")
    work = Path(tempfile.mkdtemp(prefix="kasched-envadd-"))
    try:
        image = work / "image.raw"
        make_image(image, args.size_mib, args.sparse)
        description = work / "env.yaml"
        description.write_text("name: big\nimage: {file: image.raw, kind: raw}\n")
        config = Config(site="bench", state_dir=work / "state", image_max_size=(args.size_mib + 1) << 20)
        api = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
        hashes, adds = [], []
        hash_alone(image)  # the page cache holds the image for both from here on
        for _ in range(args.rounds):
            hashes.append(hash_alone(image))
            adds.append(env_add(api, description))
        api.close()
        kind = "sparse" if args.sparse else "random"
        print(f"image: {args.size_mib} MiB ({kind}), {args.rounds} round(s), best of each")
        print(f"hash alone:             {min(hashes):8.3f} s  ({args.size_mib / min(hashes):7.1f} MiB/s)")
        print(f"env add (copy + hash):  {min(adds):8.3f} s  ({args.size_mib / min(adds):7.1f} MiB/s)")
        print(f"RATIO env add / hash alone = {min(adds) / min(hashes):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
