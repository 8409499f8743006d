"""The app for real: uvicorn over HTTP, a Celery worker on real Redis, and `make run`'s launcher."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from select import select as wait_readable

import httpx
import psutil
import pytest
import yaml
from sqlalchemy import select

from app.db import session_scope
from app.models import Dataset
from tests.support import (
    PROJECT_ROOT,
    Process,
    app_env,
    free_port,
    start_process,
    start_server,
    wait_for,
)
from tests.test_lost_runs import sse_events
from tests.test_reliability import start_tiny_run, upload, wait_for_end, wait_for_step


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


def test_a_test_server_given_a_port_another_server_holds_starts_on_another(
        settings, tmp_path, redis_url, monkeypatch):
    """Two test processes can be handed one free port: the other's server then answered the
    health check while this one failed to bind it, and a test talked to another database
    ("dataset 1 does not exist", seen once in CI)."""
    import tests.support as support

    env = app_env(settings.data_dir, settings.sqlalchemy_url, redis_url)
    taken_url, other = start_server(env, tmp_path / "other.log")
    taken = int(taken_url.rsplit(":", 1)[1])
    ports = iter([taken])
    monkeypatch.setattr(support, "free_port", lambda: next(ports, None) or free_port())
    try:
        url, process = start_server(env, tmp_path / "uvicorn.log")
        try:
            assert url != taken_url
            assert support.listens_on(process.popen.pid, int(url.rsplit(":", 1)[1]))
            assert httpx.get(url + "/api/health", timeout=30).status_code == 200
        finally:
            process.stop()
    finally:
        other.stop()


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
        # Every other route says it too, as JSON for the API (they were bare text 500s).
        with httpx.Client(base_url=url, timeout=30) as client:
            answers = [client.get("/api/experiments"), client.get("/api/runs/1"),
                       client.post("/api/experiments", json={
                           "dataset_id": 1, "methods": ["fine-tune"], "budgets": [0.5]})]
            page = client.get("/experiments", headers={"Accept": "text/html"})
    finally:
        process.stop()
    assert response.status_code == 503
    assert response.json()["database"].startswith("error:")
    assert response.json()["redis"] == "ok"
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["detail"].startswith("the database cannot be reached (")
        assert answer.headers["retry-after"] == "5"
    # Only the request that would have changed something says nothing was changed.
    assert ["): nothing was changed; try again" in answer.json()["detail"]
            for answer in answers] == [False, False, True]
    assert page.status_code == 503 and "Database unavailable" in page.text
    assert "Traceback" not in process.log()


@pytest.mark.slow
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


def launcher_env(data_dir: Path, port: int) -> dict[str, str]:
    env = app_env(data_dir, "", "", SELFTUNE_PORT=str(port))
    for key in ("SELFTUNE_DATABASE_URL", "SELFTUNE_REDIS_URL"):
        env.pop(key)
    return env


def run_launcher(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.launcher"], env=env, capture_output=True,
                          text=True, timeout=120)


class TerminalLauncher:
    """`make run` in a terminal of its own (a pseudo-terminal), which the test can close as a
    person closes a terminal window. What it prints is copied to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its stdin, stdout and stderr
            try:
                os.chdir(PROJECT_ROOT)
                os.execve(sys.executable, [sys.executable, "-m", "app.launcher"], env)
            finally:
                os._exit(127)  # never back into the test's code
        self.stop = threading.Event()
        self.reader = threading.Thread(target=self._copy, daemon=True)
        self.reader.start()
        self.status: int | None = None

    def _copy(self) -> None:
        with open(self.log_path, "ab") as out:
            while not self.stop.is_set():
                if wait_readable([self.fd], [], [], 0.2)[0]:
                    try:
                        out.write(os.read(self.fd, 65536))
                        out.flush()
                    except OSError:
                        return

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def hang_up(self, timeout: float) -> int:
        """Close the terminal; the launcher's exit code."""
        self.stop.set()
        self.reader.join()
        os.close(self.fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            time.sleep(0.2)
        raise AssertionError(f"the launcher did not exit within {timeout}s of the hang-up")

    def kill(self) -> None:
        """The launcher and whatever it started, however the test ended."""
        if self.status is None:
            with contextlib.suppress(psutil.Error):
                kill_groups(psutil.Process(self.pid).children())
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        if not self.stop.is_set():
            self.stop.set()
            self.reader.join()
            os.close(self.fd)


@pytest.mark.slow
def test_a_relaunch_after_the_launcher_was_killed_stops_what_it_left_and_resumes_its_run(
    tmp_path,
):
    """kill -9 of `make run` leaves web, worker and Redis running. A second launch on the same
    data directory is refused while the first lives; once it is gone, the next launch stops
    what it left (the worker first, which hands its run back to the queue while Redis is still
    there), starts afresh on the same port, and the run resumes without counting the stop as
    an attempt. Closing the terminal of a launch (SIGHUP, and every later write to it fails)
    stops everything."""
    port = free_port()
    env = launcher_env(tmp_path / "data", port)
    first = start_process([sys.executable, "-m", "app.launcher"], env, tmp_path / "first.log")
    second, left = None, []
    try:
        wait_for(lambda: _health(port), timeout=120, message=f"first launch:\n{first.log()}")
        refused = run_launcher(env)
        assert refused.returncode == 2 and "already running from" in refused.stdout
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            dataset_id = upload(client, tmp_path)
            run_id = start_tiny_run(client, dataset_id, iterations=160, checkpoint_interval=1000)
            wait_for_step(client, run_id, 6, "progress before the kill")
            left[:] = psutil.Process(first.popen.pid).children()
            first.stop(signal.SIGKILL)  # the launcher alone: its children have own sessions
            assert left and all(child.is_running() for child in left)
            assert client.get("/api/health").status_code == 200  # still served

            second = TerminalLauncher(env, tmp_path / "second.log")
            wait_for(lambda: not any(_alive(child) for child in left), timeout=120,
                     message=f"the leftovers to stop:\n{second.log()}")
            stops = [line.split()[-1] for line in second.log().splitlines()
                     if line.startswith("[selftune] stopping ")]
            assert stops == ["worker", "web", "redis"]  # the worker hands back, Redis is there
            wait_for(lambda: _health(port), timeout=120, message=f"relaunch:\n{second.log()}")
            run = wait_for_end(client, run_id,
                               f"the run to finish after the relaunch:\n{second.log()}")
            events = sse_events(client, f"/api/runs/{run_id}/events")
        assert run["status"] == "succeeded", run["error"]
        assert run["attempts"] == 1, "the stop counted as a lost attempt"
        resumed = [e["resumed_from_step"] for e in events if e["type"] == "started"]
        assert resumed[0] is None and resumed[1] >= 6 and len(resumed) == 2
        assert [e["status"] for e in events if e["type"] == "status"] == [
            "running", "queued", "running"]
        family = psutil.Process(second.pid).children()
        assert second.hang_up(timeout=90) == 0, second.log()
        assert not any(_alive(child) for child in family)
    finally:
        stop_launched(first, left)  # the first launcher may be gone already
        if second:
            second.kill()


@pytest.mark.slow
def test_the_embedded_redis_dying_is_started_again_and_training_goes_on(tmp_path):
    """kill -9 of `make run`'s own redis-server mid-run: the launcher starts it again on its
    port with its append-only file; worker and web reconnect, and the run ends in the same
    attempt instead of the whole app stopping."""
    port = free_port()
    launcher = start_process([sys.executable, "-m", "app.launcher"],
                             launcher_env(tmp_path / "data", port), tmp_path / "run.log")
    family = []
    try:
        wait_for(lambda: _health(port), timeout=120, message=f"launch:\n{launcher.log()}")
        family[:] = psutil.Process(launcher.popen.pid).children()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            dataset_id = upload(client, tmp_path)
            run_id = start_tiny_run(client, dataset_id, iterations=120, checkpoint_interval=1000)
            wait_for_step(client, run_id, 6, "progress before Redis dies")
            server = launched(family, "redis-server")
            server.kill()
            run = wait_for_end(client, run_id, f"the run to finish:\n{launcher.log()}")
            assert client.get("/api/health").status_code == 200
        assert run["status"] == "succeeded", run["error"]
        assert run["attempts"] == 1
        assert "redis exited with status -9; starting it again" in launcher.log()
        assert launcher.popen.poll() is None  # still running
        family += psutil.Process(launcher.popen.pid).children()
        launcher.popen.send_signal(signal.SIGINT)
        assert launcher.popen.wait(timeout=90) == 0
        assert not any(_alive(child) for child in family)
    finally:
        stop_launched(launcher, family)  # the Redis started again is a new child


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_started_again_and_its_run_resumes(tmp_path):
    """kill -9 of `make run`'s worker mid-run (the kernel's out-of-memory killer, say) stopped
    the whole app, pages included, and the run waited for a person to launch it again. The
    launcher starts the worker again; the run is found lost at the reaper's next pass (30 s
    here), without waiting for its heartbeats to have been silent for 10 minutes, queued
    again and resumed from its checkpoint. A worker that exits by itself still stops all."""
    port = free_port()
    env = launcher_env(tmp_path / "data", port)
    env.update(SELFTUNE_HEARTBEAT_INTERVAL_S="1", SELFTUNE_STALE_AFTER_S="600")
    launcher = start_process([sys.executable, "-m", "app.launcher"], env, tmp_path / "run.log")
    family = []
    try:
        wait_for(lambda: _health(port), timeout=120, message=f"launch:\n{launcher.log()}")
        family[:] = psutil.Process(launcher.popen.pid).children()
        worker = launched(family, "celery")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            dataset_id = upload(client, tmp_path)
            run_id = start_tiny_run(client, dataset_id, iterations=120, checkpoint_interval=10)
            wait_for_step(client, run_id, 24, "progress before the worker is killed")
            os.killpg(worker.pid, signal.SIGKILL)  # the worker and its training process
            assert client.get("/api/health").status_code == 200  # the pages stay up
            # Well within stale_after_s (600 s): the reaper did not wait for silence.
            wait_for(lambda: client.get(f"/api/runs/{run_id}").json()["attempts"] == 2,
                     timeout=90, message=f"the run to start again:\n{launcher.log()}")
            run = wait_for_end(client, run_id, f"the run to finish:\n{launcher.log()}")
            events = sse_events(client, f"/api/runs/{run_id}/events")
        assert "worker exited with status -9; starting it again" in launcher.log()
        assert run["status"] == "succeeded", run["error"]
        assert run["attempts"] == 2  # the one killed, and the one that finished
        resumed = [e["resumed_from_step"] for e in events if e["type"] == "started"]
        assert resumed[0] is None and resumed[1] >= 20 and len(resumed) == 2
        assert [e["status"] for e in events if e["type"] == "status"] == [
            "running", "queued", "running"]  # found lost and queued again in one step
        assert launcher.popen.poll() is None  # still running

        # Exiting by itself is not a crash: everything stops, as before.
        family += psutil.Process(launcher.popen.pid).children()
        worker = launched(psutil.Process(launcher.popen.pid).children(), "celery")
        worker.send_signal(signal.SIGTERM)  # a clean exit, status 0
        assert launcher.popen.wait(timeout=90) == 1
        assert "worker exited with status 0; stopping the rest" in launcher.log()
        assert not any(_alive(child) for child in family)
    finally:
        stop_launched(launcher, family)  # the worker started again is a new child


def test_the_launcher_says_why_it_stops_after_a_child_exits(monkeypatch):
    """A worker or web killed by a signal is started again 3 times in 5 minutes, the embedded
    Redis whatever its status; the 4th exit within the window, or an exit by itself, stops
    everything, and the log says which (it said "stopping the rest" alone after three
    restarts, as if the first exit had stopped it)."""
    from app import launcher

    now = [1000.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: now[0])
    worker = launcher.Restarts()
    for _ in range(3):
        assert launcher.after_exit("worker", -9, worker) == (
            True, "worker exited with status -9; starting it again")
        now[0] += 60
    assert launcher.after_exit("worker", -9, worker) == (
        False, "worker exited with status -9; stopping the rest (it was started again 3 times "
               "in the last 5 minutes and keeps exiting: see its log above)")
    now[0] += 121  # the first restart is over 5 minutes old: one more is allowed
    assert launcher.after_exit("worker", -9, worker)[0]

    assert launcher.after_exit("web", 1, launcher.Restarts()) == (
        False, "web exited with status 1; stopping the rest (it exited by itself, killed by "
               "no signal: see its log above)")
    assert launcher.after_exit("redis", 0, launcher.Restarts()) == (
        True, "redis exited with status 0; starting it again")


def test_the_launcher_prints_an_address_a_browser_opens():
    """SELFTUNE_HOST=::1 printed http://::1:8000/, which no browser opens."""
    from app.launcher import address

    assert [address(host, 8000) for host in ("127.0.0.1", "0.0.0.0", "::1", "::", "10.0.0.5",
                                             "lab.example")] == [
        "http://localhost:8000/", "http://localhost:8000/", "http://[::1]:8000/",
        "http://localhost:8000/", "http://10.0.0.5:8000/", "http://lab.example:8000/"]


def test_the_launcher_names_the_setting_when_its_port_is_taken(tmp_path):
    """And leaves nothing behind: the data directory it made for the refused start (two
    levels here) is removed again. One that was there keeps its files and lock file."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_launcher(launcher_env(tmp_path / "new" / "data", port))
        kept = run_launcher(launcher_env(existing, port))
    for refusal in (result, kept):
        assert refusal.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in refusal.stdout
        assert "SELFTUNE_PORT" in refusal.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing"]
    assert sorted(path.name for path in existing.iterdir()) == ["keep.txt", "launcher.lock"]


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_the_launcher_names_the_setting_when_its_data_directory_cannot_be_made(tmp_path, where):
    """It ended in a traceback (FileExistsError; a read-only disk's OSError likewise)."""
    (tmp_path / "taken").write_text("not a folder")
    data_dir = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "data"
    result = run_launcher(launcher_env(data_dir, free_port()))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert f"cannot use the data directory {data_dir}: " in result.stdout
    assert "set SELFTUNE_DATA_DIR to a folder this user can create and write" in result.stdout


def test_the_port_check_refuses_what_uvicorn_would_refuse_and_no_more(tmp_path):
    """An IPv4 listener on the port blocks an IPv4 launch, not an IPv6 one: uvicorn's IPv6
    socket covers IPv6 only."""
    from app.config import Settings
    from app.launcher import port_refusal

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, refused in (("127.0.0.1", True), ("0.0.0.0", True), ("::", False)):
            if ":" in host and not socket.has_ipv6:
                continue
            settings = Settings(data_dir=tmp_path, host=host, port=port,
                                allow_public_without_token=True)
            assert (port_refusal(settings) is not None) == refused, host


def launched(children: list[psutil.Process], program: str) -> psutil.Process:
    """The launcher's child that runs `program` (its command line names it)."""
    return next(child for child in children if program in " ".join(child.cmdline()))


def stop_launched(launcher: Process, family: list[psutil.Process]) -> None:
    """A launcher and what it started, however the test ended: its children now (one started
    again is a new child) as well as those of `family`, each with its process group."""
    with contextlib.suppress(psutil.Error):  # the launcher may be gone already
        family += psutil.Process(launcher.popen.pid).children()
    kill_groups(family)
    launcher.stop(signal.SIGKILL)


def kill_groups(processes: list[psutil.Process]) -> None:
    """SIGKILL the process groups these launcher children lead (each has its own session)."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
