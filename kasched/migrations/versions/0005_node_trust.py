"""nodes.host_key and nodes.trusted: the SSH host key kaschedd gave the node's running system at its
boot, and whether that system is the verified reference environment no user has held since

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 18:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing nodes: no pinned key, not trusted: their next revert is a full, verified one.
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_key", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("trusted", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("trusted")
        batch_op.drop_column("host_key")
