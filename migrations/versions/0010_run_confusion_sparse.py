"""runs keep their confusion matrix sparse

A run's confusion matrix sat in `runs.details` dense: classes² numbers, 75 MB of JSON in one
row at 5,000 classes (3 MB at 1,000), parsed again (1.0-1.4 s) on every read of the run's
record, though almost every cell is 0 and the run page reads the sparse form. The matrix now
sits there sparse, under `confusion_sparse`: its size, diagonal, row totals and the cells off
the diagonal that are not 0, as [true, predicted, count]; the API makes it dense again when
asked. Downgrading rebuilds the dense matrix under `confusion_matrix`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 11:30:00
"""

from collections.abc import Callable, Sequence
from itertools import compress
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNS = sa.table("runs", sa.column("id", sa.Integer), sa.column("details", sa.JSON))
DENSE, SPARSE = "confusion_matrix", "confusion_sparse"


# The two forms as this revision defines them (app.confusion may change; this may not).
def sparse(matrix: list[list[int]]) -> dict[str, Any]:
    columns = list(range(len(matrix)))
    cells = []
    for true, row in enumerate(matrix):
        cells.extend([true, predicted, row[predicted]]
                     for predicted in compress(columns, row) if predicted != true)
    return {"size": len(matrix), "diagonal": [row[i] for i, row in enumerate(matrix)],
            "row_totals": [sum(row) for row in matrix], "cells": cells}


def dense(stored: dict[str, Any]) -> list[list[int]]:
    matrix = [[0] * stored["size"] for _ in range(stored["size"])]
    for true, count in enumerate(stored["diagonal"]):
        matrix[true][true] = count
    for true, predicted, count in stored["cells"]:
        matrix[true][predicted] = count
    return matrix


def rewrite(old: str, new: str, convert: Callable[[Any], Any]) -> None:
    """Each run's matrix from key `old` to key `new`, in its place among the details."""
    connection = op.get_bind()
    ids = connection.execute(sa.select(RUNS.c.id).order_by(RUNS.c.id)).scalars().all()
    for run_id in ids:  # one at a time: a dense matrix may be 75 MB
        details = connection.execute(
            sa.select(RUNS.c.details).where(RUNS.c.id == run_id)).scalar_one() or {}
        if old in details:
            connection.execute(RUNS.update().where(RUNS.c.id == run_id).values(
                details={new if key == old else key: convert(value) if key == old else value
                         for key, value in details.items()}))


def upgrade() -> None:
    rewrite(DENSE, SPARSE, sparse)


def downgrade() -> None:
    rewrite(SPARSE, DENSE, dense)
