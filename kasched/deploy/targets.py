"""From inventory nodes to driver targets: resolve each node's BMC credentials from the site's
credentials file (the database holds only their names)."""

from __future__ import annotations

from collections.abc import Sequence

from kasched.config import Config, load_credentials
from kasched.drivers.base import NodeTarget
from kasched.errors import ConfigError
from kasched.views import NodeView


def targets(config: Config, nodes: Sequence[NodeView]) -> list[NodeTarget]:
    """Driver targets for ``nodes``; a node naming unknown credentials is an error naming both."""
    credentials = load_credentials(config)
    result = []
    for node in nodes:
        user = password = None
        if node.bmc_credentials:
            entry = credentials.get(node.bmc_credentials)
            if entry is None:
                raise ConfigError(
                    f"node {node.name}: credentials {node.bmc_credentials!r} are not in {config.credentials_file}"
                )
            user, password = entry["user"], entry["password"]
        result.append(
            NodeTarget(
                name=node.name,
                mac=node.mac,
                ip=node.ip,
                bmc_address=node.bmc_address,
                bmc_port=node.bmc_port,
                bmc_user=user,
                bmc_password=password,
                disk_device=node.disk_device,
                reference_partition=node.reference_partition,
                deploy_partition=node.deploy_partition,
            )
        )
    return result
