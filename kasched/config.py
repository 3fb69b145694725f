"""The service configuration: one YAML file (``/etc/kasched/kasched.yaml`` or ``$KASCHED_CONFIG``)."""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kasched.errors import ConfigError
from kasched.rates import rate_bits

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
    service_tcp: str = ""  # HOST:PORT kaschedd also listens on (off by default)
    service_tls_cert: Path = Path()  # with service_tls_key: serve HTTPS on service_tcp
    service_tls_key: Path = Path()
    service_tls_ca: Path = Path()  # client side: the CA that signed kaschedd's certificate
    service_url: str = ""  # client side: http(s)://HOST:PORT of kaschedd (else the Unix socket)
    service_request_timeout: float = 30.0  # seconds a client has to send a whole request (and read the answer)
    service_max_connections: int = 256  # connections kaschedd serves at once; more get 503
    service_max_connections_per_user: int = 16  # per uid (Unix socket) or address (TCP), admins exempt; 429
    munge_socket: Path = Path()  # munged's socket (default: MUNGE's own default)
    # Addresses or networks (10.0.0.5, 10.0.0.0/24, fd00::/64) whose MUNGE credentials of admins (root,
    # admin_group) are taken as admins over TCP; none by default (admins: the Unix socket, or a token).
    munge_admin_hosts: tuple[str, ...] = ()
    token_secret: Path = Path()  # HMAC key of signed tokens (default <state_dir>/token.key)
    console_logs: Path = Path()  # nodes whose console is a file: <console_logs>/<node>/console.log
    admin_group: str = "kasched-admin"
    max_grant_hours: float = 24 * 7
    reboot_timeout: float = 120.0
    broadcast_stall_timeout: float = 30.0  # a chain connection with no sign of life this long is dead
    broadcast_ack_timeout: float = 3.0  # sent data unacknowledged this long: node off or unplugged (0: off)
    broadcast_source_rate: str = ""  # the nodes' link rate (e.g. 1gbit): the server sends at most that (empty: no cap)
    disabled_plugins: tuple[str, ...] = ()
    # Network boot profiles (the pxe driver): a URL prefix iPXE loads kernels and initrds from
    # (e.g. http://${next-server}/; empty: TFTP), the initrd a local partition's kernel needs
    # (relative to boot_dir; empty: none), and arguments added to every kernel's command line.
    pxe_base_url: str = ""
    pxe_local_initrd: str = ""
    pxe_kernel_args: str = ""
    # The drivers and transports every operation uses (docs/drivers.md): the boot profile driver, how
    # commands reach the nodes (tree: SSH) and how an image does (chain: over SSH). ``simulated`` for
    # all three, with nodes whose bmc.driver is ``simulated``: the simulated hardware kind (docs/simulated.md).
    boot_driver: str = "pxe"
    exec_method: str = "tree"
    broadcast_method: str = "chain"
    revert_at_job_end: bool = True
    reconcile_interval: float = 300.0  # kaschedd runs 'kasched reconcile' this often (seconds; 0: never)
    image_max_size: int = 16 << 30  # bytes (or 16G): the largest image or URL env add copies into image_dir
    image_url_allow: tuple[str, ...] = ()  # URL prefixes images may come from (none: no URL images)
    stateless_quota: int = 8 << 30  # bytes (or 8G) of stateless images published under boot_dir/stateless
    # A grant past its end (the job's walltime) is left to the job's epilog this long before reconcile
    # revokes it: longer than the scheduler's kill (Slurm's KillWait) and its epilog take.
    reconcile_walltime_grace: float = 300.0
    # How long a user's deploy, revert or reboot waits for nodes still being given back after their
    # previous job (the revert of that job's end) before it is refused (seconds; 0: refused at once).
    revert_wait: float = 600.0
    # Settings of the scheduler plugins for kaschedd and what it starts (reconcile, the revert at a job's
    # end), as the hooks get them in their environment: {KASCHED_OAR_API_URL: ..., ...}. A variable the
    # process already has wins (a hook's wrapper sets its own).
    scheduler_settings: tuple[tuple[str, str], ...] = ()
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
        if self.token_secret == Path():
            object.__setattr__(self, "token_secret", self.state_dir / "token.key")


_PATH_KEYS = {
    "state_dir",
    "boot_dir",
    "image_dir",
    "credentials_file",
    "service_key",
    "service_socket",
    "service_tls_cert",
    "service_tls_key",
    "service_tls_ca",
    "munge_socket",
    "token_secret",
    "console_logs",
}
_MAY_BE_EMPTY = {"service_address", "service_tcp", "service_url", "pxe_base_url", "pxe_local_initrd", "pxe_kernel_args"}


def is_set(path: Path) -> bool:
    """Whether an optional path setting was given (unset ones are ``Path()``)."""
    return path != Path()


def parse_hostport(value: str, field: str = "service_tcp") -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` too) as a host and a port number."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:7878)")
    return host, int(port)


def parse_url(value: str) -> tuple[str, str, int]:
    """``http(s)://HOST:PORT`` as scheme, host and port."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or rest.rstrip("/").count("/"):
        raise ConfigError(f"service_url: {value!r} is not http(s)://HOST:PORT")
    host, port = parse_hostport(rest.rstrip("/"), "service_url")
    return scheme, host, port


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


_ZERO_MEANS = {
    "reconcile_interval": "never",
    "broadcast_ack_timeout": "off",
    "reconcile_walltime_grace": "none",
    "revert_wait": "refused at once",
}


def _coerce(key: str, value: Any, where: str) -> Any:
    if key in _PATH_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}{key}: expected a path")
        return Path(value)
    if key in _ZERO_MEANS:  # seconds, where 0 turns the thing off
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise ConfigError(f"{where}{key}: expected seconds (0: {_ZERO_MEANS[key]})")
        return float(value)
    if key in ("service_max_connections", "service_max_connections_per_user"):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}{key}: expected a positive whole number")
        return value
    if key in ("max_grant_hours", "reboot_timeout", "broadcast_stall_timeout", "service_request_timeout"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}{key}: expected a positive number")
        return float(value)
    if key == "broadcast_source_rate":
        try:
            rate_bits(value if isinstance(value, str) else "")
        except ValueError:
            raise ConfigError(f"{where}{key}: {value!r} is not a link rate such as 100mbit, 1gbit or 2.5gbit") from None
        return value
    if key == "revert_at_job_end":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected true or false")
        return value
    if key in ("image_max_size", "stateless_quota"):
        return _size(value, f"{where}{key}")
    if key == "image_url_allow":
        from kasched.urlfetch import check_prefix

        try:
            return tuple(check_prefix(v) for v in _strings(value))
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"{where}{key}: expected a list of URL prefixes such as https://images.example.org/: {error}"
            ) from None
    if key == "munge_admin_hosts":
        try:
            return tuple(str(network) for network in admin_networks(_strings(value)))
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"{where}{key}: expected a list of IP addresses or networks such as 10.0.0.5 or 10.0.0.0/24: {error}"
            ) from None
    if key == "scheduler_settings":
        return _scheduler_settings(value, f"{where}{key}")
    if key == "disabled_plugins":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}{key}: expected a list of plugin names")
        return tuple(value)
    if not isinstance(value, str) or (not value and key not in _MAY_BE_EMPTY):
        raise ConfigError(f"{where}{key}: expected a non-empty string")
    try:
        if key == "service_tcp" and value:
            parse_hostport(value)
        if key == "service_url" and value:
            parse_url(value)
        if key == "pxe_base_url" and value and "://" not in value:
            raise ConfigError(f"{key}: expected a URL prefix such as http://${{next-server}}/")
        if key == "pxe_local_initrd" and (value.startswith("/") or ".." in Path(value).parts):
            raise ConfigError(f"{key}: expected a path relative to boot_dir")
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None
    return value


SCHEDULER_SETTING = re.compile(r"^KASCHED_[A-Z0-9_]+$")


def _scheduler_settings(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A mapping of scheduler plugin variables (``KASCHED_OAR_API_URL: http://...``) to text values."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{KASCHED_OAR_API_URL: http://127.0.0.1:6680/oarapi}}")
    pairs = []
    for name, setting in value.items():
        if not isinstance(name, str) or not SCHEDULER_SETTING.match(name):
            raise ConfigError(f"{where}: {name!r} is not a scheduler plugin variable (KASCHED_...)")
        if isinstance(setting, bool) or not isinstance(setting, str | int | float) or "\0" in str(setting):
            raise ConfigError(f"{where}: {name}: expected a text value")
        pairs.append((name, str(setting)))
    return tuple(sorted(pairs))


def export_scheduler_settings(config: Config) -> None:
    """Give this process (and what it starts) the site's scheduler plugin settings, but for those its
    environment sets already."""
    for name, value in config.scheduler_settings:
        os.environ.setdefault(name, value)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(value: Any, where: str) -> int:
    """A size in bytes: a positive whole number, or one with a unit (``512M``, ``16G``, ``1T``)."""
    text = "" if isinstance(value, bool) or not isinstance(value, int | str) else str(value).strip().upper()
    text = text.removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "")
    if not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise ConfigError(f"{where}: expected a size such as 16G, 512M or a number of bytes")
    return int(number) * _UNITS[unit]


def admin_networks(hosts: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of ``munge_admin_hosts`` (an address is a network of one); ValueError if one is
    not an IP address or network (host names are refused: a name is only as true as its resolver)."""
    return [ipaddress.ip_network(host.strip(), strict=False) for host in hosts]


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("not a list of strings")
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
    problems.extend(_open_database_files(config))
    warnings = _check_tcp(config, problems)
    try:
        grp.getgrnam(config.admin_group)
    except KeyError:
        warnings.append(f"admin_group: Unix group {config.admin_group!r} does not exist (only root is admin)")
    return problems, warnings


def _open_database_files(config: Config) -> list[str]:
    """An SQLite database (or its -wal, -shm) others may read: every private environment is in it."""
    if not config.database.startswith("sqlite:///"):
        return []
    database = config.database.removeprefix("sqlite:///").split("?")[0]
    found = []
    for path in (Path(database), Path(f"{database}-wal"), Path(f"{database}-shm")):
        if path.is_file() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(f"database: {path} is readable by others (chmod 600 it; kaschedd does at its start)")
    return found


def _check_tcp(config: Config, problems: list[str]) -> list[str]:
    """Problems (appended) and warnings of the TCP listener, its TLS files and the client side."""
    warnings: list[str] = []
    cert, key = is_set(config.service_tls_cert), is_set(config.service_tls_key)
    if cert != key:
        problems.append("service_tls_cert and service_tls_key go together: set both or neither")
    for name in ("service_tls_cert", "service_tls_key", "service_tls_ca"):
        path: Path = getattr(config, name)
        if is_set(path) and not os.access(path, os.R_OK):
            problems.append(f"{name}: {path} does not exist or is not readable")
    if key and config.service_tls_key.exists() and config.service_tls_key.stat().st_mode & stat.S_IRWXO:
        problems.append(f"service_tls_key: {config.service_tls_key} is readable by others (chmod 600 it)")
    secret = config.token_secret
    if secret.exists() and secret.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"token_secret: {secret} is readable by others (chmod 600 it)")
    if config.service_tcp and not cert:
        warnings.append(
            f"service_tcp: {config.service_tcp} without TLS: requests and answers travel in clear, and a "
            "signed token seen on the network can be reused until it expires"
        )
    if config.service_url.startswith("https://") and not is_set(config.service_tls_ca):
        warnings.append("service_url: https without service_tls_ca: the system's CAs must trust kaschedd's certificate")
    return warnings


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
