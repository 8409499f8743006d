"""Responses shared by the routers."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import FileResponse, Response
from starlette.datastructures import Headers


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class Download(FileResponse):
    """Starlette's file response, less its 400 for a Range of another unit than bytes
    (`Range: items=0-5`): RFC 9110 (14.2) says to ignore such a header and send the file."""

    async def __call__(self, scope, receive, send) -> None:
        unit = Headers(scope=scope).get("range", "").partition("=")[0].strip().lower()
        if unit and unit != "bytes":
            scope = {**scope, "headers": [
                (key, value) for key, value in scope["headers"] if key.lower() != b"range"]}
        await super().__call__(scope, receive, send)


def in_utc(value: datetime) -> datetime:
    """A stored time in UTC (SQLite gives it back without a zone; everything stored is UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_text(value: datetime) -> str:
    """`2026-12-04T05:35:54Z`: to the second, in UTC, with a Z."""
    return in_utc(value).isoformat(timespec="seconds").replace("+00:00", "Z")


def csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):  # UTC with a Z, as the JSON API writes its times
        return utc_text(value)
    if isinstance(value, float):  # 0.388, not 0.38799999999999996
        return round(value, 6)
    return value


def csv_download(rows: list[dict], columns: list[str], filename: str) -> Response:
    """`rows` as a CSV file to save as `filename` (keys outside `columns` left out)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: csv_value(value) for key, value in row.items()} for row in rows)
    return Response(buffer.getvalue(), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{filename}"'})
