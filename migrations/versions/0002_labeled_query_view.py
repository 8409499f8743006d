"""stored run configs name Self-Tuning's labeled query view

Runs recorded before `labeled_query_view` existed trained Self-Tuning's labeled query on the
authors' strong view. The engine's default is now fine-tuning's crop + flip, so a run queued
(or requeued) across the upgrade would otherwise change method half-way, and its record would
misstate what trained it: write "strong" into every stored config that lacks the key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 11:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = "labeled_query_view"
RUNS = sa.table("runs", sa.column("id", sa.Integer), sa.column("config", sa.JSON))
EXPERIMENTS = sa.table("experiments", sa.column("id", sa.Integer),
                       sa.column("overrides", sa.JSON))


def upgrade() -> None:
    connection = op.get_bind()
    for run_id, config in connection.execute(sa.select(RUNS.c.id, RUNS.c.config)).all():
        if isinstance(config, dict) and config and KEY not in config:
            connection.execute(
                RUNS.update().where(RUNS.c.id == run_id).values(config={**config, KEY: "strong"})
            )


def downgrade() -> None:
    """Older code rejects the unknown key: drop it from run configs and experiment overrides
    (those runs then train on the strong view again)."""
    connection = op.get_bind()
    for table, column in ((RUNS, RUNS.c.config), (EXPERIMENTS, EXPERIMENTS.c.overrides)):
        for row_id, values in connection.execute(sa.select(table.c.id, column)).all():
            if isinstance(values, dict) and KEY in values:
                kept = {key: value for key, value in values.items() if key != KEY}
                connection.execute(
                    table.update().where(table.c.id == row_id).values({column.name: kept})
                )
