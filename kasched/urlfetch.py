"""Fetching an image from an http(s) URL for ``env add``, as a server on the management network must:
only under a URL prefix the site allows (``image_url_allow``), never from loopback, link-local or a
node's BMC or management address (checked on the address actually connected to), no redirects,
under the size cap, and every failure told in the same words (no status, no "refused" vs "404").
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from urllib.parse import unquote, urlparse

from kasched.errors import InputError

log = logging.getLogger("kasched")
TIMEOUT = 30.0  # seconds per connect and per read
DEADLINE = 3600.0  # seconds for a whole fetch
CHUNK = 1 << 20
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchFailed(InputError):
    """Any failure after the URL passed the site's checks: one line, the same whatever happened."""


def check_prefix(prefix: str) -> str:
    """A valid ``image_url_allow`` entry: ``http(s)://HOST[:PORT]/PATH/`` (ends with '/')."""
    parsed = urlparse(prefix)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.username or parsed.query:
        raise ValueError(f"{prefix!r} is not an http(s)://HOST[:PORT]/PATH/ prefix")
    if not parsed.path.endswith("/"):
        raise ValueError(f"{prefix!r} must end with '/'")
    return prefix


def allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether ``url`` is under one of ``prefixes`` (scheme, host and port equal; path below)."""
    try:
        parsed = urlparse(url)
        port = _port(parsed)
    except ValueError:
        return False
    path = unquote(parsed.path)
    if parsed.username or parsed.password or "/../" in path + "/" or "/./" in path + "/":
        return False
    for prefix in map(urlparse, prefixes):
        if (parsed.scheme, parsed.hostname, port) == (prefix.scheme, prefix.hostname, _port(prefix)) and (
            path.startswith(prefix.path)
        ):
            return True
    return False


def forbidden_address(address: IpAddress, forbidden: set[str]) -> bool:
    """Loopback, link-local, unspecified, multicast, or one of ``forbidden`` (nodes' addresses)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or str(address) in forbidden
    )


def management_addresses(names: Iterable[str]) -> set[str]:
    """The addresses of the inventory's nodes and BMCs (names resolved as well as possible)."""
    found: set[str] = set()
    for name in names:
        try:
            found.add(str(ipaddress.ip_address(name)))
        except ValueError:
            with contextlib.suppress(OSError):
                found.update(str(info[4][0]) for info in socket.getaddrinfo(name, None))
    return found


def fetch(url: str, prefixes: Iterable[str], forbidden: set[str], limit: int) -> Iterator[bytes]:
    """The body of ``url`` in chunks, after the site's checks (they run before the first chunk)."""
    if not allowed(url, prefixes):
        raise InputError(f"image URL {url} is not under a URL prefix the site allows (image_url_allow)")
    parsed = urlparse(url)
    host, port = parsed.hostname or "", _port(parsed)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    except (OSError, ValueError) as error:
        raise _failed(url, f"resolving: {error}") from None
    if not addresses or any(forbidden_address(a, forbidden) for a in addresses):
        raise InputError(f"image URL {url}: its host's address is refused (loopback, link-local or a node's address)")
    return _body(url, addresses[0], forbidden, limit)


def _body(url: str, address: IpAddress, forbidden: set[str], limit: int) -> Iterator[bytes]:
    parsed = urlparse(url)
    deadline = time.monotonic() + DEADLINE
    try:
        connection = _connect(parsed.scheme, parsed.hostname or "", _port(parsed), address, forbidden)
        try:
            target = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
            connection.request("GET", target, headers={"User-Agent": "kasched"})
            response = connection.getresponse()  # http.client follows no redirect
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            if int(response.headers.get("Content-Length") or 0) > limit:
                raise OSError(f"Content-Length over {limit}")
            size = 0
            while chunk := response.read1(CHUNK):  # what arrived: the deadline is checked often
                size += len(chunk)
                if size > limit or time.monotonic() > deadline:
                    raise OSError(f"over {limit} bytes or {DEADLINE} s")
                yield chunk
        finally:
            connection.close()
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise _failed(url, str(error)) from None


def _connect(scheme: str, host: str, port: int, address: IpAddress, forbidden: set[str]) -> http.client.HTTPConnection:
    """An HTTP(S) connection to ``address`` itself (not to the name again), its peer checked."""
    sock = socket.create_connection((str(address), port), timeout=TIMEOUT)
    peer = ipaddress.ip_address(sock.getpeername()[0])
    if peer != address or forbidden_address(peer, forbidden):
        sock.close()
        raise OSError(f"connected to {peer}, a refused address")
    if scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=TIMEOUT)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    connection.sock = sock
    return connection


def _failed(url: str, detail: str) -> FetchFailed:
    log.info("image URL %r: cannot fetch: %r", url, detail)  # the detail for the site's admins only
    return FetchFailed(f"image URL {url}: cannot fetch")


def _port(parsed: object) -> int:
    port = getattr(parsed, "port", None)
    return int(port) if port else (443 if getattr(parsed, "scheme", "") == "https" else 80)
