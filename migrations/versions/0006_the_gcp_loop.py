"""the GCP loop: tenants' buckets, storages, output and retention; retention of results; triggers

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Tenants gain `allowed_input_buckets` and `allowed_storages` (JSON lists; none allowed by
default, which refuses `storage://` inputs and targets that earlier versions forwarded),
`output_uri` and `retention_seconds`; generations gain `retention_seconds` and
`result_expired_at`; `triggers` and `trigger_events` are new.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# A frozen copy of service.models' JSON column type at this revision.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("allowed_input_buckets", JSON_DOCUMENT, nullable=True))
        batch_op.add_column(sa.Column("allowed_storages", JSON_DOCUMENT, nullable=True))
        batch_op.add_column(sa.Column("output_uri", sa.String(length=1100), nullable=True))
        batch_op.add_column(sa.Column("retention_seconds", sa.Integer(), nullable=True))
    with op.batch_alter_table("generations") as batch_op:
        batch_op.add_column(sa.Column("retention_seconds", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("result_expired_at", sa.DateTime(timezone=True), nullable=True)
        )

    op.create_table(
        "triggers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("bucket", sa.String(length=222), nullable=True),
        sa.Column("name_prefix", sa.String(length=1024), nullable=False),
        sa.Column("name_suffix", sa.String(length=1024), nullable=False),
        sa.Column("template", JSON_DOCUMENT, nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=False),
        sa.Column("webhook", sa.String(length=2048), nullable=True),
        sa.Column("push_accounts", JSON_DOCUMENT, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_triggers_tenant_created", "triggers", ["tenant_id", "created_at", "id"])
    op.create_table(
        "trigger_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("trigger_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("subject", sa.String(length=1100), nullable=True),
        sa.Column("generation_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["trigger_id"], ["triggers.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("trigger_id", "event_id", name="uq_trigger_events_event"),
    )
    op.create_index(
        "ix_trigger_events_trigger_created",
        "trigger_events",
        ["trigger_id", "created_at", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_trigger_events_trigger_created", table_name="trigger_events")
    op.drop_table("trigger_events")
    op.drop_index("ix_triggers_tenant_created", table_name="triggers")
    op.drop_table("triggers")
    with op.batch_alter_table("generations") as batch_op:
        batch_op.drop_column("result_expired_at")
        batch_op.drop_column("retention_seconds")
    with op.batch_alter_table("tenants") as batch_op:
        for column in ("retention_seconds", "output_uri", "allowed_storages"):
            batch_op.drop_column(column)
        batch_op.drop_column("allowed_input_buckets")
