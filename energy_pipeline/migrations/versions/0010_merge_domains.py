"""One head again: alerts (0006), reports (0007), retention (0008) and read paths (0009) were
written side by side, each branching from 0005; they touch different tables, so their order does
not matter. A later revision builds on this one.

Revision ID: 0010
Revises: 0006, 0007, 0008, 0009
Create Date: 2026-11-28
"""

revision = "0010"
down_revision = ("0006", "0007", "0008", "0009")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
