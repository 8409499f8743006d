"""Test helpers: start real uvicorn and Celery worker processes on a private data directory."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared"
DATASETS = SHARED / "datasets"


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` (`"3m"`) mounted at `path`: a real file system that fills up. Needs
    root, as CI and this project's machines have; skipped where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(data_dir: Path, database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFTUNE_")}
    env.update(
        SELFTUNE_DATA_DIR=str(data_dir),
        SELFTUNE_DATABASE_URL=database_url,
        SELFTUNE_REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        # Most test servers never check a backbone: importing timm at each start would cost
        # the suite about a second of CPU a server (tests/test_engine_preload.py turns it on).
        SELFTUNE_PRELOAD_ENGINE="0",
    )
    env.update(extra)
    return env


@dataclass
class Process:
    """A child process in its own process group, with its output in a log file."""

    popen: subprocess.Popen | ForkedPopen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ended(self, timeout: float) -> int:
        """The exit status once the process has ended by itself. One still running after
        `timeout` fails the test with what each of its processes was doing: a Celery worker
        writes its threads' stacks to the log on SIGUSR1, and its pool processes (Python
        started with faulthandler, see start_worker) theirs on SIGABRT, which ends them."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import psutil

            before = len(self.log())
            children = psutil.Process(self.popen.pid).children(recursive=True)
            self.popen.send_signal(signal.SIGUSR1)
            for child in children:
                child.send_signal(signal.SIGABRT)
            time.sleep(3)
            log = self.log()
            pytest.fail(f"{self.popen.args[:3]} still ran after {timeout} s; the end of its "
                        f"log:\n{log[max(0, before - 6000):before]}\nthen its stacks:\n"
                        f"{log[before:before + 40000]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(
        args, cwd=PROJECT_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    return Process(popen, log_path)


@dataclass
class LiveServer:
    """uvicorn serving the app over real HTTP."""

    url: str
    data_dir: Path
    database_url: str
    redis_url: str
    process: Process
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def restart(self, log_path: Path) -> Process:
        """uvicorn again on this server's port and settings, once its process has ended."""
        return start_server(self.env, log_path, port=int(self.url.rsplit(":", 1)[1]))[1]


# What every web process imports before it answers its first experiment (the backbone check
# builds the model): each server forked from a process that has them costs a fork, where a new
# interpreter spent about 5 s of CPU on them (a third of the suite's time went there).
# Not timm: it imports huggingface_hub, which reads HF_ENDPOINT and HF_HUB_OFFLINE once, as
# it is imported, and servers differ in them.
SERVER_PRELOAD = ["app.main", "uvicorn.main", "torch", "torchvision"]


class ForkedPopen:
    """The part of `subprocess.Popen` the tests use, for a process the fork server started."""

    def __init__(self, process: multiprocessing.Process, args: list[str]) -> None:
        self.process, self.args, self.pid = process, args, process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_uvicorn(args: list[str], env: dict[str, str], log_path: str) -> None:
    """In the forked child: what `python -m uvicorn ARGS` in the project folder with `env`
    does, in a session of its own and with its output in `log_path` (as `start_process`)."""
    os.setsid()
    os.chdir(PROJECT_ROOT)
    os.environ.clear()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["uvicorn", *args]
    from uvicorn.main import main

    main(args=args, prog_name="uvicorn")  # exits with uvicorn's status


def start_forked(args: list[str], env: dict[str, str], log_path: Path) -> Process:
    """A real `python -m uvicorn` process, forked from a server that has already imported the
    app and torch (multiprocessing's fork server, one per test process)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(SERVER_PRELOAD)
    process = context.Process(target=run_uvicorn, args=(args, env, str(log_path)),
                              name="uvicorn")
    process.start()
    # Stopped by its test, not joined when the test process exits (as a subprocess would be).
    multiprocessing.process._children.discard(process)
    return Process(ForkedPopen(process, ["uvicorn", *args]), log_path)


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on TCP `port`."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def start_server(env: dict[str, str], log_path: Path, timeout: float = 60,
                 port: int | None = None, options: tuple[str, ...] = ()) -> tuple[str, Process]:
    """uvicorn on `port` (a free one by default: give the old one to restart a server), with
    more of its command-line `options` if given.

    The server that answers must be this one: a free port can be handed to two test
    processes at once, and then the other's server answered the health check while this
    one failed to bind, and the test talked to another database ("dataset 1 does not
    exist"). A port taken so is given up for another free one."""
    chosen = port
    port = port or free_port()
    process = start_forked(
        ["--factory", "app.main:app_factory", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", *options],
        env, log_path,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {}
    if env.get("SELFTUNE_API_TOKEN"):
        headers["Authorization"] = f"Bearer {env['SELFTUNE_API_TOKEN']}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"uvicorn exited early:\n{process.log()}")
        try:
            answered = httpx.get(url + "/api/health", headers=headers, timeout=2).status_code
        except httpx.HTTPError:
            answered = None
        if answered in (200, 503):
            if listens_on(process.popen.pid, port):
                return url, process
            if chosen is None:  # another process's server on the port: this one cannot bind it
                process.stop()
                return start_server(env, log_path, max(1.0, deadline - time.monotonic()),
                                    None, options)
        time.sleep(0.2)
    process.stop()
    raise RuntimeError(f"uvicorn did not answer in {timeout}s:\n{process.log()}")


def start_worker(env: dict[str, str], log_path: Path, name: str = "test") -> Process:
    hostname = f"{name}-{os.getpid()}-{free_port()}@localhost"
    return start_process(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
         "--loglevel", "INFO", "--concurrency", "1", "--hostname", hostname,
         "--without-gossip", "--without-mingle"],
        {**env, "PYTHONFAULTHANDLER": "1"}, log_path,
    )


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def make_image_archive(
    path: Path,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    train_per_class: int = 16,
    test_per_class: int = 6,
    unlabeled: int = 12,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """A small learnable dataset as a user would zip it: train/<class>/, train/unlabeled/,
    test/<class>/. Each class is a differently coloured shape on noise."""
    import io
    import random
    import zipfile

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (200, 160, 30), (150, 50, 200)]

    def image_bytes(class_index: int) -> bytes:
        noise = bytes(rng.randrange(90, 150) for _ in range(size * size * 3))
        image = Image.frombytes("RGB", (size, size), noise)
        draw = ImageDraw.Draw(image)
        margin = rng.randrange(2, size // 4)
        box = (margin, margin, size - margin, size - margin)
        colour = colours[class_index % len(colours)]
        shape = class_index % 3
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(size // 2, margin), (margin, size - margin),
                          (size - margin, size - margin)], fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    with zipfile.ZipFile(path, "w") as archive:
        for index, name in enumerate(classes):
            for n in range(train_per_class):
                archive.writestr(f"train/{name}/{name}_{n:03d}.png", image_bytes(index))
            for n in range(test_per_class):
                archive.writestr(f"test/{name}/{name}_{n:03d}.png", image_bytes(index))
        for n in range(unlabeled):
            archive.writestr(f"train/unlabeled/u_{n:03d}.png", image_bytes(n % len(classes)))
    return path


def add_dataset_row(database_url: str, class_counts: dict[str, dict[str, int]] | None = None,
                    name: str = "shapes", unlabeled_count: int = 0) -> int:
    """A dataset row without images: all that experiments and runs need until a worker trains
    them (no image is read before that). Two classes of 10 train + 2 test images unless
    `class_counts` says otherwise. Returns its id."""
    from app.db import session_scope
    from app.models import Dataset

    counts = class_counts or {name: {"train": 10, "test": 2} for name in ("a", "b")}
    with session_scope(database_url) as session:
        dataset = Dataset(name=name, storage_key=f"k{time.time_ns()}", fingerprint="0" * 64,
                          class_names=list(counts), class_counts=counts,
                          unlabeled_count=unlabeled_count)
        session.add(dataset)
        session.flush()
        return dataset.id
