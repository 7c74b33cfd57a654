"""secrets replaced before a subscription's previous one keep signing through their overlap

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

A second rotation within 24 hours overwrote `previous_secret`: the secret the receivers held
stopped signing at once (a client that sent the rotation again, having lost the first answer,
found every delivery failing verification). `earlier_secrets` keeps the ones before it, each
until its own 24 hours are over. A column added, nothing dropped: the release before keeps
working while this one deploys (it signs with the current and the previous secret, as before).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# A frozen copy of service.models' JSON column type at this revision.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("subscriptions", sa.Column("earlier_secrets", JSON_DOCUMENT, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch_op:
        batch_op.drop_column("earlier_secrets")
