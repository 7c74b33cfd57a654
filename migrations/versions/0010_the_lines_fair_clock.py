"""the line's fair clock: a virtual time on the account, a start tag per tenant

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

The line broke ties between tenants holding as many slots for their weight by whose next
generation was oldest: with one free slot at a time, a catalog's old items won every tie
against another tenant's new request, whatever the weights. Ties now go by start-time fair
queuing (service/generations/line.py, FairClock), whose state is these two columns. Both
start at 0, which is where a new clock starts: nothing to fill in.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("fair_tag", sa.Float(), nullable=False, server_default="0"))
    op.add_column(
        "upstream_accounts",
        sa.Column("fair_clock", sa.Float(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("upstream_accounts") as batch:
        batch.drop_column("fair_clock")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("fair_tag")
