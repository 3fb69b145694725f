"""The environment catalog (Kadeploy-style): what a user can deploy, who may see it, and its checksum."""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kasched import safeopen
from kasched.errors import InputError, NotFoundError, PermissionDenied
from kasched.models import Compression, ImageKind, Visibility
from kasched.yamlfile import parse_text

ENV_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,63}$", re.IGNORECASE)
REFERENCE_RE = re.compile(r"^(?P<name>[^@:]+)(@(?P<owner>[^@:]+))?(:(?P<version>[^@:]+))?$")
TOP_KEYS = {"name", "version", "description", "visibility", "image", "boot", "postinstall", "destructive", "reference"}
IMAGE_KEYS = {"file", "kind", "compression"}
BOOT_KEYS = {"kernel", "initrd", "cmdline"}
SUFFIXES = {
    ".gz": Compression.GZ,
    ".tgz": Compression.GZ,
    ".xz": Compression.XZ,
    ".txz": Compression.XZ,
    ".zst": Compression.ZST,
    ".tzst": Compression.ZST,
}
DESCRIPTION_MAX = 1 << 20
CONTROL = {"Cc", "Zl", "Zp"}  # control characters and line/paragraph separators (a new line to a boot loader)


@dataclass(frozen=True)
class EnvironmentReference:
    """``NAME[@OWNER][:VERSION]`` as a user writes it."""

    name: str
    owner: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> EnvironmentReference:
        match = REFERENCE_RE.match(text.strip())
        if not match:
            raise InputError(f"{text!r} is not NAME[@OWNER][:VERSION]", field="environment")
        name, owner, version = match.group("name"), match.group("owner"), match.group("version")
        check_name(name)
        if owner is not None and not USER_RE.match(owner):
            raise InputError(f"{owner!r} is not a user name", field="environment")
        if version is not None and not (version.isascii() and version.isdigit()):
            raise InputError(f"version {version!r} is not a whole number", field="environment")
        return cls(name, owner, int(version) if version is not None else None)

    def __str__(self) -> str:
        owner = f"@{self.owner}" if self.owner else ""
        version = f":{self.version}" if self.version is not None else ""
        return f"{self.name}{owner}{version}"


@dataclass
class EnvironmentSpec:
    """An environment description read from YAML and validated; ``image_location`` and ``postinstall``
    are the user's paths (or URL) until ``env add`` copies them into the store."""

    name: str
    version: int | None
    description: str
    visibility: Visibility
    image_kind: ImageKind
    compression: Compression
    image_location: str
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    postinstall: list[str] = field(default_factory=list)
    destructive: bool = False
    reference: bool = False
    image_size: int = 0
    sha256: str = ""


def check_name(name: str) -> str:
    """Environment names are plain words: no '/', no '..', nothing a path could be built from."""
    if not ENV_NAME_RE.fullmatch(name) or ".." in name:
        raise InputError(
            f"{name!r} is not a valid environment name (letters, digits, '.', '_', '+', '-')", field="name"
        )
    return name


def load(path: str | Path) -> EnvironmentSpec:
    """Read an environment description (direct mode: as this process, opened like every file a user
    names, see :mod:`kasched.safeopen`) and check every field. Its files are read by ``env add``."""
    where = safeopen.normal(os.path.abspath(path))
    try:
        text = safeopen.read_small(where, None, DESCRIPTION_MAX, "descriptions").decode()
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    return loads(text, source=where, base=Path(where).parent)


def loads(text: str, *, source: str, base: Path) -> EnvironmentSpec:
    """The same from text; files it names are relative to ``base`` (no file is read here)."""
    data = parse_text(text, source)
    try:
        return parse(data, base=base)
    except (InputError, NotFoundError, PermissionDenied) as error:
        raise type(error)(f"{source}: {error}") from None


def parse(data: Any, *, base: Path) -> EnvironmentSpec:
    if not isinstance(data, dict):
        raise InputError("expected a mapping of environment fields")
    _check_keys(data, TOP_KEYS, "environment")
    image = _mapping(data.get("image"), "image", required=True)
    _check_keys(image, IMAGE_KEYS, "image")
    boot = _mapping(data.get("boot"), "boot", required=False)
    _check_keys(boot, BOOT_KEYS, "boot")
    location = _location(image.get("file"), base)
    kind = _enum(ImageKind, image.get("kind", "tar"), "image.kind")
    compression = _enum(Compression, image.get("compression", _guess_compression(location)), "image.compression")
    version = data.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise InputError(f"{version!r} is not a positive whole number", field="version")
    return EnvironmentSpec(
        name=check_name(_string(data.get("name"), "name", required=True)),
        version=version,
        description=_string(data.get("description", ""), "description"),
        visibility=_enum(Visibility, data.get("visibility", "private"), "visibility"),
        image_kind=kind,
        compression=compression,
        image_location=location,
        kernel=_inside_path(boot.get("kernel", ""), "boot.kernel"),
        initrd=_inside_path(boot.get("initrd", ""), "boot.initrd"),
        cmdline=_string(boot.get("cmdline", ""), "boot.cmdline"),
        postinstall=_scripts(data.get("postinstall") or [], base),
        destructive=_bool(data.get("destructive", False), "destructive"),
        reference=_bool(data.get("reference", False), "reference"),
    )


def _location(value: Any, base: Path) -> str:
    text = _string(value, "image.file", required=True)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        return text
    if scheme and len(scheme) > 1:
        raise InputError(f"{text!r}: only files and http(s) URLs are supported", field="image.file")
    return _file(base, text, "image.file")


def _file(base: Path, text: str, where: str) -> str:
    """``text`` relative to ``base``, absolute and normalised; never resolved (no link is followed)."""
    try:
        return safeopen.normal(os.path.join(os.path.abspath(base), text))
    except InputError as error:
        raise InputError(str(error), field=where) from None


def _guess_compression(location: str) -> str:
    for suffix, compression in SUFFIXES.items():
        if location.endswith(suffix):
            return compression.value
    return Compression.NONE.value


def _scripts(value: Any, base: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InputError("expected a list of script paths", field="postinstall")
    return [_file(base, entry, "postinstall") for entry in value]


def _inside_path(value: Any, where: str) -> str:
    text = _string(value, where)
    if any(c.isspace() for c in text):
        raise InputError(f"{text!r}: no spaces in a boot path", field=where)
    if text and (not text.startswith("/") or ".." in Path(text).parts):
        raise InputError(f"{text!r} must be an absolute path inside the image, without '..'", field=where)
    return text


def _enum(kind: Any, value: Any, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{value!r} is not one of {', '.join(m.value for m in kind)}", field=where) from None


def _string(value: Any, where: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise InputError("expected a string" + (" (required)" if required else ""), field=where)
    if any(unicodedata.category(c) in CONTROL for c in value):
        raise InputError(f"{value!r}: control characters (newlines, tabs, escapes) are not allowed", field=where)
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError("expected true or false", field=where)
    return value


def _mapping(value: Any, where: str, *, required: bool) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InputError("expected a mapping" + (" (required)" if required else ""), field=where)
    return value


def _check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise InputError(
            f"unknown field(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(known))})", field=where
        )
