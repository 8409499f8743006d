"""The reaper and the database: after an outage, the workers' heartbeats (which failed while
it was away, training going on) get `stale_after_s` to arrive before a run counts as lost;
and a heartbeat or an outcome a worker writes after the reaper has read its run keeps the
run the worker's.

The reaper runs in this process on a migrated SQLite database whose folder is renamed away
and back, as the worker's outage test does (tests/test_worker_lifecycle.py). Each run here
has used its attempts, so a lost one ends "lost" without a task sent to the broker."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app import reaper as reaper_module
from app.db import get_engine, upgrade_to_head
from app.live import WORKER_GONE_PREFIX, get_redis, mark_worker_gone
from app.models import utcnow
from app.reaper import Reaper, reap
from tests.test_worker_lifecycle import add_run, read_run, update_run

SILENT = timedelta(minutes=10)  # far past stale_after_s


def running_run(settings, folder) -> int:
    folder.mkdir(exist_ok=True)
    run_id = add_run(settings, folder)
    update_run(settings, run_id, status="running", worker="gpu0@host",
               started_at=utcnow() - SILENT, heartbeat_at=utcnow() - SILENT,
               attempts=settings.max_attempts)
    return run_id


def test_after_a_database_outage_a_silent_run_is_lost_only_once_its_worker_had_time_to_report(
    settings, tmp_path
):
    """Before the fix, the first pass once the database answered again marked every running
    run lost: their heartbeats had failed through the outage, however well they trained."""
    home, away = tmp_path / "db-home", tmp_path / "db-away"
    ours = settings.model_copy(update={"database_url": f"sqlite:///{home}/selftune.db"})
    upgrade_to_head(ours.sqlalchemy_url)
    beating, silent = running_run(ours, tmp_path / "a"), running_run(ours, tmp_path / "b")
    now = [1000.0]
    reaper = Reaper(ours, clock=lambda: now[0])

    get_engine(ours.sqlalchemy_url).dispose()
    home.rename(away)  # the database is away
    reaper.run_once()
    assert reaper.database_away

    away.rename(home)  # and back, the runs' last heartbeats long past
    now[0] += reaper.interval
    reaper.run_once()
    assert not reaper.database_away
    assert [read_run(ours, run_id).status for run_id in (beating, silent)] == ["running"] * 2

    now[0] += ours.stale_after_s - 1
    update_run(ours, beating, heartbeat_at=utcnow())  # one worker reports, the other is gone
    reaper.run_once()
    assert [read_run(ours, run_id).status for run_id in (beating, silent)] == ["running"] * 2

    now[0] += 1
    reaper.run_once()
    assert read_run(ours, beating).status == "running"
    lost = read_run(ours, silent)
    assert lost.status == "lost" and "gpu0@host stopped reporting" in lost.error


def test_without_an_outage_a_silent_run_is_lost_at_the_first_pass(settings, tmp_path):
    run_id = running_run(settings, tmp_path)
    Reaper(settings, clock=lambda: 0.0).run_once()
    assert read_run(settings, run_id).status == "lost"


@pytest.mark.parametrize("worker_writes", [
    {"heartbeat_at": "now"},
    {"status": "succeeded"},
], ids=["heartbeat", "outcome"])
def test_a_worker_that_reports_after_the_reaper_read_its_run_keeps_it(
    settings, database_url, tmp_path, monkeypatch, worker_writes
):
    """The worker's write lands between the reaper's read of the silent run and its write.
    Before the fix the reaper wrote "lost" over it (over "succeeded", too, then queued the run
    again to train once more from step 0, its state already deleted). On SQLite and on
    PostgreSQL."""
    settings = settings.model_copy(update={"database_url": database_url})
    upgrade_to_head(settings.sqlalchemy_url)
    run_id = running_run(settings, tmp_path / "run")
    values = {name: utcnow() if value == "now" else value for name, value in worker_writes.items()}
    read_silent = reaper_module.stale_runs

    def worker_reports_meanwhile(session, settings, gone):
        runs = read_silent(session, settings, gone)
        update_run(settings, run_id, **values)  # another connection: the worker's
        return runs

    monkeypatch.setattr(reaper_module, "stale_runs", worker_reports_meanwhile)
    assert reap(settings) == []
    run = read_run(settings, run_id)
    assert run.status == values.get("status", "running")
    assert run.error is None


def test_a_late_data_directory_check_that_fails_unexpectedly_is_tried_again(
    settings, tmp_path, monkeypatch
):
    """The reaper makes the web's data directory check once the database answers. An error
    other than the database's (its clean-up of crash leftovers meeting a file it cannot
    remove) ended the reaper's thread for good: no run was ever reaped or sent again.
    Injected here because a file root cannot remove is hard to make for real."""
    from app import ingest
    from app.startup import DataDirCheck

    upgrade_to_head(settings.sqlalchemy_url)
    run_id = running_run(settings, tmp_path / "a")
    check = DataDirCheck(settings)
    reaper = Reaper(settings, check, clock=lambda: 0.0)
    real_cleanup = ingest.cleanup_orphans

    def refused(_settings):
        raise PermissionError(13, "Permission denied", str(settings.datasets_dir / "x"))

    monkeypatch.setattr(ingest, "cleanup_orphans", refused)
    reaper.run_once()  # logged, not raised
    assert check.pending and read_run(settings, run_id).status == "running"

    monkeypatch.setattr(ingest, "cleanup_orphans", real_cleanup)
    reaper.run_once()
    assert check.passed


def test_a_run_whose_worker_the_launcher_saw_killed_is_lost_without_waiting_for_silence(
    settings, tmp_path
):
    """`make run` started a killed worker again, and its run waited out stale_after_s (2 min)
    before it was found lost. The launcher knows every process of that worker is gone: its run
    is lost at the next pass. A run another worker trains, or one the new worker of the same
    name took since, is not."""
    upgrade_to_head(settings.sqlalchemy_url)
    live = get_redis(settings.effective_redis_url)
    recent = {"heartbeat_at": utcnow() - timedelta(seconds=5), "started_at": utcnow() - SILENT}
    killed, elsewhere, taken_since = (running_run(settings, tmp_path / name)
                                      for name in ("a", "b", "c"))
    update_run(settings, killed, worker="selftune-7@host", **recent)
    update_run(settings, elsewhere, **recent)
    mark_worker_gone(live, "selftune-7@host", "SIGKILL")
    try:
        update_run(settings, taken_since, worker="selftune-7@host", started_at=utcnow(),
                   heartbeat_at=utcnow())
        assert reap(settings) == [killed]
        assert [read_run(settings, run_id).status
                for run_id in (killed, elsewhere, taken_since)] == ["lost", "running", "running"]
        assert read_run(settings, killed).error.startswith(
            "worker selftune-7@host was killed (SIGKILL) and started again (last heartbeat 20")
        assert reap(settings) == []
    finally:
        live.delete(WORKER_GONE_PREFIX + "selftune-7@host")
