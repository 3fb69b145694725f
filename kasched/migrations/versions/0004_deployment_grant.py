"""deployments.grant_id and deployments.instance: the grant an operation runs under, and the process
start (instance) that runs it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 15:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows: no grant (nothing to cancel them by) and no instance (recovered by their PID).
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance", sa.String(length=64), server_default="", nullable=False))
        batch_op.add_column(sa.Column("grant_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_deployments_grant_id"), ["grant_id"], unique=False)
        batch_op.create_foreign_key("fk_deployments_grant_id", "grants", ["grant_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_constraint("fk_deployments_grant_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_deployments_grant_id"))
        batch_op.drop_column("grant_id")
        batch_op.drop_column("instance")
