"""Plain, serialisable views of the stored data, as the API returns them to the CLI and the service."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from kasched import models


@dataclass(frozen=True)
class NodeView:
    name: str
    cluster: str
    site: str
    mac: str
    ip: str
    bmc_driver: str
    bmc_address: str | None
    bmc_port: int
    bmc_credentials: str | None
    switch: str
    rack: str
    disk_device: str
    reference_partition: int
    deploy_partition: int
    state: str
    state_changed_at: datetime
    environment: str | None
    trusted: bool = False  # the verified reference, no user since (models.Node.trusted)
    host_key: str | None = None  # the key kaschedd gave its running system at boot (kasched.bootkeys)

    @classmethod
    def of(cls, node: models.Node) -> NodeView:
        env = node.environment
        return cls(
            name=node.name,
            cluster=node.cluster.name,
            site=node.cluster.site,
            mac=node.mac,
            ip=node.ip,
            bmc_driver=node.bmc_driver,
            bmc_address=node.bmc_address,
            bmc_port=node.bmc_port,
            bmc_credentials=node.bmc_credentials,
            switch=node.switch,
            rack=node.rack,
            disk_device=node.disk_device,
            reference_partition=node.reference_partition,
            deploy_partition=node.deploy_partition,
            state=node.state.value,
            state_changed_at=node.state_changed_at,
            environment=f"{env.name}@{env.owner}:{env.version}" if env else None,
            trusted=node.trusted,
            host_key=node.host_key,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EnvironmentView:
    name: str
    version: int
    owner: str
    description: str
    visibility: str
    image_kind: str
    compression: str
    image_location: str
    image_size: int
    sha256: str
    kernel: str
    initrd: str
    cmdline: str
    postinstall: list[str]
    destructive: bool
    reference: bool
    created_at: datetime

    @property
    def label(self) -> str:
        return f"{self.name}@{self.owner}:{self.version}"

    @classmethod
    def of(cls, env: models.Environment) -> EnvironmentView:
        return cls(
            name=env.name,
            version=env.version,
            owner=env.owner,
            description=env.description,
            visibility=env.visibility.value,
            image_kind=env.image_kind.value,
            compression=env.compression.value,
            image_location=env.image_location,
            image_size=env.image_size,
            sha256=env.sha256,
            kernel=env.kernel,
            initrd=env.initrd,
            cmdline=env.cmdline,
            postinstall=list(env.postinstall),
            destructive=env.destructive,
            reference=env.reference,
            created_at=env.created_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GrantView:
    id: int
    scheduler: str
    cluster: str
    job_id: str
    user: str
    origin: str
    nodes: tuple[str, ...]
    environment_request: str | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and self.expires_at > models.utcnow()

    @property
    def job(self) -> str:
        return f"{self.scheduler}:{self.cluster}:{self.job_id}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["active"] = self.active
        return data


@dataclass(frozen=True)
class StepView:
    kind: str
    node: str
    user: str
    environment: str | None
    deployment_id: str | None
    step: str
    started_at: datetime
    duration: float
    ok: bool
    error: str | None

    @classmethod
    def of(cls, op: models.StepRecord) -> StepView:
        return cls(
            kind=op.kind,
            node=op.node,
            user=op.user,
            environment=op.environment,
            deployment_id=op.deployment_id,
            step=op.step,
            started_at=op.started_at,
            duration=op.duration,
            ok=op.ok,
            error=op.error,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """The answer to "may user U deploy nodes N now?", with the reason for each refused node."""

    user: str
    allowed: bool
    refused: dict[str, str]  # node -> why not
    grants: dict[str, str]  # node -> job whose grant allows it ("admin" for admins)

    def reason(self) -> str:
        if self.allowed:
            return "allowed"
        from kasched.nodeset import fold

        by_reason: dict[str, list[str]] = {}
        for node, why in self.refused.items():
            by_reason.setdefault(why, []).append(node)
        return "; ".join(f"{fold(nodes)}: {why}" for why, nodes in by_reason.items())
