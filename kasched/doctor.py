"""``kasched doctor``: what kasched sees of this site, one line per check. The configuration, the
database, the reference environment, the service, then what each scheduler plugin checks of its
scheduler (which client it uses, whether the hooks are configured)."""

from __future__ import annotations

import ipaddress
import socket

from kasched import config as site_config
from kasched import imagesecrets
from kasched.api import Kasched
from kasched.errors import KaschedError
from kasched.nodeset import fold
from kasched.schedulers import Check


def doctor(api: Kasched) -> list[Check]:
    checks = [*_configuration(api), _database(api), _reference(api), _reference_secrets(api)]
    checks.extend([*_munge_admin_hosts(api), _service(api), *_reconcile_reach(api)])
    for adapter in api.bus.scheduler_adapters():
        try:
            found = adapter.doctor()
        except KaschedError as error:
            found = [Check("plugin", False, f"its checks failed: {error}")]
        checks.extend(Check(f"{adapter.name}: {c.what}", c.ok, c.detail) for c in found)
    return checks


def _configuration(api: Kasched) -> list[Check]:
    problems, warnings = site_config.check(api.config)
    source = str(api.config.path or "embedded defaults")
    checks = [Check("configuration", not problems, "; ".join(problems) or source)]
    checks.extend(Check("configuration", True, f"warning: {w}") for w in warnings)
    return checks


def _database(api: Kasched) -> Check:
    url = api.database.engine.url.render_as_string(hide_password=True)
    try:
        api.rights()
    except KaschedError as error:
        return Check("database", False, str(error))
    return Check("database", True, f"{url}, schema up to date")


def _reference(api: Kasched) -> Check:
    try:
        reference = api.reference_environment()
    except KaschedError as error:
        return Check("reference environment", False, str(error))
    if reference is None:
        return Check("reference environment", False, "none: nodes cannot be given back (add one, reference: true)")
    return Check("reference environment", True, reference.label)


def _reference_secrets(api: Kasched) -> Check:
    """A warning when the reference image holds a well-known host secret: every deploy job's user can
    read the reference partition (docs/security.md, "No secret on a node's disk is trusted")."""
    what = "reference environment secrets"
    try:
        reference = api.reference_environment()
        if reference is None:
            return Check(what, True, "no reference environment to look into")
        found = imagesecrets.scan(api.config, reference)
    except KaschedError as error:
        return Check(what, True, f"warning: not checked: {error}")
    if not found:
        return Check(what, True, f"none of {len(imagesecrets.SECRETS)} well-known host secrets in {reference.label}")
    listed = "; ".join(f"{f.path} ({f.what})" for f in found)
    return Check(
        what,
        True,
        f"warning: {reference.label}'s image holds {listed}: every deploy job's user can read them from the "
        "reference partition; deliver them at boot to verified reference nodes only, or rotate them after deploy "
        "jobs (docs/security.md)",
    )


def _munge_admin_hosts(api: Kasched) -> list[Check]:
    """A problem when ``munge_admin_hosts`` takes in a node's address: a deploy job's user is root on
    that node, and with the MUNGE key it carries they would be an admin over TCP."""
    if not api.config.munge_admin_hosts:
        return []
    networks = site_config.admin_networks(api.config.munge_admin_hosts)
    try:
        nodes = [n for n in api.list_nodes() if any(_in(n.ip, network) for network in networks)]
    except KaschedError as error:
        return [Check("munge_admin_hosts", False, f"cannot check against the inventory: {error}")]
    if nodes:
        names = fold([n.name for n in nodes])
        return [Check("munge_admin_hosts", False, f"it takes in the address of {names}: no node belongs there")]
    return [Check("munge_admin_hosts", True, f"{', '.join(api.config.munge_admin_hosts)}: no node's address")]


def _in(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


def _reconcile_reach(api: Kasched) -> list[Check]:
    """What kaschedd's reconcile sees of each scheduler, asked of kaschedd itself when it answers (it may
    run elsewhere, or in another network namespace, than this command); else what this host sees."""
    from kasched.reconcile import reach
    from kasched.service.client import client_for

    if api.config.service_socket.is_socket() or api.config.service_url:
        try:
            status, found = client_for(api.config).request("GET", "/v1/reconcile/reach")
        except KaschedError as error:
            found, status = str(error), 0
        if status == 200 and isinstance(found, list):
            return [Check(f"kaschedd: {c['what']}", bool(c["ok"]), str(c["detail"])) for c in found]
        detail = found.get("error", found) if isinstance(found, dict) else found
        return [Check("kaschedd: reconcile", False, f"cannot ask kaschedd what it sees of the schedulers: {detail}")]
    return [Check(f"here: {c.what}", c.ok, c.detail) for c in reach(api)]


def _service(api: Kasched) -> Check:
    path = api.config.service_socket
    if not path.is_socket():
        return Check("kaschedd", True, f"not running ({path} absent): commands use the database directly")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError as error:
            return Check("kaschedd", False, f"{path} does not answer: {error.strerror or error}")
    return Check("kaschedd", True, f"listening on {path}")
