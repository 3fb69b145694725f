"""The environment catalog (Kadeploy-style): what a user can deploy, who may see it, and its checksum."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from kasched.errors import InputError, IntegrityError, NotFoundError, PermissionDenied
from kasched.models import Compression, ImageKind, Visibility
from kasched.yamlfile import parse_text, read_text

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
CHUNK = 1 << 20
HTTP_TIMEOUT = 30


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
    """An environment description read from YAML, validated, with its image's size and checksum."""

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
    if not ENV_NAME_RE.match(name) or ".." in name:
        raise InputError(
            f"{name!r} is not a valid environment name (letters, digits, '.', '_', '+', '-')", field="name"
        )
    return name


def load(path: str | Path) -> EnvironmentSpec:
    """Read an environment description, check every field, and measure its image (size, sha256)."""
    path = Path(path)
    return loads(read_text(path), source=str(path), base=path.parent.resolve())


def loads(text: str, *, source: str, base: Path, may_read: Callable[[Path], bool] | None = None) -> EnvironmentSpec:
    """The same from text; files it names are relative to ``base``. ``may_read`` (the service's check
    of the caller's own right to read a file) refuses images and scripts the caller could not read."""
    data = parse_text(text, source)
    try:
        spec = parse(data, base=base)
        if may_read is not None:
            for path in [spec.image_location, *spec.postinstall]:
                if not urlparse(path).scheme and not may_read(Path(path)):
                    raise PermissionDenied(f"you may not read {path}")
        spec.image_size, spec.sha256 = measure(spec.image_location)
    except (InputError, NotFoundError, PermissionDenied) as error:
        raise type(error)(f"{source}: {error}") from None
    return spec


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


def measure(location: str) -> tuple[int, str]:
    """Size and sha256 of an image, read from its file or its http(s) URL."""
    digest = hashlib.sha256()
    size = 0
    for chunk in _read_image(location):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def verify(location: str, expected_sha256: str, label: str) -> None:
    """Re-read an image and refuse it if its checksum changed since it was added."""
    _, actual = measure(location)
    if actual != expected_sha256:
        raise IntegrityError(
            f"environment {label}: image {location} has sha256 {actual}, recorded {expected_sha256} when it was added"
        )


def _read_image(location: str) -> Any:
    if urlparse(location).scheme in ("http", "https"):
        yield from _read_http(location)
        return
    try:
        with open(location, "rb") as image:
            while chunk := image.read(CHUNK):
                yield chunk
    except FileNotFoundError:
        raise NotFoundError(f"image {location} does not exist") from None
    except OSError as error:
        raise InputError(f"image {location}: {error.strerror}") from None


def _read_http(url: str) -> Any:
    try:
        with requests.get(url, stream=True, timeout=HTTP_TIMEOUT) as response:
            if response.status_code == 404:
                raise NotFoundError(f"image {url} does not exist (HTTP 404)")
            if response.status_code != 200:
                raise InputError(f"image {url}: HTTP {response.status_code}")
            yield from response.iter_content(CHUNK)
    except requests.RequestException as error:
        raise InputError(f"image {url}: {type(error).__name__}: cannot fetch") from None


def _location(value: Any, base: Path) -> str:
    text = _string(value, "image.file", required=True)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        return text
    if scheme and len(scheme) > 1:
        raise InputError(f"{text!r}: only files and http(s) URLs are supported", field="image.file")
    return str((base / text).resolve())


def _guess_compression(location: str) -> str:
    for suffix, compression in SUFFIXES.items():
        if location.endswith(suffix):
            return compression.value
    return Compression.NONE.value


def _scripts(value: Any, base: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InputError("expected a list of script paths", field="postinstall")
    scripts = []
    for entry in value:
        script = (base / entry).resolve()
        if not script.is_file():
            raise NotFoundError(f"script {script} does not exist", field="postinstall")
        scripts.append(str(script))
    return scripts


def _inside_path(value: Any, where: str) -> str:
    text = _string(value, where)
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
