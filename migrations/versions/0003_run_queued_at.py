"""runs record when they were last queued

A requeued run goes to the back of the broker's queue, so its queue position counts the runs
queued before that moment, not those created before it. Existing runs were queued when they
were created.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 02:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
    runs = sa.table("runs", sa.column("queued_at", sa.DateTime(timezone=True)),
                    sa.column("created_at", sa.DateTime(timezone=True)))
    op.get_bind().execute(runs.update().values(queued_at=runs.c.created_at))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("queued_at")
