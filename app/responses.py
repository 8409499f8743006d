"""Responses shared by the routers."""

from __future__ import annotations

from fastapi.responses import FileResponse
from starlette.datastructures import Headers


class Download(FileResponse):
    """Starlette's file response, less its 400 for a Range of another unit than bytes
    (`Range: items=0-5`): RFC 9110 (14.2) says to ignore such a header and send the file."""

    async def __call__(self, scope, receive, send) -> None:
        unit = Headers(scope=scope).get("range", "").partition("=")[0].strip().lower()
        if unit and unit != "bytes":
            scope = {**scope, "headers": [
                (key, value) for key, value in scope["headers"] if key.lower() != b"range"]}
        await super().__call__(scope, receive, send)
