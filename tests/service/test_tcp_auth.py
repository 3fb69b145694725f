"""kaschedd over TCP: MUNGE credentials bound to the request, signed tokens, TLS. The service runs for
real (as root), with its own munged; clients are the CLI run as ordinary Unix users, or raw HTTP."""

from __future__ import annotations

import grp
import http.client
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kasched.config import check, from_mapping
from kasched.errors import AuthenticationError, ConfigError
from kasched.service import auth
from kasched.service.client import ServiceClient, TokenAuth
from tests.service.tcpsite import Site, free_port, kasched_as, kaschedd, make_ca, make_server_cert, munged, scratch
from tests.test_cli import unix_user

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    base = scratch()
    try:
        with munged(base / "munge") as munge_socket:
            ca = make_ca(base, "site-ca")
            cert, key = make_server_cert(base, ca)
            client = {
                "service_url": f"https://127.0.0.1:{(port := free_port())}",
                "service_tls_ca": str(ca[0]),
                "munge_socket": str(munge_socket),
            }
            with kaschedd(
                base,
                client,
                service_tcp=f"127.0.0.1:{port}",
                service_tls_cert=cert,
                service_tls_key=key,
                munge_socket=munge_socket,
                munge_admin_hosts=("127.0.0.1",),
            ) as running:
                yield running
    finally:
        shutil.rmtree(base, ignore_errors=True)


def raw(
    site: Site,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> tuple:
    """One HTTPS request with exactly these headers, from address ``source``: (status, JSON answer)."""
    context = ssl.create_default_context(cafile=str(site.base / "site-ca.pem"))
    host, port = site.config.service_tcp.split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=60, source_address=(source, 0))
    try:
        connection.request(method, target, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def credential(
    site: Site, method: str, target: str, body: bytes = b"", ttl: int = 60, socket: Path | None = None
) -> str:
    payload = auth.request_binding("t", method, target, body)
    return "MUNGE " + auth.munge_encode(payload, socket or site.config.munge_socket, ttl=ttl)


# --- MUNGE --------------------------------------------------------------------------------------------


def test_users_are_who_munge_says_over_tcp(site: Site) -> None:
    listed = kasched_as("kasched-alice", site.client_config, "nodes", "list", "-m", "node-[1-2]")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["node-1", "node-2"]
    refused = kasched_as("kasched-alice", site.client_config, "rights", "grant", "-u", "kasched-alice", "-m", "node-3")
    assert refused.returncode == 5 and "only admins may" in refused.stderr and "kasched-alice" in refused.stderr
    power = kasched_as("kasched-alice", site.client_config, "power", "status", "-m", "node-3")
    assert power.returncode == 5
    assert "kasched-alice may not deploy these nodes: node-3: no active grant" in power.stderr
    granted = kasched_as("root", site.client_config, "rights", "grant", "-u", "kasched-bob", "-m", "node-4")
    assert granted.returncode == 0, granted.stderr  # root over TCP is an admin, as on the socket
    other = kasched_as("kasched-alice", site.client_config, "power", "status", "-m", "node-4")
    assert other.returncode == 5 and "node-4: granted to kasched-bob" in other.stderr


def test_health_says_who_munge_vouched_for(site: Site) -> None:
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": credential(site, "GET", "/v1/health")})
    assert status == 200 and data["user"] == "root" and data["admin"] is True


def test_root_over_munge_is_admin_only_from_the_listed_hosts(site: Site) -> None:
    """Anyone with the site's MUNGE key (a deploy job's user reads it from the reference partition) can
    make a uid-0 credential: over TCP it is an admin only from munge_admin_hosts (127.0.0.1 here)."""
    header = {"Authorization": credential(site, "GET", "/v1/health")}
    status, data = raw(site, "GET", "/v1/health", headers=header, source="127.0.0.2")
    assert status == 401, data
    assert data["error"] == (
        "MUNGE credential of admin root (uid 0) from 127.0.0.2: admins are taken over TCP only from "
        "munge_admin_hosts (127.0.0.1); use the Unix socket on kaschedd's host, or a signed token"
    )
    body = json.dumps({"user": "kasched-bob", "nodes": "node-6"}).encode()
    header = {"Authorization": credential(site, "POST", "/v1/rights", body), "Content-Type": "application/json"}
    status, data = raw(site, "POST", "/v1/rights", body, header, source="127.0.0.2")
    assert status == 401 and "admins are taken over TCP only from munge_admin_hosts" in data["error"]
    assert kasched_as("root", site.client_config, "rights", "--json", "-m", "node-6").stdout.strip() == "[]"
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": credential(site, "GET", "/v1/health")})
    assert status == 200 and data["user"] == "root" and data["admin"] is True, "from the listed host: an admin"


def alice_credential(site: Site, method: str, target: str) -> str:
    """A credential kasched-alice's own munge made (with the key, anyone can make one of any uid)."""
    done = subprocess.run(
        ["setpriv", f"--reuid={unix_user('kasched-alice').pw_uid}", "--regid=65534", "--clear-groups",
         "munge", "--socket", str(site.config.munge_socket)],
        input=auth.request_binding("t", method, target, b""), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return "MUNGE " + done.stdout.strip()


def test_ordinary_users_over_munge_are_themselves_from_anywhere(site: Site) -> None:
    header = {"Authorization": alice_credential(site, "GET", "/v1/health")}
    status, data = raw(site, "GET", "/v1/health", headers=header, source="127.0.0.2")
    assert status == 200 and data["user"] == "kasched-alice" and data["admin"] is False


def test_an_admin_group_member_over_munge_is_refused_from_an_unlisted_host(site: Site) -> None:
    """Not only uid 0: the key makes a credential of any admin_group member as easily."""
    group = grp.getgrgid(unix_user("kasched-alice").pw_gid).gr_name
    config = replace(site.config, admin_group=group)
    header = alice_credential(site, "GET", "/v1/health")
    with pytest.raises(AuthenticationError, match=r"^MUNGE credential of admin kasched-alice \(uid \d+\) from 10\.9"):
        auth.TcpAuthenticator(config).identify(header, "GET", "/v1/health", "10.9.0.1")
    caller, _ = auth.TcpAuthenticator(config).identify(
        alice_credential(site, "GET", "/v1/health"), "GET", "/v1/health", "127.0.0.1"
    )
    assert caller.is_admin, "from 127.0.0.1 (listed, and where it was encoded): an admin"


def test_root_credential_encoded_elsewhere_is_refused_from_a_listed_host(site: Site) -> None:
    """A credential whose ENCODE_HOST is not the peer (made on another host, carried through a listed
    one) is refused: a munged with the site's key and --origin=127.0.0.9 stands for that host."""
    with munged(site.base / "munge-elsewhere", key=site.base / "munge" / "munge.key", origin="127.0.0.9") as other:
        header = {"Authorization": credential(site, "GET", "/v1/health", socket=other)}
    status, data = raw(site, "GET", "/v1/health", headers=header)
    assert status == 401, data
    assert data["error"].startswith(
        "MUNGE credential of admin root (uid 0) from 127.0.0.1: it was encoded on 127.0.0.9, not on 127.0.0.1"
    )


def test_a_replayed_munge_credential_is_refused(site: Site) -> None:
    header = {"Authorization": credential(site, "GET", "/v1/health")}
    assert raw(site, "GET", "/v1/health", headers=header)[0] == 200
    status, data = raw(site, "GET", "/v1/health", headers=header)
    assert status == 401 and data["error"] == "MUNGE credential refused: replayed credential"


def test_a_munge_credential_for_another_request_is_refused(site: Site) -> None:
    status, data = raw(site, "GET", "/v1/nodes", headers={"Authorization": credential(site, "GET", "/v1/health")})
    assert status == 401 and data["error"] == "MUNGE credential was made for another request"
    body = json.dumps({"user": "kasched-bob", "nodes": "node-5"}).encode()
    other_body = json.dumps({"user": "kasched-alice", "nodes": "node-5"}).encode()
    header = {"Authorization": credential(site, "POST", "/v1/rights", body), "Content-Type": "application/json"}
    status, data = raw(site, "POST", "/v1/rights", other_body, header)
    assert status == 401 and data["error"] == "MUNGE credential was made for another request"


def test_forged_munge_credentials_are_refused(site: Site) -> None:
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": "MUNGE MUNGE:" + "A" * 100 + ":"})
    assert status == 401 and data["error"].startswith("MUNGE credential refused: ")
    real = credential(site, "GET", "/v1/health")
    middle = len(real) // 2
    altered = real[:middle] + ("B" if real[middle] != "B" else "C") + real[middle + 1 :]
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": altered})
    assert status == 401 and data["error"].startswith("MUNGE credential refused: ")
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": "MUNGE $(reboot)"})
    assert status == 401 and "not a credential" in data["error"]


def test_an_expired_munge_credential_is_refused(site: Site) -> None:
    header = {"Authorization": credential(site, "GET", "/v1/health", ttl=1)}
    time.sleep(3)
    status, data = raw(site, "GET", "/v1/health", headers=header)
    assert status == 401 and data["error"] == "MUNGE credential refused: expired credential"


def test_no_or_unknown_authorization_is_401(site: Site) -> None:
    status, data = raw(site, "GET", "/v1/health")
    assert status == 401 and "authentication required over TCP" in data["error"]
    status, data = raw(site, "GET", "/v1/nodes", headers={"Authorization": "Basic cm9vdDo="})
    assert status == 401 and "unknown authorization scheme 'Basic'" in data["error"]
    status, _ = raw(site, "POST", "/v1/nodes/import", b"{}", {"Authorization": "Bearer x"})
    assert status == 401


# --- Signed tokens -----------------------------------------------------------------------------------


def test_tokens_issued_by_an_admin_identify_their_user(site: Site) -> None:
    issued = kasched_as("root", site.client_config, "token", "issue", "kasched-alice", "--hours", "1", "--json")
    assert issued.returncode == 0, issued.stderr
    token = json.loads(issued.stdout)["token"]
    assert (site.config.token_secret.stat().st_mode & 0o777) == 0o600
    health = kasched_as("kasched-bob", site.client_config, "nodes", "list", KASCHED_TOKEN=token)
    assert health.returncode == 0, health.stderr  # bob holding alice's token is alice: a bearer secret
    client = ServiceClient(url=site.url, auth=TokenAuth(token), ca_file=site.base / "site-ca.pem")
    assert client.call("GET", "/v1/health")["user"] == "kasched-alice"
    refused = kasched_as("kasched-alice", site.client_config, "token", "issue", "kasched-alice", KASCHED_TOKEN=token)
    assert refused.returncode == 5 and "only admins may issue tokens" in refused.stderr
    power = kasched_as("kasched-alice", site.client_config, "power", "status", "-m", "node-6", KASCHED_TOKEN=token)
    assert power.returncode == 5 and "node-6: no active grant" in power.stderr


def test_bad_tokens_are_refused(site: Site) -> None:
    secret = auth.load_secret(site.config.token_secret, create=True)
    expired, _ = auth.issue_token(secret, "kasched-alice", 1, now=time.time() - 7200)
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": f"Bearer {expired}"})
    assert status == 401 and "of kasched-alice expired at" in data["error"]
    good, claims = auth.issue_token(secret, "kasched-alice", 1)
    prefix, _, signature = good.split(".")
    root_claims = auth._b64(json.dumps({"u": "root", "exp": claims.expires, "id": claims.id}).encode())
    for token in (f"{prefix}.{root_claims}.{signature}", auth.issue_token(b"x" * 64, "root", 1)[0]):
        status, data = raw(site, "GET", "/v1/health", headers={"Authorization": f"Bearer {token}"})
        assert status == 401 and data["error"].startswith("token: bad signature"), data
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": "Bearer nonsense"})
    assert status == 401 and "not a kasched token" in data["error"]
    revoked = kasched_as("root", site.client_config, "token", "revoke", claims.id)
    assert revoked.returncode == 0, revoked.stderr
    status, data = raw(site, "GET", "/v1/health", headers={"Authorization": f"Bearer {good}"})
    assert status == 401 and data["error"] == f"token {claims.id} of kasched-alice was revoked"


# --- TLS ---------------------------------------------------------------------------------------------


def test_a_server_signed_by_another_ca_is_refused_by_the_client(site: Site) -> None:
    other_ca, _ = make_ca(site.base, "other-ca")
    config = site.base / "other-client.yaml"
    config.write_text(site.client_config.read_text().replace(str(site.base / "site-ca.pem"), str(other_ca)))
    config.chmod(0o644)
    refused = kasched_as("kasched-alice", config, "nodes", "list")
    assert refused.returncode == 10, refused.stderr
    assert "its certificate is not trusted (certificate verify failed" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_plain_http_to_the_tls_port_gets_nothing(site: Site) -> None:
    host, port = site.config.service_tcp.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    with pytest.raises((http.client.HTTPException, OSError)):
        connection.request("GET", "/v1/health")
        connection.getresponse().read()
    connection.close()
    status, _ = raw(site, "GET", "/v1/health", headers={"Authorization": credential(site, "GET", "/v1/health")})
    assert status == 200  # the service lives on


def test_tcp_without_tls_serves_http_with_munge() -> None:
    base = scratch()
    try:
        with munged(base / "munge") as munge_socket:
            port = free_port()
            client = {"service_url": f"http://127.0.0.1:{port}", "munge_socket": str(munge_socket)}
            with kaschedd(base, client, service_tcp=f"127.0.0.1:{port}", munge_socket=munge_socket) as running:
                done = kasched_as("kasched-alice", running.client_config, "rights", "check", "-m", "node-1")
                assert done.returncode != 0 and "node-1: no active grant" in done.stdout + done.stderr, done
                root = kasched_as("root", running.client_config, "rights", "grant", "-u", "kasched-bob", "-m", "node-1")
                assert root.returncode != 0, "no munge_admin_hosts: root's MUNGE credential is no admin over TCP"
                assert "admins are taken over TCP only from munge_admin_hosts (none)" in root.stderr, root.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- Configuration -----------------------------------------------------------------------------------


def test_tcp_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"service_tcp: 'localhost' is not HOST:PORT"):
        from_mapping({"service_tcp": "localhost"})
    with pytest.raises(ConfigError, match=r"service_url: 'ftp://h:1' is not http\(s\)://HOST:PORT"):
        from_mapping({"service_url": "ftp://h:1"})
    assert from_mapping({"service_tcp": "[::1]:7878"}).service_tcp == "[::1]:7878"
    hosts = from_mapping({"munge_admin_hosts": ["10.0.0.5", "10.1.0.0/16", "fd00::/64"]}).munge_admin_hosts
    assert hosts == ("10.0.0.5/32", "10.1.0.0/16", "fd00::/64")
    with pytest.raises(ConfigError, match=r"munge_admin_hosts: expected a list of IP addresses or networks"):
        from_mapping({"munge_admin_hosts": ["ctl.example.org"]})
    with pytest.raises(ConfigError, match=r"munge_admin_hosts: expected a list"):
        from_mapping({"munge_admin_hosts": "10.0.0.5"})
    key = tmp_path / "key.pem"
    key.write_text("x")
    key.chmod(0o644)
    config = from_mapping({"state_dir": str(tmp_path), "service_tcp": "127.0.0.1:7878", "service_tls_key": str(key)})
    problems, warnings = check(config)
    assert "service_tls_cert and service_tls_key go together: set both or neither" in problems
    assert f"service_tls_key: {key} is readable by others (chmod 600 it)" in problems
    assert any(w.startswith("service_tcp: 127.0.0.1:7878 without TLS") for w in warnings)
