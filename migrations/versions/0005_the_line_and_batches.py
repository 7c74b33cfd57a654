"""the line (admission under Deep-Image's concurrency limit), tenant settings, batches

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Generations gain `priority`, `deadline_at`, `admitted_at` (holds an upstream slot), `batch_id`
and `custom_id`; tenants gain `weight` and `max_in_flight`; `batches` and `upstream_accounts`
are new; an idempotency key may name a batch instead of a generation. Generations that are
queued when this runs have no `admitted_at`: they wait in the line like new ones, and their
old `submit` tasks find them not admitted and leave them to it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Frozen copies of service.models' column types and index conditions at this revision.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
WAITING = "status = 'queued' AND admitted_at IS NULL"
IN_FLIGHT = (
    "admitted_at IS NOT NULL AND source_found_at IS NULL AND (status IN ('queued', "
    "'processing') OR (status = 'canceled' AND upstream_job IS NOT NULL))"
)


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))

    with op.batch_alter_table("generations") as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("batch_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("custom_id", sa.String(length=200), nullable=True))
    # Jobs already at Deep-Image hold their slots from the start.
    op.execute(
        "UPDATE generations SET admitted_at = submitted_at "
        "WHERE status = 'processing' AND submitted_at IS NOT NULL"
    )
    op.create_index(
        "ix_generations_waiting",
        "generations",
        ["tenant_id", sa.desc(sa.column("priority")), "created_at", "id"],
        postgresql_where=sa.text(WAITING),
        sqlite_where=sa.text(WAITING),
    )
    op.create_index(
        "ix_generations_in_flight",
        "generations",
        ["tenant_id"],
        postgresql_where=sa.text(IN_FLIGHT),
        sqlite_where=sa.text(IN_FLIGHT),
    )
    op.create_index("ix_generations_batch", "generations", ["batch_id", "status"])

    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=False),
        sa.Column("template", JSON_DOCUMENT, nullable=True),
        sa.Column("webhook", sa.String(length=2048), nullable=True),
        sa.Column("webhook_events_filter", JSON_DOCUMENT, nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("canceled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batches_tenant_created", "batches", ["tenant_id", "created_at", "id"])

    op.create_table(
        "upstream_accounts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=False),
        sa.Column("limit_source", sa.String(length=20), nullable=False),
        sa.Column("accepted_at_limit", sa.Integer(), nullable=False),
        sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refusals_in_a_row", sa.Integer(), nullable=False),
        sa.Column("refused_before", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )

    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.alter_column("generation_id", existing_type=sa.String(length=40), nullable=True)
        batch_op.add_column(sa.Column("batch_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.drop_column("batch_id")
    op.execute("DELETE FROM idempotency_keys WHERE generation_id IS NULL")
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.alter_column("generation_id", existing_type=sa.String(length=40), nullable=False)
    op.drop_table("upstream_accounts")
    op.drop_index("ix_batches_tenant_created", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_generations_batch", table_name="generations")
    op.drop_index("ix_generations_in_flight", table_name="generations")
    op.drop_index("ix_generations_waiting", table_name="generations")
    with op.batch_alter_table("generations") as batch_op:
        for column in ("custom_id", "batch_id", "admitted_at", "deadline_at", "priority"):
            batch_op.drop_column(column)
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("max_in_flight")
        batch_op.drop_column("weight")
