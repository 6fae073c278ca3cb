"""Audit: (action, created_at) and (outcome, created_at) indexes for date-window queries.

Measured on a million records (benchmarks/bench_audit.py): on SQLite, a one-day window 45 days back
combined with a common action took 180 ms (outcome: 76 ms), walking the (action, seq) index from the
newest match; with these indexes 19 ms and 5 ms.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_logs_action_created_at", "audit_logs", ["action", "created_at"])
    op.create_index("ix_audit_logs_outcome_created_at", "audit_logs", ["outcome", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_logs_outcome_created_at", "audit_logs")
    op.drop_index("ix_audit_logs_action_created_at", "audit_logs")
