"""index of the trigger events housekeeping deletes

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

Housekeeping now deletes trigger events that made no generation (`rejected`, `skipped`) once
they are 30 days old (service/runtime/housekeeping.py). This partial index holds just those
rows, by arrival, so each of its batches reads the oldest of them and nothing else. On
PostgreSQL it is built CONCURRENTLY: pushes go on during the migration.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.migrate import create_index_concurrently

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

NAME = "ix_trigger_events_unaccepted_created"
TABLE = "trigger_events"
UNACCEPTED = sa.text("status <> 'accepted'")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        create_index_concurrently(NAME, TABLE, ["created_at"], postgresql_where=UNACCEPTED)
    else:
        op.create_index(NAME, TABLE, ["created_at"], sqlite_where=UNACCEPTED)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(NAME, TABLE, postgresql_concurrently=True, if_exists=True)
    else:
        op.drop_index(NAME, TABLE)
