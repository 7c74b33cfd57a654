"""index for listing a tenant's generations by status

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21

`GET /v1/generations?status=...` filtered the tenant's newest-first index row by row, or
combined it with the global status index (a BitmapAnd: 2.7 ms at 1 M rows, growing with the
table). This index serves the filtered list in order and stops after one page. On PostgreSQL
it is built CONCURRENTLY, so a migration against a live database does not block intake.
"""

from __future__ import annotations

from alembic import op

from service.migrate import create_index_concurrently

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NAME = "ix_generations_tenant_status_created"
COLUMNS = ["tenant_id", "status", "created_at", "id"]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        create_index_concurrently(NAME, "generations", COLUMNS)
    else:
        op.create_index(NAME, "generations", COLUMNS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(NAME, "generations", postgresql_concurrently=True, if_exists=True)
    else:
        op.drop_index(NAME, "generations")
