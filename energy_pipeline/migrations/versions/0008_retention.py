"""Retention: an index on the quarantine's minute, so removing old quarantine rows in batches
reads only those rows.

Revision ID: 0008
Revises: 0005
Create Date: 2026-11-28
"""

from alembic import op

revision = "0008"
down_revision = "0005"
branch_labels = ("retention",)
depends_on = None

UPGRADE = """
SET LOCAL ROLE energy_owner;
CREATE INDEX IF NOT EXISTS quarantine_bucket_idx ON energy.quarantine (bucket);
RESET ROLE;
"""

DOWNGRADE = "DROP INDEX IF EXISTS energy.quarantine_bucket_idx;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
