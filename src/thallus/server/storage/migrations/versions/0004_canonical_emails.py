"""Users: stored addresses in today's canonical form (NFKC, trimmed, IDNA 2008, lower case).

Addresses used to be stored as ``email-validator``'s normalisation lower-cased, without NFKC; an
address with compatibility characters (full-width letters, say) would no longer be found by the
lookup, which now folds them. Each such row is rewritten to its canonical form — unless another
user already holds that form, in which case both rows stay as they are and a warning names the
user ids, for an operator to resolve (two accounts that sign in as one address cannot both win).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import logging

import sqlalchemy as sa
from alembic import op

from thallus.server.identity.emails import canonical_email

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

logger = logging.getLogger("thallus.server.storage")
users = sa.table("users", sa.column("id", sa.String), sa.column("email", sa.String))


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(users.c.id, users.c.email)).all()
    taken = {email for _, email in rows}
    for user_id, email in rows:
        canonical = canonical_email(email)
        if canonical is None or canonical == email:
            continue
        if canonical in taken:
            holder = next(other for other, address in rows if address == canonical)
            logger.warning("users %s and %s share the canonical address; left unchanged", user_id, holder)
            continue
        connection.execute(sa.update(users).where(users.c.id == user_id).values(email=canonical))
        taken.add(canonical)


def downgrade() -> None:
    pass  # the earlier form is not recoverable, and every canonical address was valid before too
