"""datasets remember the dataset they were made from by adding labels

`POST /api/datasets/{id}/labels` makes a new dataset from an old one and a CSV of labels for
some of its unlabeled images. The new one records which dataset it came from and how many
labels the CSV added, so its page can say so. Datasets uploaded before are uploads: no source,
no labels added.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 11:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain columns (no foreign key): the source may be deleted and its id must stay, and
    # adding a column needs no copy of the table on SQLite.
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("derived_from_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("labels_added", sa.Integer, nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("labels_added")
        batch.drop_column("derived_from_id")
