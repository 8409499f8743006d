"""run metrics are indexed in the order a run's record is read: (run_id, step, id)

`/api/runs/{id}/metrics` reads a run's points by step, then id, now a page at a time from a
cursor. The only index by run was on `run_id` alone, so each page had the database read all
the run's points and sort them (27,000 of them for a paper-length run, 110,000 logged at
every step) to hand out the next few thousand. An index on (run_id, step, id) gives a page
its points in order, starting at the cursor; it also serves every lookup by run, so it
takes the place of `ix_run_metrics_run_id`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_metrics") as batch:
        batch.create_index("ix_run_metrics_run_step", ["run_id", "step", "id"])
        batch.drop_index("ix_run_metrics_run_id")


def downgrade() -> None:
    with op.batch_alter_table("run_metrics") as batch:
        batch.create_index("ix_run_metrics_run_id", ["run_id"])
        batch.drop_index("ix_run_metrics_run_step")
