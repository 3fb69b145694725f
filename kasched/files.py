"""Files that readers must never see half-written: boot profiles (read by TFTP/HTTP while kaschedd's
threads rewrite them), lab node state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename. The temporary name is new
    on every call: writers in several threads of one process never share one (a pid-named one was
    renamed away under another thread: "No such file or directory")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(text.encode() if isinstance(text, str) else text)
        tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
