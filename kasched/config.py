"""The service configuration: one YAML file (``/etc/kasched/kasched.yaml`` or ``$KASCHED_CONFIG``)."""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kasched.errors import ConfigError

DEFAULT_PATH = Path("/etc/kasched/kasched.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/kasched")


@dataclass(frozen=True)
class Config:
    """Settings of one kasched site. Every key of the file is a field here; unknown keys are refused."""

    site: str = "default"
    state_dir: Path = DEFAULT_STATE_DIR
    database: str = ""
    boot_dir: Path = Path()
    image_dir: Path = Path()
    credentials_file: Path = Path("/etc/kasched/credentials.yaml")
    service_key: Path = Path()
    service_address: str = ""
    service_socket: Path = Path()
    admin_group: str = "kasched-admin"
    max_grant_hours: float = 24 * 7
    reboot_timeout: float = 120.0
    disabled_plugins: tuple[str, ...] = ()
    revert_at_job_end: bool = True
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Directories and the database default to places under state_dir.
        if self.database == "":
            object.__setattr__(self, "database", f"sqlite:///{self.state_dir / 'kasched.db'}")
        if self.boot_dir == Path():
            object.__setattr__(self, "boot_dir", self.state_dir / "boot")
        if self.image_dir == Path():
            object.__setattr__(self, "image_dir", self.state_dir / "images")
        if self.service_socket == Path():
            object.__setattr__(self, "service_socket", self.state_dir / "kaschedd.sock")
        if self.service_key == Path():
            object.__setattr__(self, "service_key", self.state_dir / "ssh" / "id_ed25519")


_PATH_KEYS = {"state_dir", "boot_dir", "image_dir", "credentials_file", "service_key", "service_socket"}


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration from ``path``, ``$KASCHED_CONFIG`` or the default path.

    A missing default file gives the embedded defaults; a missing named file is an error.
    """
    explicit = path or os.environ.get("KASCHED_CONFIG")
    config_path = Path(explicit) if explicit else DEFAULT_PATH
    try:
        exists = config_path.exists()
    except OSError as error:
        raise ConfigError(f"configuration file {config_path}: {error.strerror}") from None
    if not exists:
        if explicit:
            raise ConfigError(f"configuration file {config_path} does not exist")
        return Config()
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{config_path}: cannot read: {_one_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: expected a mapping of settings")
    return from_mapping(data, source=config_path)


def from_mapping(data: dict[str, Any], *, source: Path | None = None) -> Config:
    """Build a :class:`Config` from a mapping, checking every key and its type."""
    known = {f.name: f for f in fields(Config) if f.name != "path"}
    values: dict[str, Any] = {}
    where = f"{source}: " if source else ""
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}unknown setting {key!r} (known: {', '.join(sorted(known))})")
        values[key] = _coerce(key, value, where)
    base = Path(source).parent if source else Path.cwd()
    for key in _PATH_KEYS & values.keys():
        values[key] = (base / values[key]).resolve()
    return Config(**values, path=source)


def _coerce(key: str, value: Any, where: str) -> Any:
    if key in _PATH_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}{key}: expected a path")
        return Path(value)
    if key in ("max_grant_hours", "reboot_timeout"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}{key}: expected a positive number")
        return float(value)
    if key == "revert_at_job_end":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected true or false")
        return value
    if key == "disabled_plugins":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}{key}: expected a list of plugin names")
        return tuple(value)
    if not isinstance(value, str) or (not value and key != "service_address"):
        raise ConfigError(f"{where}{key}: expected a non-empty string")
    return value


def check(config: Config) -> tuple[list[str], list[str]]:
    """Problems (fatal) and warnings a running site would meet with this configuration."""
    problems = []
    for name in ("state_dir", "boot_dir", "image_dir"):
        directory: Path = getattr(config, name)
        if directory.exists() and not os.access(directory, os.W_OK):
            problems.append(f"{name}: {directory} is not writable")
        elif not directory.exists() and not _creatable(directory):
            problems.append(f"{name}: {directory} does not exist and cannot be created")
    creds = config.credentials_file
    if creds.exists():
        if creds.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"credentials_file: {creds} is readable by others (chmod 600 it)")
        try:
            load_credentials(config)
        except ConfigError as error:
            problems.append(str(error))
    warnings = []
    try:
        grp.getgrnam(config.admin_group)
    except KeyError:
        warnings.append(f"admin_group: Unix group {config.admin_group!r} does not exist (only root is admin)")
    return problems, warnings


def _creatable(directory: Path) -> bool:
    parent = directory
    while not parent.exists():
        parent = parent.parent
    return os.access(parent, os.W_OK)


def load_credentials(config: Config) -> dict[str, dict[str, str]]:
    """The BMC credentials by reference name: ``{name: {"user": ..., "password": ...}}``."""
    path = config.credentials_file
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"credentials_file: {path}: {_one_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"credentials_file: {path}: expected a mapping of name to user/password")
    for name, entry in data.items():
        if not isinstance(entry, dict) or not {"user", "password"} <= entry.keys():
            raise ConfigError(f"credentials_file: {path}: {name!r} needs 'user' and 'password'")
    return {str(k): {"user": str(v["user"]), "password": str(v["password"])} for k, v in data.items()}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
