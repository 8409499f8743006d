"""runs keep their confusion matrix in a column of their own

Every read of an experiment (its page every few seconds, its API, its CSVs, each `end` of its
live feed) loaded each run's final metrics, and with them the confusion matrix: classes²
numbers, 3 MB per run at 1,000 classes. An experiment of 60 such runs took 4-6 s a read,
and a live feed replayed 393 s before its first event. The matrix now sits in `runs.details`,
which only the run's own record reads.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNS = sa.table("runs", sa.column("id", sa.Integer), sa.column("metrics", sa.JSON),
                sa.column("details", sa.JSON))
MOVED = ("confusion_matrix",)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("details", sa.JSON, nullable=False, server_default="{}"))
    connection = op.get_bind()
    ids = connection.execute(sa.select(RUNS.c.id).order_by(RUNS.c.id)).scalars().all()
    for run_id in ids:  # one at a time: each may hold megabytes
        metrics = connection.execute(
            sa.select(RUNS.c.metrics).where(RUNS.c.id == run_id)).scalar_one() or {}
        if any(key in metrics for key in MOVED):
            connection.execute(RUNS.update().where(RUNS.c.id == run_id).values(
                metrics={k: v for k, v in metrics.items() if k not in MOVED},
                details={k: metrics[k] for k in MOVED if k in metrics}))


def downgrade() -> None:
    connection = op.get_bind()
    ids = connection.execute(sa.select(RUNS.c.id).order_by(RUNS.c.id)).scalars().all()
    for run_id in ids:
        row = connection.execute(
            sa.select(RUNS.c.metrics, RUNS.c.details).where(RUNS.c.id == run_id)).one()
        if row.details:
            connection.execute(RUNS.update().where(RUNS.c.id == run_id).values(
                metrics={**(row.metrics or {}), **row.details}))
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("details")
