"""File responses when the file goes away between the route finding it and the response
sending it: a run or dataset deleted while its download was being answered. That moment
cannot be hit on purpose through a live server (the race showed up as a 500 with a
traceback one time in a few), so these drive the response classes in process, through
FastAPI's own test client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from app.responses import FILE_DELETED, Download, send_file


def client_for(path: Path) -> TestClient:
    app = FastAPI()

    @app.get("/download")
    def download():
        return Download(path, media_type="image/jpeg")

    @app.get("/send")
    def send(request: Request):
        return send_file(request, path, "model.safetensors")

    return TestClient(app, raise_server_exceptions=False)


def test_a_file_deleted_before_it_is_sent_is_a_404_with_a_detail(tmp_path: Path) -> None:
    path = tmp_path / "thumb.jpg"
    path.write_bytes(b"\xff\xd8 not much of a jpeg")
    client = client_for(path)
    assert client.get("/download").content == path.read_bytes()
    assert client.get("/send").content == path.read_bytes()
    path.unlink()
    for url in ("/download", "/send"):
        response = client.get(url)
        assert response.status_code == 404, (url, response.text)
        assert response.json() == {"detail": FILE_DELETED}


def test_a_file_deleted_as_its_answer_starts_is_sent_whole(tmp_path: Path) -> None:
    """Starlette sent the headers (200, Content-Length), then opened the file by its path: a
    delete in between (its dataset's, as its thumbnails were asked for) cut the answer off
    with no body, a traceback in the log. The file is opened before the headers now."""
    path = tmp_path / "thumb.jpg"
    body = b"\xff\xd8" + bytes(range(256)) * 300
    path.write_bytes(body)
    app = FastAPI()

    @app.get("/download")
    def download():
        return Download(path, media_type="image/jpeg")

    def delete_as_headers_go(app):
        async def wrapped(scope, receive, send):
            async def sending(message):
                if message["type"] == "http.response.start":
                    path.unlink(missing_ok=True)
                await send(message)
            await app(scope, receive, sending)
        return wrapped

    client = TestClient(delete_as_headers_go(app), raise_server_exceptions=False)
    whole = client.get("/download")
    assert whole.status_code == 200 and whole.content == body
    path.write_bytes(body)
    part = client.get("/download", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == body[100:200]
    path.write_bytes(body)
    parts = client.get("/download", headers={"Range": "bytes=0-1,500-501"})
    assert parts.status_code == 206 and body[500:502] in parts.content
