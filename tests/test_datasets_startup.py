"""Crash safety of dataset storage: publishing is all-or-nothing and leftovers of a crash are
removed at startup; dataset pages and API honour the API token."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from alembic import command
from sqlalchemy import func, select, text

from app import ingest
from app.config import Settings
from app.db import (
    DATABASE_ID_FILE,
    StartupRefused,
    alembic_config,
    check_clock,
    claim_data_dir,
    get_engine,
    get_sessionmaker,
    upgrade_to_head,
)
from app.models import Dataset, DatasetImage, utcnow
from tests.support import (
    Process,
    app_env,
    free_port,
    start_forked,
    start_server,
    start_worker,
    wait_for,
)
from tests.test_datasets_support import class_entries, dataset_server, upload, zip_bytes
from tests.test_foundation_services import launcher_env, run_launcher
from tests.test_worker_lifecycle import add_run, read_run, update_run

HOUR_AGO = time.time() - 3600


def make_dir(path: Path, mtime: float | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "file.bin").write_bytes(b"x")
    if mtime is not None:
        for target in (path / "file.bin", path):
            os.utime(target, (mtime, mtime))
    return path


def test_cleanup_removes_crash_leftovers_but_keeps_datasets_and_recent_work(
    settings: Settings,
) -> None:
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        session.add(Dataset(name="kept", storage_key="kept", fingerprint="0" * 64))
        session.commit()
    kept = make_dir(settings.datasets_dir / "kept", HOUR_AGO)
    kept_thumbs = make_dir(settings.cache_dir / "thumbs" / "kept", HOUR_AGO)
    orphan = make_dir(settings.datasets_dir / "orphan", HOUR_AGO)
    orphan_thumbs = make_dir(settings.cache_dir / "thumbs" / "orphan", HOUR_AGO)
    stale_upload = make_dir(settings.tmp_dir / "upload-stale", HOUR_AGO)
    fresh_upload = make_dir(settings.tmp_dir / "upload-fresh")
    fresh_orphan = make_dir(settings.datasets_dir / "being-published")
    not_ours = make_dir(settings.tmp_dir / "someone-elses", HOUR_AGO)

    removed = ingest.cleanup_orphans(settings, grace_s=600)

    assert set(removed) == {orphan, orphan_thumbs, stale_upload}
    for path in (orphan, orphan_thumbs, stale_upload):
        assert not path.exists()
    for path in (kept, kept_thumbs, fresh_upload, fresh_orphan, not_ours):
        assert path.is_dir()


def test_an_upload_whose_process_died_is_removed_at_once_and_one_in_progress_is_kept(
    settings: Settings,
) -> None:
    """A crashed upload (its web killed) was kept for the grace time, however large, and a
    restart within it kept it until some later one; its process holding no lock on it any
    more is what tells it is gone."""
    import signal
    import subprocess

    crashed = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom app import ingest\n"
         "from app.config import Settings\n"
         "work_dir = ingest.new_work_dir(Settings())\n"
         "(work_dir / 'upload.archive').write_bytes(bytes(1000))\n"
         "print(work_dir, flush=True)\ntime.sleep(600)"],
        env={**os.environ, "SELFTUNE_DATA_DIR": str(settings.data_dir),
             "SELFTUNE_DATABASE_URL": settings.sqlalchemy_url}, stdout=subprocess.PIPE,
        text=True)
    try:
        crashed_dir = Path(crashed.stdout.readline().strip())
        assert crashed_dir.parent == settings.tmp_dir and crashed_dir.is_dir()
        assert ingest.cleanup_orphans(settings, grace_s=600) == []  # held: in progress
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(timeout=30)
    in_progress = ingest.new_work_dir(settings)  # held by this process
    unheld_fresh = make_dir(settings.tmp_dir / "upload-being-made")  # no lock file yet

    assert ingest.cleanup_orphans(settings, grace_s=600) == [crashed_dir]
    assert not crashed_dir.exists()
    assert in_progress.is_dir() and unheld_fresh.is_dir()
    ingest.remove_work_dir(in_progress)
    assert not in_progress.exists()
    assert ingest.cleanup_orphans(settings, grace_s=0) == [unheld_fresh]  # once it is old


def test_a_download_file_a_killed_web_left_half_made_in_a_run_folder_is_removed(
    settings: Settings, tmp_path: Path
) -> None:
    """A web killed while it made a run's model.onnx (or checkpoint zip) for a download left
    the half-made file in the run's folder for as long as the run was kept: the next
    downloads made theirs under other names, and the start's clean-up did not look there."""
    import subprocess

    from worker.selftuning.files import ONNX_FILE, host_tag, temporary_path

    run_id = add_run(settings, tmp_path)
    folder = settings.runs_dir / str(run_id)
    folder.mkdir(parents=True)
    kept = [folder / "model.safetensors", temporary_path(folder / ONNX_FILE)]  # being made
    dead = subprocess.Popen([sys.executable, "-c", "print(1)"], stdout=subprocess.DEVNULL)
    dead.wait(timeout=30)
    left = [folder / f".{ONNX_FILE}.{dead.pid}.{host_tag()}.tmp",  # its writer is gone
            folder / f".run-{run_id}-checkpoint.zip.{'0' * 32}.{dead.pid}.{host_tag()}.tmp"]
    for path in kept + left:
        path.write_bytes(b"half")

    assert sorted(ingest.cleanup_orphans(settings, grace_s=600)) == sorted(left)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in left)
    assert temporary_path(folder / "a.zip", one_of_several=True) != temporary_path(
        folder / "a.zip", one_of_several=True)


def test_failed_commit_removes_the_moved_directory_and_leaves_no_rows(
    settings: Settings, tmp_path: Path
) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes(class_entries(("cat", "dog"), per_class=3)))
    work_dir = ingest.new_work_dir(settings)
    prepared = ingest.prepare_dataset(archive, work_dir, settings)
    assert len(list(prepared.directory.rglob("*.png"))) == 6

    session = get_sessionmaker(settings.sqlalchemy_url)()

    def failing_commit() -> None:
        raise RuntimeError("database went away")

    session.commit = failing_commit  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="database went away"):
        ingest.publish_dataset(session, settings, prepared, "doomed")
    session.close()

    assert list(settings.datasets_dir.iterdir()) == []
    with get_sessionmaker(settings.sqlalchemy_url)() as check:
        assert check.scalar(select(func.count()).select_from(Dataset)) == 0
        assert check.scalar(select(func.count()).select_from(DatasetImage)) == 0


def test_server_start_removes_leftovers_and_dataset_routes_need_the_token(
    tmp_path: Path, redis_url: str
) -> None:
    data_dir = tmp_path / "srv" / "data"
    stale_upload = make_dir(data_dir / "tmp" / "upload-crashed", HOUR_AGO)
    orphan = make_dir(data_dir / "datasets" / "half-published", HOUR_AGO)
    token = "s3cret-token"
    with dataset_server(tmp_path / "srv", redis_url, SELFTUNE_API_TOKEN=token) as server:
        assert not stale_upload.exists() and not orphan.exists()
        with server.client(follow_redirects=False) as anonymous:
            page = anonymous.get("/datasets/new")
            assert page.status_code == 303
            assert page.headers["location"] == "/login?next=%2Fdatasets%2Fnew"
            archive = zip_bytes(class_entries(("cat", "dog")))
            assert upload(anonymous, archive).status_code == 401
            assert anonymous.get("/api/datasets").status_code == 401
        with server.client(headers={"Authorization": f"Bearer {token}"}) as client:
            created = upload(client, archive)
            assert created.status_code == 201, created.text
            assert client.get(f"/datasets/{created.json()['id']}").status_code == 200
        with server.client(cookies={"selftune_token": token}) as browser:
            assert browser.get("/datasets").status_code == 200


def refused(process: Process, what: str) -> str:
    """Wait for a process that must refuse to start to exit 2; returns its log."""
    try:
        wait_for(lambda: process.popen.poll() is not None, timeout=60,
                 message=f"the {what} to refuse to start and exit")
    finally:
        process.stop()
    assert process.popen.returncode == 2, process.log()
    return process.log()


def refused_worker(env: dict[str, str], log_path: Path) -> str:
    """Start a worker that must refuse to start: waits for it to exit 2; returns its log."""
    return refused(start_worker(env, log_path, name="refused"), "worker")


def test_a_data_directory_refuses_another_database_and_keeps_its_files(
    tmp_path: Path, redis_url: str
) -> None:
    """Started once against another database (SELFTUNE_DATABASE_URL forgotten: a new, empty
    SQLite database), the web removed every dataset folder that database did not list."""
    with dataset_server(tmp_path / "srv", redis_url) as server:
        with server.client() as client:
            created = upload(client, zip_bytes(class_entries(("cat", "dog"))))
            assert created.status_code == 201, created.text
        data_dir, own_url = server.data_dir, server.database_url
    stored = [path for path in (data_dir / "datasets").rglob("*")]
    for path in [*stored, *(data_dir / "datasets").iterdir()]:
        os.utime(path, (HOUR_AGO, HOUR_AGO))  # old enough for the startup cleanup
    assert (data_dir / DATABASE_ID_FILE).is_file()

    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade_to_head(other_url)
    env = app_env(data_dir, other_url, redis_url)
    assert "web cannot start: the data directory" in refused_web(env,
                                                                tmp_path / "other-uvicorn.log")
    launcher = run_launcher({**launcher_env(data_dir, free_port()),
                             "SELFTUNE_DATABASE_URL": other_url})
    assert launcher.returncode == 2
    assert "cannot start: the data directory" in launcher.stdout
    assert "Traceback" not in launcher.stdout + launcher.stderr
    # A worker started alone (the compose layout) refuses too, before taking any message: it
    # would drop the runs its database does not know and write into the other's run folders.
    refusal = refused_worker(env, tmp_path / "other-worker.log")
    assert "worker cannot start: the data directory" in refusal
    assert "ready" not in refusal
    assert all(path.exists() for path in stored)  # nothing removed

    # With its own database it starts, and the dataset is whole.
    with dataset_server(tmp_path / "srv", redis_url, own_url) as server, \
            server.client() as client:
        dataset_id = created.json()["id"]
        assert client.get(f"/api/datasets/{dataset_id}").status_code == 200
        first = client.get(f"/api/datasets/{dataset_id}/images").json()["items"][0]["id"]
        thumbnail = client.get(f"/api/datasets/{dataset_id}/images/{first}/thumbnail")
        assert thumbnail.status_code == 200


def test_a_database_migrated_by_a_newer_version_is_refused_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'selftune.db'}"
    upgrade_to_head(url)
    with get_sessionmaker(url)() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        session.commit()
    with pytest.raises(StartupRefused, match="migrated by a newer version"):
        upgrade_to_head(url)
    launcher = run_launcher(launcher_env(data_dir, free_port()))
    assert launcher.returncode == 2
    assert "cannot start: the database" in launcher.stdout
    assert "Traceback" not in launcher.stdout + launcher.stderr


def test_a_refused_launch_leaves_no_database_behind_and_says_why_in_one_line(
    tmp_path: Path,
) -> None:
    """`make run` on a data directory used with another database (SELFTUNE_DATABASE_URL
    forgotten) refused, saying "Nothing was changed", but left the new SQLite database its
    migrations made there: a backup then copied it beside the directory's database id. A
    database that does not answer, or a URL that is none, was a traceback."""
    data_dir = tmp_path / "data"
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade_to_head(other_url)
    claim_data_dir(data_dir, other_url)
    launcher = run_launcher(launcher_env(data_dir, free_port()))
    assert launcher.returncode == 2, launcher.stdout + launcher.stderr
    assert "holds the files of another database" in launcher.stdout
    # No selftune.db, nor its journal: the lock of the launcher that ran (released).
    assert sorted(path.name for path in data_dir.iterdir()) == [DATABASE_ID_FILE,
                                                               "launcher.lock"]

    for url, said in (
            ("postgresql+psycopg://someone:secret@127.0.0.1:1/nothing",
             "cannot start: the database postgresql+psycopg://someone:***@127.0.0.1:1/nothing "
             "does not answer or cannot be used: "),
            ("not a url", "cannot start: SELFTUNE_DATABASE_URL is not a database URL")):
        launcher = run_launcher({**launcher_env(tmp_path / "fresh", free_port()),
                                 "SELFTUNE_DATABASE_URL": url})
        output = launcher.stdout + launcher.stderr
        assert launcher.returncode == 2, output
        assert said in launcher.stdout and "Traceback" not in output and "secret" not in output
        assert not (tmp_path / "fresh").exists()  # the refused start made it and removed it


def refused_web(env: dict[str, str], log_path: Path) -> str:
    """Start a web that must refuse to start (uvicorn as compose starts it): waits for it to
    exit 2; returns its log, which must be the reason in one line."""
    log = refused(start_forked(["--factory", "app.main:app_factory", "--port",
                                str(free_port())], env, log_path), "web")
    assert "Traceback" not in log and len(log.splitlines()) == 1, log
    return log


def test_the_web_and_a_worker_refuse_a_database_that_was_never_migrated_in_one_line(
        tmp_path: Path, redis_url: str) -> None:
    """Started alone on a SQLite database that does not exist (compose without its migrate
    step, a mistyped path), the web printed a traceback of 70 lines, and both made the empty
    file, which then no longer said it was missing."""
    never_migrated = tmp_path / "none.db"
    env = app_env(tmp_path / "data", f"sqlite:///{never_migrated}", redis_url)
    said = ("has not been migrated (there is no file "
            f"{never_migrated}): run `alembic upgrade head`")
    assert f"web cannot start: the database sqlite:///{never_migrated} {said}" in refused_web(
        env, tmp_path / "uvicorn.log")
    assert said in refused_worker(env, tmp_path / "worker.log")
    assert not never_migrated.exists()
    assert not (tmp_path / "data" / DATABASE_ID_FILE).exists()

    # The default database of a data directory that is not there (mistyped): the same, where
    # it waited for the database to answer, answering 503 to everything.
    missing = tmp_path / "mistyped"
    env_missing = {key: value for key, value in app_env(missing, "", redis_url).items()
                   if key != "SELFTUNE_DATABASE_URL"}
    assert (f"has not been migrated (there is no data directory {missing}): run"
            in refused_web(env_missing, tmp_path / "uvicorn-missing.log"))
    assert not missing.exists()

    # One that exists, empty: the same refusal, and the file left as it was (a connection
    # wrote a database's first page into it, and the refusal said nothing was changed).
    never_migrated.touch()
    said = f"has not been migrated (the file {never_migrated} is empty): run `alembic upgrade"
    assert said in refused_web(env, tmp_path / "uvicorn-empty.log")
    assert said in refused_worker(env, tmp_path / "worker-empty.log")
    assert never_migrated.stat().st_size == 0


def test_a_worker_set_to_a_gpu_the_machine_lacks_refuses_to_start_in_one_line(
        settings, tmp_path: Path) -> None:
    """It started, showed the device probe's Python source as its device on the health page,
    and failed every run it took. (GPU 99: no machine this runs on has that many.)"""
    upgrade_to_head(settings.sqlalchemy_url)
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_WORKER_DEVICE="cuda:99")
    refusal = refused_worker(env, tmp_path / "worker.log")
    assert ("worker cannot start: this worker is set to train on 'cuda:99' "
            "(SELFTUNE_WORKER_DEVICE) but has ") in refusal
    assert "usable CUDA device(s)" in refusal and "import json" not in refusal
    assert "ready" not in refusal


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_database_an_older_release_migrated_is_refused_by_the_web_and_the_worker(
    tmp_path: Path, redis_url: str, request, database
) -> None:
    """A database at 0007 (an older release's, not migrated since) was let through, since it
    has the installation table: every run page and new experiment then answered 500
    (no column runs.details)."""
    url = (request.getfixturevalue("postgres_url") if database == "postgresql"
           else f"sqlite:///{tmp_path / 'selftune.db'}")
    upgrade_to_head(url)
    command.downgrade(alembic_config(url), "0007")
    env = app_env(tmp_path / "data", url, redis_url)
    with pytest.raises(RuntimeError, match="is at migration 0007 and this version needs 0012: "
                                           "run `alembic upgrade head`"):
        start_server(env, tmp_path / "uvicorn.log")
    assert "is at migration 0007" in refused_worker(env, tmp_path / "worker.log")
    upgrade_to_head(url)
    _, process = start_server(env, tmp_path / "uvicorn-after.log")  # and at head it starts
    process.stop()


def test_a_host_whose_clock_is_far_from_the_database_servers_is_refused(postgres_url):
    """Heartbeats carry each worker's clock and the web's reaper judges them by its own: a
    worker host 3 minutes behind had every run it trained called lost, queued again and lost
    again, until its attempts ran out."""
    upgrade_to_head(postgres_url)
    engine = get_engine(postgres_url)
    with engine.connect() as connection:
        check_clock(connection, postgres_url)  # this host's own clock: no refusal
        server = connection.scalar(text("SELECT now()"))
        for skew_s, words in ((-180, "180 s behind"), (90, "90 s ahead of")):
            with pytest.raises(StartupRefused, match=f"this host's clock is {words} the "
                                                     "database server's"):
                check_clock(connection, postgres_url,
                            clock=lambda skew_s=skew_s: server + timedelta(seconds=skew_s))
        check_clock(connection, postgres_url, clock=lambda: server + timedelta(seconds=45))


def test_a_refused_start_leaves_the_runs_and_the_queue_as_they_were(
    settings: Settings, tmp_path: Path
) -> None:
    """The web's reaper started before the data directory check: a start refused as "nothing
    was changed" had already queued a silent run again (an attempt used, a new task) and
    sent its message to the broker."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", attempts=1, worker="gone@host",
               heartbeat_at=utcnow() - timedelta(hours=1))
    before = read_run(settings, run_id)
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade_to_head(other_url)
    claim_data_dir(settings.data_dir, other_url)  # the directory is the other database's
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url)
    with pytest.raises(RuntimeError, match="holds the files of another database"):
        start_server(env, tmp_path / "uvicorn.log")
    after = read_run(settings, run_id)
    assert (after.status, after.attempts, after.celery_task_id, after.error) == (
        "running", 1, before.celery_task_id, None)
    assert redis.Redis.from_url(settings.effective_redis_url).llen("celery") == 0


def test_a_starting_worker_removes_image_caches_whose_writer_died(settings, tmp_path: Path
                                                                  ) -> None:
    """A killed worker's half-written cache (30 GB for one run at 1024 px in an exploratory
    pass) stayed until a run of the same dataset decoded again."""
    import subprocess

    from worker.selftuning.files import host_tag

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    folder = settings.cache_dir / "dataset-1-abc"
    folder.mkdir(parents=True)
    abandoned = folder / f".train-72-f00.npy.{dead_pid}.{host_tag()}.tmp"
    being_written = folder / f".train-72-f00.npy.{os.getpid()}.{host_tag()}.tmp"
    whole = folder / "train-72-f00.npy"
    for path in (abandoned, being_written, whole):
        path.write_bytes(b"x" * 1000)
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url)
    worker = start_worker(env, tmp_path / "worker.log", name="sweeper")
    try:
        wait_for(lambda: "ready" in worker.log(), timeout=90, message="the worker to start")
    finally:
        worker.stop()
    assert not abandoned.exists(), worker.log()
    assert being_written.exists() and whole.exists()
    assert f"removed an image cache left unfinished: {abandoned}" in worker.log()


def test_an_upload_cut_by_the_servers_shutdown_leaves_no_work_directory(
    tmp_path: Path, redis_url: str
) -> None:
    """Stopping the server mid-upload (as `make run` and the compose file stop it, with a
    graceful-shutdown limit) cancelled the request before its clean-up could run: the
    partial upload stayed in tmp/, and a start only removes what is over 10 minutes old."""
    import signal
    import threading

    import httpx

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database_url = f"sqlite:///{data_dir / 'selftune.db'}"
    upgrade_to_head(database_url)
    url, server = start_server(app_env(data_dir, database_url, redis_url),
                               tmp_path / "uvicorn.log",
                               options=("--timeout-graceful-shutdown", "1"))
    try:
        stop_sending = threading.Event()

        def body():
            yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.zip"'
                   b"\r\nContent-Type: application/zip\r\n\r\n")
            while not stop_sending.wait(0.05):
                yield b"\0" * 65536

        def send() -> None:
            try:
                httpx.post(f"{url}/api/datasets", content=body(), timeout=60, headers={
                    "Content-Type": "multipart/form-data; boundary=b"})
            except httpx.HTTPError:
                pass  # the server went away: expected

        sender = threading.Thread(target=send)
        sender.start()
        uploads = data_dir / "tmp"
        wait_for(lambda: any(path.stat().st_size > 0
                             for path in uploads.glob("upload-*/upload.archive")), 30,
                 message="the upload to reach the disk")
        server.popen.send_signal(signal.SIGTERM)
        server.popen.wait(timeout=20)  # uvicorn ends by its signal, once the request is cut
        assert "timeout graceful shutdown exceeded" in server.log()
        stop_sending.set()
        sender.join(timeout=30)
        assert list(uploads.glob("upload-*")) == []
    finally:
        server.stop()


def test_a_database_migrated_down_past_0006_and_up_again_says_how_to_reclaim_its_directory(
    tmp_path: Path,
) -> None:
    """The round trip gives the database a new id, and the refusal blamed a wrong
    SELFTUNE_DATABASE_URL only; it now also says what to delete (as the README does)."""
    from alembic import command

    from app.db import alembic_config, claim_data_dir

    url, data_dir = f"sqlite:///{tmp_path / 'selftune.db'}", tmp_path / "data"
    upgrade_to_head(url)
    claim_data_dir(data_dir, url)
    command.downgrade(alembic_config(url), "0005")
    upgrade_to_head(url)
    with pytest.raises(StartupRefused) as refused:
        claim_data_dir(data_dir, url)
    marker = data_dir / DATABASE_ID_FILE
    assert (f"A database migrated down past revision 0006 and up again has a new id: if it is "
            f"this directory's database, delete {marker} and start again.") in str(refused.value)
    marker.unlink()
    claim_data_dir(data_dir, url)  # claimed again
    assert marker.is_file()
