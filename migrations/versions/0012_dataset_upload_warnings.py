"""datasets keep what their upload looked wrong in, to say on their page

An upload of class folders with a labels.csv that gives some of their images another class
took the CSV's labels without a word: a stale or swapped CSV relabeled the images silently.
Such findings are known only while the archive is read, so the dataset keeps them. Datasets
stored before have none.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("upload_warnings", sa.JSON, nullable=False,
                                   server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("upload_warnings")
