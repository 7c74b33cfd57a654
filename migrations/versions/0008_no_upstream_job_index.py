"""generations lose the index on `upstream_job`

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

No statement looks a generation up by its Deep-Image job: a callback's URL names the
generation, and every read goes by its id. The index only cost writes: Deep-Image's job ids
are random, so each status change put an entry on a random leaf of a B-tree as large as the
table (on a large table, a cold page, written to the WAL in full after each checkpoint).
On PostgreSQL it is dropped CONCURRENTLY, so a migration against a live database does not
block intake.
"""

from __future__ import annotations

from alembic import op

from service.migrate import create_index_concurrently

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

NAME = "ix_generations_upstream_job"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(NAME, "generations", postgresql_concurrently=True, if_exists=True)
    else:
        op.drop_index(NAME, "generations")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        create_index_concurrently(NAME, "generations", ["upstream_job"])
    else:
        op.create_index(NAME, "generations", ["upstream_job"])
