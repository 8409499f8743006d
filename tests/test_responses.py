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
