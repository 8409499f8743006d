"""SQLite never hands a deleted row's id to a new row

Without AUTOINCREMENT, SQLite gives a new row the largest id in use plus one, so after the
newest dataset, experiment or run is deleted its id comes back: a bookmark, an API client
polling /api/runs/{id}, a browser's cached thumbnail or a leftover file would then meet another
row under the old id. AUTOINCREMENT keeps ids increasing for good, as PostgreSQL's sequences
already do (on PostgreSQL this migration changes nothing). SQLite can only add it by rebuilding
each table; the migration connection has foreign keys off, so the rebuild cascades nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 03:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Parents first, so a rebuilt child's foreign keys name a table that is already rebuilt.
TABLES = ("datasets", "dataset_images", "experiments", "runs", "run_metrics", "artifacts")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
