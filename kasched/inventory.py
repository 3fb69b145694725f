"""The site inventory: sites, clusters and nodes described in one YAML file (docs/inventory.md)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasched.errors import ConflictError, InputError
from kasched.nodeset import expand_ordered, expand_value
from kasched.yamlfile import parse_text, read_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
NODE_KEYS = {"name", "mac", "ip", "bmc", "switch", "rack", "disk"}
BMC_KEYS = {"driver", "address", "port", "credentials"}
DISK_KEYS = {"device", "reference_partition", "deploy_partition"}
POWER_DRIVERS = {"ipmi", "ssh", "simulated"}  # simulated: docs/simulated.md


@dataclass(frozen=True)
class NodeSpec:
    """One node as the inventory describes it, validated."""

    name: str
    cluster: str
    mac: str
    ip: str
    bmc_driver: str = "ipmi"
    bmc_address: str | None = None
    bmc_port: int = 623
    bmc_credentials: str | None = None
    switch: str = ""
    rack: str = ""
    disk_device: str = "/dev/sda"
    reference_partition: int = 2
    deploy_partition: int = 3


@dataclass
class Inventory:
    site: str
    clusters: list[str] = field(default_factory=list)
    nodes: list[NodeSpec] = field(default_factory=list)


def load(path: str | Path) -> Inventory:
    """Read and validate an inventory file. Every error names the file, the entry and the field."""
    return loads(read_text(path), source=str(path))


def loads(text: str, *, source: str) -> Inventory:
    """Validate an inventory given as text; ``source`` names it in errors."""
    data = parse_text(text, source)
    try:
        return parse(data)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None


def parse(data: Any) -> Inventory:
    if not isinstance(data, dict):
        raise InputError("expected a mapping with 'site' and 'clusters'")
    _check_keys(data, {"site", "clusters"}, "top level")
    site = _name(data.get("site", "default"), "site")
    clusters = data.get("clusters")
    if not isinstance(clusters, list) or not clusters:
        raise InputError("expected a non-empty list", field="clusters")
    inventory = Inventory(site=site)
    for index, cluster in enumerate(clusters):
        where = f"clusters[{index}]"
        if not isinstance(cluster, dict):
            raise InputError("expected a mapping", field=where)
        _check_keys(cluster, {"name", "defaults", "nodes"}, where)
        name = _name(cluster.get("name"), f"{where}.name")
        inventory.clusters.append(name)
        defaults = cluster.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise InputError("expected a mapping of node fields", field=f"{where}.defaults")
        _check_keys(defaults, NODE_KEYS - {"name", "mac", "ip"}, f"{where}.defaults")
        entries = cluster.get("nodes")
        if not isinstance(entries, list) or not entries:
            raise InputError("expected a non-empty list", field=f"{where}.nodes")
        for entry_index, entry in enumerate(entries):
            inventory.nodes.extend(_parse_entry(entry, defaults, name, f"{where}.nodes[{entry_index}]"))
    _check_unique(inventory.nodes)
    return inventory


def _parse_entry(entry: Any, defaults: dict[str, Any], cluster: str, where: str) -> list[NodeSpec]:
    if not isinstance(entry, dict):
        raise InputError("expected a mapping", field=where)
    _check_keys(entry, NODE_KEYS, where)
    merged = {**defaults, **entry}
    for key in ("bmc", "disk"):  # nested mappings merge key by key
        merged[key] = {**_mapping(defaults.get(key), f"{where}.{key}"), **_mapping(entry.get(key), f"{where}.{key}")}
    _check_keys(merged["bmc"], BMC_KEYS, f"{where}.bmc")
    _check_keys(merged["disk"], DISK_KEYS, f"{where}.disk")
    for key in ("name", "mac", "ip"):
        if not isinstance(merged.get(key), str) or not merged[key]:
            raise InputError("required, a string", field=f"{where}.{key}")
    names = expand_ordered(merged["name"], field=f"{where}.name")
    count = len(names)
    macs = expand_value(merged["mac"].lower(), count, field=f"{where}.mac")
    ips = expand_value(merged["ip"], count, field=f"{where}.ip")
    bmc, disk = merged["bmc"], merged["disk"]
    address = bmc.get("address")
    bmc_addresses = expand_value(str(address), count, field=f"{where}.bmc.address") if address else [None] * count
    common = _common_fields(merged, bmc, disk, where)
    specs = []
    for name, mac, ip, bmc_address in zip(names, macs, ips, bmc_addresses, strict=True):
        specs.append(
            NodeSpec(
                name=_name(name, f"{where}.name"),
                cluster=cluster,
                mac=_mac(mac, f"{where}.mac"),
                ip=_ip(ip, f"{where}.ip"),
                bmc_address=_ip_or_host(bmc_address, f"{where}.bmc.address"),
                **common,
            )
        )
    if common["bmc_driver"] == "ipmi":
        if address is None:
            raise InputError("required for the ipmi driver", field=f"{where}.bmc.address")
        if not common["bmc_credentials"]:
            raise InputError(
                "required for the ipmi driver (a name in the credentials file)", field=f"{where}.bmc.credentials"
            )
    return specs


def _common_fields(merged: dict[str, Any], bmc: dict[str, Any], disk: dict[str, Any], where: str) -> dict[str, Any]:
    driver = bmc.get("driver", "ipmi")
    if driver not in POWER_DRIVERS:
        raise InputError(
            f"unknown driver {driver!r} (known: {', '.join(sorted(POWER_DRIVERS))})", field=f"{where}.bmc.driver"
        )
    credentials = bmc.get("credentials")
    if credentials is not None:
        credentials = _name(credentials, f"{where}.bmc.credentials")
    fields = {
        "bmc_driver": driver,
        "bmc_port": _int(bmc.get("port", 623), f"{where}.bmc.port", 1, 65535),
        "bmc_credentials": credentials,
        "switch": _optional_name(merged.get("switch"), f"{where}.switch"),
        "rack": _optional_name(merged.get("rack"), f"{where}.rack"),
        "disk_device": _device(disk.get("device", "/dev/sda"), f"{where}.disk.device"),
        "reference_partition": _int(disk.get("reference_partition", 2), f"{where}.disk.reference_partition", 1, 128),
        "deploy_partition": _int(disk.get("deploy_partition", 3), f"{where}.disk.deploy_partition", 1, 128),
    }
    if fields["reference_partition"] == fields["deploy_partition"]:
        raise InputError("must differ from the reference partition", field=f"{where}.disk.deploy_partition")
    return fields


def _check_unique(nodes: list[NodeSpec]) -> None:
    for attribute in ("name", "mac", "ip"):
        seen: set[str] = set()
        for node in nodes:
            value = getattr(node, attribute)
            if value in seen:
                raise InputError(f"{value} is given to more than one node", field=attribute)
            seen.add(value)


def _check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise InputError(
            f"unknown field(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(known))})", field=where
        )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError("expected a mapping", field=where)
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InputError(f"{value!r} is not a valid name (letters, digits, '.', '_', '-')", field=where)
    return value


def _optional_name(value: Any, where: str) -> str:
    return "" if value in (None, "") else _name(value, where)


def _mac(value: str, where: str) -> str:
    if not MAC_RE.match(value):
        raise InputError(f"{value!r} is not a MAC address", field=where)
    return value


def _ip(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InputError(f"{value!r} is not an IP address", field=where) from None


def _ip_or_host(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if re.match(r"^[A-Za-z0-9][A-Za-z0-9.-]*$", value):
            return value
        raise InputError(f"{value!r} is neither an IP address nor a host name", field=where) from None


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{value!r} is not a whole number from {low} to {high}", field=where)
    return value


def _device(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.match(r"^/dev/[A-Za-z0-9/_.:-]+$", value) or ".." in value:
        raise InputError(f"{value!r} is not a device path under /dev", field=where)
    return value


def conflicts_with_database(spec: NodeSpec, by_mac: dict[str, str], by_ip: dict[str, str]) -> None:
    """Refuse a node whose MAC or IP another node (by name) already has in the database."""
    for value, owners, label in ((spec.mac, by_mac, "MAC"), (spec.ip, by_ip, "IP")):
        owner = owners.get(value)
        if owner is not None and owner != spec.name:
            raise ConflictError(f"{label} {value} of node {spec.name} belongs to node {owner} already")
