"""Shared helpers for the dataset tests: archives built in memory, a dataset server per
module, and checks that a rejected upload left nothing behind (no tests here)."""

from __future__ import annotations

import io
import random
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image
from sqlalchemy import text

from app.db import get_engine, upgrade_to_head
from tests.support import LiveServer, app_env, start_server

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (200, 160, 30), (150, 50, 200)]


def image_bytes(seed: int, size: int = 16, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A small image, different for every seed (noise so that no two are duplicates)."""
    rng = random.Random(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = bytes(rng.randrange(256) for _ in range(size * size * channels))
    image = Image.frombytes(mode, (size, size), pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def class_entries(classes: Iterable[str] = ("cat", "dog"), per_class: int = 3, prefix: str = "",
                  seed: int = 0) -> dict[str, bytes]:
    """`<prefix><class>/<n>.png` entries with distinct images."""
    entries = {}
    for class_index, name in enumerate(classes):
        for n in range(per_class):
            entries[f"{prefix}{name}/{n}.png"] = image_bytes(seed * 10_000 + class_index * 100 + n)
    return entries


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None,
              compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the mode bits in external_attr mean a link
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def tar_bytes(entries: dict[str, bytes], gz: bool = True, symlinks: dict[str, str] | None = None,
              hardlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                archive.addfile(info)
    return buffer.getvalue()


@contextmanager
def dataset_server(base: Path, redis_url: str, database_url: str | None = None,
                   **env: str) -> Iterator[LiveServer]:
    """A uvicorn process on its own data directory (SQLite unless a URL is given)."""
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or f"sqlite:///{data_dir / 'selftune.db'}"
    upgrade_to_head(url)
    full_env = app_env(data_dir, url, redis_url, **env)
    server_url, process = start_server(full_env, base / "uvicorn.log")
    try:
        yield LiveServer(server_url, data_dir, url, redis_url, process, full_env)
    finally:
        process.stop()


def upload(client: httpx.Client, data: bytes, filename: str = "photos.zip",
           name: str | None = None) -> httpx.Response:
    form = {"name": name} if name is not None else None
    return client.post("/api/datasets", files={"file": (filename, data)}, data=form)


def leftovers(server: LiveServer) -> list[str]:
    """Everything under datasets/ and tmp/ (both must be empty after a rejection)."""
    found = []
    for folder in ("datasets", "tmp"):
        root = server.data_dir / folder
        if root.exists():
            found.extend(str(path.relative_to(server.data_dir)) for path in root.rglob("*"))
    return sorted(found)


def row_counts(server: LiveServer) -> dict[str, int]:
    with get_engine(server.database_url).connect() as connection:
        return {
            table: connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
            for table in ("datasets", "dataset_images")
        }


def assert_nothing_left(server: LiveServer) -> None:
    assert leftovers(server) == []
    assert row_counts(server) == {"datasets": 0, "dataset_images": 0}


def stored_files(server: LiveServer, dataset_id: int) -> list[Path]:
    """The files of one dataset on disk (there is one directory per dataset)."""
    with get_engine(server.database_url).connect() as connection:
        key = connection.execute(
            text("SELECT storage_key FROM datasets WHERE id = :id"), {"id": dataset_id}
        ).scalar_one()
    root = server.data_dir / "datasets" / key
    return sorted(path for path in root.rglob("*") if path.is_file())


def legacy_tar(entries: dict[bytes, bytes], tar_format: int = tarfile.GNU_FORMAT,
               gz: bool = True) -> bytes:
    """A tar whose names are the given bytes, as written by a tool in a Latin-1 locale (PAX
    stores such names with hdrcharset=BINARY, GNU and ustar as they are)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w", format=tar_format,
                      encoding="utf-8", errors="surrogateescape") as archive:
        for raw_name, data in entries.items():
            info = tarfile.TarInfo(raw_name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
