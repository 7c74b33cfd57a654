"""one retry policy per kind of task: tasks lose `max_attempts`

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

How many attempts a task gets is its kind's retry policy (service/runtime/kinds.py), read when
an attempt fails; a copy on each row could disagree with it (deliveries' rows did: 10 against
a schedule of 8 attempts over 27.6 h and a default age limit of 24 h).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.drop_column("max_attempts")


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.add_column(
            sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="10")
        )
