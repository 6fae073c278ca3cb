"""Identity: the change log every instance's in-memory view follows (docs/design.md §12).

One row per change that can turn a credential away — a session revoked, a user changed (password,
role, features, active), an API key revoked — in the same transaction as the change. Instances poll
it by ``seq`` (the primary key: an index range scan of the few rows since their last read) and,
on PostgreSQL, are woken by ``NOTIFY thallus_identity`` at commit.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_changes",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_identity_changes_created_at", "identity_changes", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_identity_changes_created_at", "identity_changes")
    op.drop_table("identity_changes")
