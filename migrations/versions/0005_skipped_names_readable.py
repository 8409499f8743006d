"""skipped-file reports stored before names were checked for UTF-8 become readable text

Before uploads checked names for UTF-8, a tar entry whose name was in another encoding and was
skipped anyway (not an image, say) went into `datasets.skipped` with lone surrogates where its
bytes did not decode (Python's surrogateescape). The dataset was stored, but its page and its
API answer failed with a 500, since no response can encode such text. Rewrite those names as
the upload code now reports them: each undecodable byte as U+FFFD. Nothing to undo.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 05:10:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DATASETS = sa.table("datasets", sa.column("id", sa.Integer), sa.column("skipped", sa.JSON))


def readable(value: Any) -> Any:
    """Strings with lone surrogates as valid text (app.ingest.printable_name's rule),
    through lists and dicts; everything else as it is."""
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no undecodable byte makes: not ours
            raw = value.encode("utf-8", "replace")
        return raw.decode("utf-8", "replace")
    if isinstance(value, list):
        return [readable(item) for item in value]
    if isinstance(value, dict):
        return {readable(key): readable(item) for key, item in value.items()}
    return value


def upgrade() -> None:
    connection = op.get_bind()
    for dataset_id, skipped in connection.execute(sa.select(DATASETS.c.id, DATASETS.c.skipped)):
        fixed = readable(skipped)
        if fixed != skipped:
            connection.execute(
                DATASETS.update().where(DATASETS.c.id == dataset_id).values(skipped=fixed)
            )


def downgrade() -> None:
    pass
