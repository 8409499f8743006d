"""Responses shared by the routers."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable


def shortened(text: str, chars: int) -> str:
    """`text` cut to `chars` characters where it is longer, the last an ellipsis."""
    return text if len(text) <= chars else f"{text[:chars - 1].rstrip()}\u2026"


def csp_nonce(request: Request) -> str:
    """This answer's script nonce (app.main's SecurityHeaders made it and names it in the
    Content-Security-Policy), for a page's inline scripts."""
    return request.scope.get("state", {}).get("csp_nonce", "")


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class Download(FileResponse):
    """Starlette's file response, and:
    - a Range it cannot use is ignored and the whole file sent, as RFC 9110 (14.2) allows:
      another unit than bytes (`Range: items=0-5`) and a malformed one (`bytes=9-0`,
      `bytes=abc`), which Starlette answered with a bare text 400;
    - a file deleted since the route found it (its run or dataset deleted that moment) is a
      404 with the API's `detail`, not a 500;
    - the file is opened before the answer's headers go, and read from there: Starlette
      opened it after them, and a delete in between cut the answer short after its 200 (a
      thumbnail or a checkpoint asked for as its dataset or run was deleted)."""

    _file: anyio.AsyncFile[bytes]

    async def __call__(self, scope, receive, send) -> None:
        try:
            self._file = await anyio.open_file(self.path, mode="rb")
        except FileNotFoundError:
            await JSONResponse({"detail": FILE_DELETED}, status_code=404)(scope, receive, send)
            return
        try:
            if self.stat_result is None:
                self.stat_result = await anyio.to_thread.run_sync(
                    os.fstat, self._file.wrapped.fileno())
                self.set_stat_headers(self.stat_result)
            value = Headers(scope=scope).get("range", "")
            if value and not self._usable_range(value):
                scope = {**scope, "headers": [
                    (key, header) for key, header in scope["headers"] if key.lower() != b"range"]}
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # closed also when the transfer is cut
                await self._file.aclose()

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        """The file as `__call__` opened it (Starlette's opens it by its path again)."""
        await self._file.seek(0)
        yield self._file

    def _usable_range(self, value: str) -> bool:
        if value.partition("=")[0].strip().lower() != "bytes":
            return False
        try:
            self._parse_range_header(value, self.stat_result.st_size)
        except MalformedRangeHeader:
            return False
        except RangeNotSatisfiable:
            return True  # well formed, past the end: Starlette's 416 says so
        return True


def one_range(request: Request, length: int, etag: str) -> tuple[int, int] | None:
    """The (start, end) a request's `Range: bytes=...` asks of a made body `length` long and
    tagged `etag`, as `Download` reads one of a file; None for the whole body: no Range, one
    it cannot use, several ranges, or an `If-Range` that is not this version. Past the end is
    a 416 that gives the length."""
    value = request.headers.get("range")
    if not value or request.headers.get("if-range", etag) != etag:
        return None
    try:
        ranges = FileResponse._parse_range_header(value, length)
    except MalformedRangeHeader:
        return None
    except RangeNotSatisfiable:
        raise HTTPException(416, detail=f"the range starts past the end ({length} bytes)",
                            headers={"Content-Range": f"bytes */{length}"}) from None
    return ranges[0] if len(ranges) == 1 else None


FILE_DELETED = "the file was deleted (its run or dataset was deleted a moment ago)"
# A folder the server may read but not write: its permissions, or a read-only mount.
READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def send_file(request: Request, path: Path, filename: str | None = None,
              media_type: str | None = None, headers: dict[str, str] | None = None
              ) -> Response:
    """A download as Starlette sends files (ranges, HEAD), answering a client that already
    holds this version (If-None-Match: the tag, one of a list, weak or `*`) with a 304
    instead of the whole file again. `headers` may set the ETag."""
    try:
        stat_result = path.stat()
    except FileNotFoundError:
        raise HTTPException(404, detail=FILE_DELETED) from None
    response = Download(path, filename=filename, media_type=media_type, headers=headers,
                        stat_result=stat_result)
    if client_holds(request, response.headers["etag"]):
        return Response(status_code=304, headers={
            name: response.headers[name] for name in ("etag", "last-modified", "cache-control")
            if name in response.headers})
    return response


def files_tag(paths: list[Path]) -> str:
    """An ETag for what is made from `paths` (their sizes and times): a 404 when one is gone."""
    try:
        versions = [f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
                    for path, stat in ((path, path.stat()) for path in paths)]
    except FileNotFoundError:
        raise HTTPException(404, detail=FILE_DELETED) from None
    return '"' + hashlib.sha256("|".join(versions).encode()).hexdigest()[:32] + '"'


def send_temporary_file(request: Request, path: Path, filename: str, media_type: str,
                        etag: str) -> Response:
    """A file made for this request alone (where it could not be kept), sent as `send_file`
    sends one, tagged `etag`, and deleted once sent, or at once if it is not."""
    try:
        response = send_file(request, path, filename, media_type, headers={"ETag": etag})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    response.background = BackgroundTask(path.unlink, missing_ok=True)
    return response


def client_holds(request: Request, etag: str) -> bool:
    """Whether If-None-Match names `etag`: alone, in a list, weak (`W/"..."`) or as `*`."""
    held = {tag.strip().removeprefix("W/") for tag in
            request.headers.get("if-none-match", "").split(",")}
    return etag in held or "*" in held


def in_utc(value: datetime) -> datetime:
    """A stored time in UTC: everything stored is UTC, but SQLite gives it back without a
    zone and PostgreSQL in its session's time zone (the server's, unless set)."""
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


def csv_download(request: Request, rows: list[dict], columns: list[str], filename: str
                 ) -> Response:
    """`rows` as a CSV file to save as `filename` (keys outside `columns` left out), tagged
    by its content: a client that holds this version (If-None-Match) gets a 304, and
    `no-cache` makes caches ask each time, since a run finishing changes the table."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: csv_value(value) for key, value in row.items()} for row in rows)
    return csv_body_download(request, buffer.getvalue().encode("utf-8"), filename)


def attachment(filename: str) -> str:
    """A Content-Disposition that saves as `filename`: quoted as is where it is printable
    ASCII; else that plus RFC 6266's `filename*` in UTF-8, with an ASCII fallback for clients
    that read only `filename` (`curl -OJ`, which had saved "loop + 12 labels.tar" as
    `archive`, the address's last part)."""
    plain = "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "_"
                    for ch in unicodedata.normalize("NFKD", filename)
                    if not unicodedata.combining(ch))
    if plain == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{plain}\"; filename*=utf-8''{quote(filename)}"


def csv_body_download(request: Request, body: bytes, filename: str) -> Response:
    """A CSV file's `body` to save as `filename`, tagged as `csv_download` tags it."""
    headers = {"ETag": f'"{hashlib.sha256(body).hexdigest()[:32]}"',
               "Cache-Control": "no-cache"}
    if client_holds(request, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="text/csv", headers={
        **headers, "Content-Disposition": attachment(filename)})
