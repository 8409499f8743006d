"""the database names itself, so a data directory can tell which database it belongs to

A data directory holds the files of the rows of one database: the web removes dataset folders
that its database does not list. Started once against another database (SELFTUNE_DATABASE_URL
forgotten in a new terminal: an empty SQLite database), it removed every dataset's files. The
database now carries a random id, and the data directory records it (`database-id`) the first
time: a data directory and a database that do not belong together refuse to start.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:00:00
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    installation = op.create_table(
        "installation",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("database_id", sa.String(32), nullable=False),
    )
    op.bulk_insert(installation, [{"id": 1, "database_id": uuid.uuid4().hex}])


def downgrade() -> None:
    op.drop_table("installation")
