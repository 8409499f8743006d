"""The app for real: uvicorn over HTTP, a Celery worker on real Redis, and `make run`'s launcher."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml
from sqlalchemy import select

from app.db import session_scope
from app.models import Dataset
from tests.support import PROJECT_ROOT, app_env, free_port, start_process, start_server, wait_for


def test_health_reports_database_redis_and_the_worker_device(live_server, celery_worker):
    with live_server.client() as client:
        response = client.get("/api/health")
        page = client.get("/")
    assert response.status_code == 200
    body = response.json()
    assert body["database"] == "ok" and body["redis"] == "ok"
    assert [worker["device"] for worker in body["workers"]] == ["cpu"]
    assert body["version"]
    assert page.status_code == 200
    assert body["workers"][0]["name"] in page.text and "cpu" in page.text


def test_a_real_worker_runs_a_task_through_redis_and_the_database(live_server, celery_worker):
    with session_scope(live_server.database_url) as session:
        session.add(Dataset(name="d", storage_key="abc", fingerprint="0" * 64))
    from celery import Celery

    client = Celery(broker=live_server.redis_url, backend=live_server.redis_url)
    result = client.send_task("selftune.health_probe").get(timeout=60)
    assert result["datasets"] == 1
    assert result["worker"].startswith("test-")
    with session_scope(live_server.database_url) as session:
        assert session.scalars(select(Dataset.name)).all() == ["d"]


def test_health_is_503_and_names_the_failing_part_when_redis_is_down(settings, tmp_path):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = app_env(settings.data_dir, settings.sqlalchemy_url, dead_redis)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    try:
        response = httpx.get(url + "/api/health", timeout=30)
        page = httpx.get(url + "/", timeout=30)
    finally:
        process.stop()
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "ok"
    assert body["redis"].startswith("error:") and "Connection" in body["redis"]
    assert "error:" in page.text


def test_health_is_503_when_the_database_is_down(settings, tmp_path, redis_url):
    dead_database = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    env = app_env(settings.data_dir, dead_database, redis_url)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    try:
        response = httpx.get(url + "/api/health", timeout=30)
    finally:
        process.stop()
    assert response.status_code == 503
    assert response.json()["database"].startswith("error:")
    assert response.json()["redis"] == "ok"


def test_launcher_starts_everything_with_embedded_redis_and_stops_it_all(tmp_path):
    """`make run` in miniature: SQLite and the bundled redis-server, no SELFTUNE_REDIS_URL."""
    port = free_port()
    env = app_env(tmp_path / "data", "", "", SELFTUNE_PORT=str(port))
    for key in ("SELFTUNE_DATABASE_URL", "SELFTUNE_REDIS_URL"):
        env.pop(key)
    launcher = start_process([sys.executable, "-m", "app.launcher"], env, tmp_path / "run.log")
    try:
        body = wait_for(
            lambda: _health(port), timeout=120, message=f"launcher health:\n{launcher.log()}"
        )
        assert body["database"] == "ok" and body["redis"] == "ok"
        assert body["workers"][0]["device"] == "cpu"
        assert f"http://localhost:{port}/" in launcher.log()
        assert (tmp_path / "data" / "selftune.db").exists()
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any(
            (tmp_path / "data" / "redis").glob("appendonly*")
        )
        family = [launcher.popen.pid] + [
            child.pid for child in psutil.Process(launcher.popen.pid).children(recursive=True)
        ]
        session_members = [p for p in psutil.process_iter(["pid"]) if _in_sessions(p, family)]
        names = " ".join(" ".join(p.cmdline()) for p in session_members)
        assert "redis-server" in names and "celery" in names and "uvicorn" in names
        launcher.popen.send_signal(signal.SIGINT)
        assert launcher.popen.wait(timeout=60) == 0
        time.sleep(0.5)
        alive = [p for p in session_members if p.is_running() and p.status() != "zombie"]
        assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        launcher.stop(signal.SIGKILL)


def _health(port: int):
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if body.get("workers") else None


def _in_sessions(process: psutil.Process, family: list[int]) -> bool:
    import os

    try:
        return process.pid in family or os.getsid(process.pid) in family
    except (ProcessLookupError, psutil.Error):
        return False


def test_compose_file_defines_the_team_deployment():
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "web", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    for name in ("web", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        assert "selftune-data:/data" in services[name]["volumes"]
        env = services[name]["environment"]
        assert env["SELFTUNE_REDIS_URL"].startswith("redis://redis:")
        assert env["SELFTUNE_DATABASE_URL"].startswith("postgresql+psycopg://")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "selftune-data" in compose["volumes"]
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "pip install -e ." in dockerfile
    assert Path(PROJECT_ROOT / "alembic.ini").exists()
