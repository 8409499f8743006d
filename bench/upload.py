"""Upload benchmark: streams a large archive of real, incompressible images to POST
/api/datasets and reports throughput and how much the web process's memory grew.

    .venv/bin/python bench/upload.py                  # 1 GB, its own server on a temp dir
    .venv/bin/python bench/upload.py --size-gb 2 --keep-archive
    .venv/bin/python bench/upload.py --url http://127.0.0.1:8000 --pid 12345 --token ...

Target: a 1 GB upload grows the web process by less than 150 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MB = 1024**2


def make_archive(path: Path, target_bytes: int, image_px: int, fmt: str, classes: int) -> int:
    """A zip of random-noise images (stored, since they do not compress) laid out as
    train/<class>/ and test/<class>/; returns the number of images."""
    rng = np.random.default_rng(0)
    count = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        while path.stat().st_size < target_bytes:
            pixels = rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            if fmt == "png":
                Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
            else:
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
            split = "test" if (count // classes) % 5 == 4 else "train"
            archive.writestr(f"bench/{split}/class{count % classes}/{count:06d}.{fmt}",
                             buffer.getvalue())
            count += 1
    return count


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every few milliseconds and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.stop_event = threading.Event()

    def status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.peak_kb = max(self.peak_kb, self.status_kb("VmRSS"))
            except (OSError, KeyError):
                return
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


class CountingReader(io.RawIOBase):
    """A file wrapper that notes when its last byte was read (the upload's end)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.sent = 0
        self.finished_at: float | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sent += len(data)
        if not data and self.finished_at is None:
            self.finished_at = time.monotonic()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, max_upload: int) -> tuple[str, subprocess.Popen]:
    sys.path.insert(0, str(PROJECT_ROOT))
    from app.db import upgrade_to_head

    database_url = f"sqlite:///{data_dir / 'selftune.db'}"
    upgrade_to_head(database_url)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SELFTUNE_")}
    env.update(
        SELFTUNE_DATA_DIR=str(data_dir), SELFTUNE_DATABASE_URL=database_url,
        SELFTUNE_REDIS_URL=os.environ.get("SELFTUNE_REDIS_URL", "redis://127.0.0.1:6379/9"),
        SELFTUNE_MAX_UPLOAD_BYTES=str(max_upload),
    )
    port = free_port()
    log = open(data_dir / "uvicorn.log", "wb")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"uvicorn exited:\n{(data_dir / 'uvicorn.log').read_text()}")
        try:
            httpx.get(url + "/api/health", timeout=2)
            return url, process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("uvicorn did not start in 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="archive size (GiB)")
    parser.add_argument("--image-px", type=int, default=512, help="side of each noise image")
    parser.add_argument("--format", choices=["png", "jpeg"], default="png")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--archive", type=Path, help="where to write (or reuse) the archive")
    parser.add_argument("--keep-archive", action="store_true")
    parser.add_argument("--url", help="a running server (default: start one on a temp dir)")
    parser.add_argument("--pid", type=int, help="web process id, to measure memory with --url")
    parser.add_argument("--token", help="API token of the server at --url")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    target = int(args.size_gb * 1024**3)
    archive = args.archive or Path(tempfile.gettempdir()) / f"selftune-bench-{target}.zip"
    if not archive.exists() or archive.stat().st_size < target:
        started = time.monotonic()
        images = make_archive(archive, target, args.image_px, args.format, args.classes)
        print(f"made {archive} ({archive.stat().st_size / MB:,.0f} MiB, {images} images) in "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    size = archive.stat().st_size

    data_dir = None
    process = None
    url, pid = args.url, args.pid
    if url is None:
        data_dir = Path(tempfile.mkdtemp(prefix="selftune-bench-"))
        url, process = start_server(data_dir, max_upload=size + 64 * MB)
        pid = process.pid
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=None) as client:
            client.get("/api/datasets")  # lazy imports and first connections happen now
            sampler = RssSampler(pid) if pid else None
            baseline_kb = hwm_before_kb = 0
            if sampler:
                baseline_kb = sampler.status_kb("VmRSS")
                hwm_before_kb = sampler.status_kb("VmHWM")
                sampler.start()
            with open(archive, "rb") as handle:
                reader = CountingReader(handle)
                started = time.monotonic()
                response = client.post(
                    "/api/datasets", files={"file": (archive.name, reader, "application/zip")}
                )
                done = time.monotonic()
            if sampler:
                sampler.stop()
            if response.status_code != 201:
                raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
            summary = response.json()
            transfer_s = (reader.finished_at or done) - started
            figures = {
                "archive_mib": round(size / MB, 1),
                "images": summary["image_count"],
                "classes": len(summary["classes"]),
                "transfer_s": round(transfer_s, 2),
                "transfer_mb_per_s": round(size / 1e6 / transfer_s, 1),
                "total_s": round(done - started, 2),
                "end_to_end_mb_per_s": round(size / 1e6 / (done - started), 1),
            }
            if sampler:
                hwm_after_kb = sampler.status_kb("VmHWM")
                # VmHWM catches spikes between samples, but only above the old high-water mark.
                peak_kb = max(sampler.peak_kb, hwm_after_kb if hwm_after_kb > hwm_before_kb
                              else 0)
                figures.update(
                    web_rss_before_mib=round(baseline_kb / 1024, 1),
                    web_rss_peak_mib=round(peak_kb / 1024, 1),
                    web_rss_growth_mib=round((peak_kb - baseline_kb) / 1024, 1),
                )
            if args.url:
                client.delete(f"/api/datasets/{summary['id']}")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
        if not args.keep_archive:
            archive.unlink(missing_ok=True)

    if args.json:
        print(json.dumps(figures))
        return
    print(f"archive            {figures['archive_mib']:,.1f} MiB, {figures['images']} images, "
          f"{figures['classes']} classes")
    print(f"transfer           {figures['transfer_s']:.1f} s = "
          f"{figures['transfer_mb_per_s']:.1f} MB/s")
    print(f"upload + verify    {figures['total_s']:.1f} s = "
          f"{figures['end_to_end_mb_per_s']:.1f} MB/s end to end")
    if "web_rss_growth_mib" in figures:
        verdict = "OK" if figures["web_rss_growth_mib"] < 150 else "OVER the 150 MB target"
        print(f"web process RSS    {figures['web_rss_before_mib']:.0f} MiB before, peak "
              f"{figures['web_rss_peak_mib']:.0f} MiB, growth "
              f"{figures['web_rss_growth_mib']:.1f} MiB ({verdict})")
    else:
        print("web process RSS    not measured (give --pid with --url)")


if __name__ == "__main__":
    main()
