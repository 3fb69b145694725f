"""operations.final: whether a failed attempt was the node's last chance in its step

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 09:12:40.118532
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows get true: before this column, every recorded attempt was shown as final.
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("final", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_column("final")
