"""Reading the YAML files users write (inventories, environment descriptions): one error line naming
the file, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kasched.errors import InputError


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read: {getattr(error, 'strerror', None) or error}") from None


def parse_text(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
