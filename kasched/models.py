"""The persistent data of a site, as sqlalchemy 2 typed models.

Schema changes go through alembic migrations in ``kasched/migrations``; a test checks that the
migrations produce exactly these models.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite and MariaDB store naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class NodeState(enum.StrEnum):
    """Where a node stands in its life cycle."""

    REFERENCE = "reference"  # running the site's reference environment, ready for jobs
    DEPLOYING = "deploying"  # a deployment is in progress
    DEPLOYED = "deployed"  # running a user's environment
    DEPLOY_FAILED = "deploy_failed"  # the last deployment failed on this node
    REVERTING = "reverting"  # going back to the reference environment
    DOWN = "down"  # unreachable or taken out by an admin


class Visibility(enum.StrEnum):
    PRIVATE = "private"  # the owner only
    SHARED = "shared"  # any user may deploy it, listed on request
    PUBLIC = "public"  # any user, listed by default; set by admins only


class ImageKind(enum.StrEnum):
    TAR = "tar"  # a root file system tarball, unpacked on a formatted partition
    RAW = "raw"  # a raw disk or partition image, written as is (any OS)


class Compression(enum.StrEnum):
    NONE = "none"
    GZ = "gz"
    XZ = "xz"
    ZST = "zst"


class Cluster(Base):
    __tablename__ = "clusters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    site: Mapped[str] = mapped_column(String(64))
    nodes: Mapped[list[Node]] = relationship(back_populates="cluster")


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"))
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    ip: Mapped[str] = mapped_column(String(45), unique=True)
    bmc_driver: Mapped[str] = mapped_column(String(32), default="ipmi")
    bmc_address: Mapped[str | None] = mapped_column(String(255))
    bmc_port: Mapped[int] = mapped_column(Integer, default=623)
    bmc_credentials: Mapped[str | None] = mapped_column(String(64))
    switch: Mapped[str] = mapped_column(String(64), default="")
    rack: Mapped[str] = mapped_column(String(64), default="")
    disk_device: Mapped[str] = mapped_column(String(128), default="/dev/sda")
    reference_partition: Mapped[int] = mapped_column(Integer, default=2)
    deploy_partition: Mapped[int] = mapped_column(Integer, default=3)
    state: Mapped[NodeState] = mapped_column(
        Enum(NodeState, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]),
        default=NodeState.REFERENCE,
    )
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    environment_id: Mapped[int | None] = mapped_column(ForeignKey("environments.id", ondelete="SET NULL"))
    # The SSH host key (``ssh-ed25519 AAAA...``) kaschedd gave the system the node runs now, in that
    # system's boot files (kasched.bootkeys); None: the node runs a system kasched does not vouch for.
    host_key: Mapped[str | None] = mapped_column(Text, default=None)
    # The node runs the reference environment, its partition verified by kaschedd, and no user has
    # held it since (a deploy, a reboot or a power action of a user clears it): the only state in
    # which kasched believes what the running system says (nomini, the revert's no-reboot check).
    trusted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    cluster: Mapped[Cluster] = relationship(back_populates="nodes")
    environment: Mapped[Environment | None] = relationship()


class Environment(Base):
    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("name", "version", "owner", name="uq_environment"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    visibility: Mapped[Visibility] = mapped_column(
        Enum(Visibility, native_enum=False, length=10, values_callable=lambda e: [m.value for m in e])
    )
    image_kind: Mapped[ImageKind] = mapped_column(
        Enum(ImageKind, native_enum=False, length=10, values_callable=lambda e: [m.value for m in e])
    )
    compression: Mapped[Compression] = mapped_column(
        Enum(Compression, native_enum=False, length=10, values_callable=lambda e: [m.value for m in e])
    )
    image_location: Mapped[str] = mapped_column(Text)
    image_size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    kernel: Mapped[str] = mapped_column(String(255), default="")
    initrd: Mapped[str] = mapped_column(String(255), default="")
    cmdline: Mapped[str] = mapped_column(Text, default="")
    postinstall: Mapped[list[str]] = mapped_column(JSON, default=list)
    destructive: Mapped[bool] = mapped_column(default=False)
    reference: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Grant(Base):
    """The right of one user to deploy a set of nodes, bound to one scheduler job, until it ends."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("scheduler", "cluster", "job_id", name="uq_grant_job"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    scheduler: Mapped[str] = mapped_column(String(32))
    cluster: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(64), index=True)
    origin: Mapped[str] = mapped_column(String(128))
    environment_request: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoke_reason: Mapped[str | None] = mapped_column(String(255))
    nodes: Mapped[list[GrantNode]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class GrantNode(Base):
    __tablename__ = "grant_nodes"
    __table_args__ = (Index("ix_grant_nodes_node", "node_id"),)

    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    node: Mapped[Node] = relationship()


class StepRecord(Base):
    """One step (one attempt of one variant) of an operation on one node: the history behind ``stats``.
    Its table keeps its first name, ``operations`` (renaming a table needs a migration on every site's
    database for no change in what it holds)."""

    __tablename__ = "operations"
    __table_args__ = (Index("ix_operations_node_started", "node", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    node: Mapped[str] = mapped_column(String(128))
    user: Mapped[str] = mapped_column(String(64), index=True)
    environment: Mapped[str | None] = mapped_column(String(200))
    deployment_id: Mapped[str | None] = mapped_column(String(64), index=True)
    step: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    duration: Mapped[float] = mapped_column(Float)
    ok: Mapped[bool]
    error: Mapped[str | None] = mapped_column(Text)
    # False: a failed attempt after which the node had another retry or variant (not the node failing).
    # Rows written before this column existed read as true.
    final: Mapped[bool] = mapped_column(default=True, server_default=true())


class OperationKind(enum.StrEnum):
    """What an operation does to its nodes."""

    DEPLOY = "deploy"
    REVERT = "revert"
    REBOOT = "reboot"
    POWER = "power"


class OperationState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"  # every node succeeded
    PARTIAL = "partial"  # some nodes failed
    FAILED = "failed"  # every node failed
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the process running it died; its nodes were put in a known state


class Operation(Base):
    """One operation (deploy, revert or reboot) on a set of nodes, and its outcome per node. Its tables
    keep their first names, ``deployments`` and ``deployment_nodes`` (no migration for a rename)."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # an OperationKind value
    user: Mapped[str] = mapped_column(String(64), index=True)
    environment: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[OperationState] = mapped_column(
        Enum(OperationState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=OperationState.RUNNING,
    )
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    # The process that runs it: random per process start, with that process's start time, so that a
    # dead process is told from a live one that got its PID (kasched.deploy.records.recover_interrupted).
    instance: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # The grant it runs under (None: an admin's operation, e.g. a revert at a job's end). Revoking the
    # grant cancels it; each step checks that its nodes are still granted.
    grant_id: Mapped[int | None] = mapped_column(
        ForeignKey("grants.id", ondelete="SET NULL", name="fk_deployments_grant_id"), index=True
    )
    # A revert of nodes whose job ended (at the job's end, or reconcile's): a deployment of the nodes'
    # next job waits for it (kasched.errors.NodesBeingGivenBack) instead of being refused.
    gives_back: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    nodes: Mapped[list[OperationNode]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class OperationNode(Base):
    __tablename__ = "deployment_nodes"

    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    node: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[str] = mapped_column(String(64), default="")
    ok: Mapped[bool | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text)
    duration: Mapped[float] = mapped_column(Float, default=0.0)
