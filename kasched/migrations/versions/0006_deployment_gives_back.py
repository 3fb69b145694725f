"""deployments.gives_back: the operation reverts nodes whose job ended (the revert at a job's end, or
reconcile's), so that a deployment of the nodes' next job waits for it instead of being refused

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 21:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gives_back", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("gives_back")
