"""Who is asking over TCP, where the kernel cannot tell: a MUNGE credential or a signed token.

MUNGE (``Authorization: MUNGE <credential>``): the client has its local munged encode a credential
whose payload binds the request (site, method, target and the SHA-256 of the body); kaschedd decodes
it with ``unmunge``, which gives the uid and gid munged vouches for, and refuses expired and replayed
credentials (munged keeps every decoded credential until it expires). The payload must be exactly the
request kaschedd received.

Whoever holds a site's MUNGE key can make a credential of any uid, root's too, and name any encoding
host: a deploy job's user, root on a node whose disk holds the key, can. So a credential of an admin
(uid 0, or a member of ``admin_group``) is taken over TCP only from ``munge_admin_hosts``: the TCP peer
(the address the kernel saw complete the handshake) must be in that list, and the credential's own
encoding host (``ENCODE_HOST``) must be that same address (a credential made elsewhere and carried
through a listed host, by a port forward or a proxy, is not that host's). Any other admin credential
is refused; ordinary users are who MUNGE says, from anywhere.

Signed tokens (``Authorization: Bearer kst1.<claims>.<signature>``): an admin issues a token for a user
with ``kasched token issue``; the claims (user, expiry, id) are signed with HMAC-SHA256 under the
site's secret (``token_secret``, mode 600). A token is a bearer secret: send it over TLS only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kasched.config import Config, admin_networks, is_set
from kasched.errors import AuthenticationError, ConfigError, InputError
from kasched.identity import Caller

TOKEN_PREFIX = "kst1"
MUNGE_TTL = 60  # seconds a credential the CLI makes is valid (munged also refuses it once decoded)
_MUNGE_CREDENTIAL = re.compile(r"MUNGE:[A-Za-z0-9+/=]{16,8192}:")
_MUNGE_FIELD = re.compile(r"^([A-Z_]+):\s+(.*)$")


def request_binding(site: str, method: str, target: str, body: bytes) -> str:
    """The MUNGE payload of one request: replaying it elsewhere or for another request fails."""
    return f"kasched-v1 {site} {method} {target} {hashlib.sha256(body).hexdigest()}"


def _munge_command(name: str, socket: Path) -> list[str]:
    return [name, "--socket", str(socket)] if is_set(socket) else [name]


def _run_munge(command: list[str], data: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, input=data, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise AuthenticationError(f"{command[0]} is not installed (Debian package munge)") from None
    except subprocess.TimeoutExpired:
        raise AuthenticationError(f"{command[0]} did not answer in 30 s (is munged running?)") from None


def munge_encode(payload: str, socket: Path = Path(), ttl: int = MUNGE_TTL) -> str:
    """A credential of the calling user, from the local munged, carrying ``payload``."""
    done = _run_munge([*_munge_command("munge", socket), "--ttl", str(ttl)], payload)
    if done.returncode != 0:
        raise AuthenticationError(f"munge: {' '.join(done.stderr.split()) or 'failed'}")
    return done.stdout.strip()


@dataclass(frozen=True)
class MungeIdentity:
    uid: int
    gid: int
    payload: str
    host: str = ""  # the address munged encoded it on (ENCODE_HOST), as the credential says


def munge_decode(credential: str, socket: Path = Path()) -> MungeIdentity:
    """The uid, gid and payload munged vouches for; refused if invalid, expired or replayed."""
    if not _MUNGE_CREDENTIAL.fullmatch(credential):
        raise AuthenticationError("MUNGE credential: not a credential (expected MUNGE:...:)")
    done = _run_munge(_munge_command("unmunge", socket), credential)
    head, _, payload = done.stdout.partition("\n\n")
    fields = {m.group(1): m.group(2) for line in head.splitlines() if (m := _MUNGE_FIELD.match(line))}
    status = fields.get("STATUS", "")
    if done.returncode != 0 or not status.startswith("Success"):
        reason = re.sub(r"\s*\(\d+\)$", "", status) or " ".join(done.stderr.split()) or "refused"
        raise AuthenticationError(f"MUNGE credential refused: {reason.lower()}")
    try:
        uid, gid = (int(re.findall(r"\((\d+)\)", fields[name])[-1]) for name in ("UID", "GID"))
    except (KeyError, IndexError):
        raise AuthenticationError("MUNGE credential: unmunge gave no uid") from None
    host = re.findall(r"\(([0-9A-Fa-f.:]+)\)", fields.get("ENCODE_HOST", ""))
    return MungeIdentity(uid, gid, payload, host[-1] if host else "")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4), None if ``text`` is not one."""
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_admin_host(config: Config, caller: Caller, identity: MungeIdentity, peer: str) -> None:
    """Refuse an admin's MUNGE credential unless it comes from, and was encoded on, one address of
    ``munge_admin_hosts``: anyone with the site's key can make one (see the module's docstring)."""
    if not caller.is_admin:
        return
    address, encoded = _address(peer), _address(identity.host)
    listed = address is not None and any(address in network for network in admin_networks(config.munge_admin_hosts))
    who = f"MUNGE credential of admin {caller.user} (uid {identity.uid}) from {peer}"
    if not listed:
        where = ", ".join(config.munge_admin_hosts) or "none"
        raise AuthenticationError(
            f"{who}: admins are taken over TCP only from munge_admin_hosts ({where}); use the Unix socket "
            "on kaschedd's host, or a signed token"
        )
    if encoded != address:
        raise AuthenticationError(
            f"{who}: it was encoded on {identity.host or 'an unknown host'}, not on {peer} (relayed through "
            "a listed host?); run munged there with --origin set to the address it connects from"
        )


# --- Signed tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenClaims:
    user: str
    expires: int  # Unix time
    id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def load_secret(path: Path, create: bool = False) -> bytes:
    """The site's token key; ``create`` makes a new random one (mode 600) if there is none."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    try:
        secret = path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"token_secret: {path}: {error.strerror}") from None
    if len(secret) < 32:
        raise ConfigError(f"token_secret: {path} holds less than 32 characters")
    return secret.encode()


def issue_token(secret: bytes, user: str, hours: float, now: float | None = None) -> tuple[str, TokenClaims]:
    """A token for ``user`` valid ``hours`` from now."""
    if not user or any(c.isspace() for c in user):
        raise InputError(f"{user!r} is not a user name", field="user")
    if not 0 < hours <= 24 * 366:
        raise InputError("expected a number of hours between 0 and 8784", field="hours")
    claims = TokenClaims(user, int((now or time.time()) + hours * 3600), secrets.token_hex(8))
    body = _b64(json.dumps({"u": claims.user, "exp": claims.expires, "id": claims.id}).encode())
    signed = f"{TOKEN_PREFIX}.{body}"
    return f"{signed}.{_signature(secret, signed)}", claims


def verify_token(secret: bytes, token: str, now: float | None = None) -> TokenClaims:
    """The claims of a token signed with ``secret`` and not expired; AuthenticationError otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthenticationError(f"token: not a kasched token (expected {TOKEN_PREFIX}.CLAIMS.SIGNATURE)")
    signed = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_signature(secret, signed).encode(), parts[2].encode()):
        raise AuthenticationError("token: bad signature (forged, altered, or issued by another site)")
    try:
        data = json.loads(_unb64(parts[1]))
        claims = TokenClaims(str(data["u"]), int(data["exp"]), str(data["id"]))
    except (ValueError, KeyError, TypeError):
        raise AuthenticationError("token: unreadable claims") from None
    if claims.expires <= (now or time.time()):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(claims.expires))
        raise AuthenticationError(f"token {claims.id} of {claims.user} expired at {stamp}")
    return claims


# --- The server side --------------------------------------------------------------------------------


class TcpAuthenticator:
    """Turns the ``Authorization`` header of a TCP request into a Caller, or refuses it (401)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def caller(self, authorization: str | None, method: str, target: str, body: bytes, peer: str) -> Caller:
        caller, check = self.identify(authorization, method, target, peer)
        if check is not None:
            check(body)
        return caller

    def identify(
        self, authorization: str | None, method: str, target: str, peer: str
    ) -> tuple[Caller, Callable[[bytes], None] | None]:
        """The caller from the header alone (and the TCP peer's address ``peer``, for an admin's MUNGE
        credential), and for MUNGE the check of the body it was made for (None for a token): the server
        reads no body before this succeeds."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme == "MUNGE":
            return self._munge(value.strip(), method, target, peer)
        if scheme == "Bearer":
            return self._token(value.strip()), None
        if not authorization:
            raise AuthenticationError("authentication required over TCP: Authorization: MUNGE or Bearer")
        raise AuthenticationError(f"unknown authorization scheme {scheme[:20]!r} (MUNGE or Bearer)")

    def _munge(self, credential: str, method: str, target: str, peer: str) -> tuple[Caller, Callable[[bytes], None]]:
        identity = munge_decode(credential, self.config.munge_socket)
        caller = Caller.from_uid(identity.uid, self.config.admin_group)
        check_admin_host(self.config, caller, identity, peer)

        def check(body: bytes) -> None:
            if identity.payload != request_binding(self.config.site, method, target, body):
                raise AuthenticationError("MUNGE credential was made for another request")

        return caller, check

    def _token(self, token: str) -> Caller:
        if not self.config.token_secret.exists():
            raise AuthenticationError("this service issues no tokens (no token_secret)")
        try:
            secret = load_secret(self.config.token_secret)
        except ConfigError as error:
            raise AuthenticationError(f"tokens unusable on this service: {error}") from None
        claims = verify_token(secret, token)
        if claims.id in revoked_ids(self.config):
            raise AuthenticationError(f"token {claims.id} of {claims.user} was revoked")
        try:
            return Caller.from_uid(pwd.getpwnam(claims.user).pw_uid, self.config.admin_group)
        except KeyError:
            return Caller(claims.user, is_admin=False)


def revoked_path(config: Config) -> Path:
    return config.token_secret.with_name(config.token_secret.name + ".revoked")


def revoked_ids(config: Config) -> set[str]:
    """Ids of revoked tokens, one a line in ``<token_secret>.revoked``."""
    try:
        return set(revoked_path(config).read_text().split())
    except FileNotFoundError:
        return set()


def revoke(config: Config, token_id: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{16}", token_id):
        raise InputError(f"{token_id!r} is not a token id", field="id")
    with open(revoked_path(config), "a") as out:
        out.write(token_id + "\n")
