"""Migrations and a create/read round trip on SQLite and on the local PostgreSQL server."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import inspect, select

from app.db import alembic_config, get_engine, session_scope, sqlite_pragmas, upgrade_to_head
from app.models import Artifact, Dataset, DatasetImage, Experiment, Run, RunMetric, utcnow

TABLES = {"datasets", "dataset_images", "experiments", "runs", "run_metrics", "artifacts"}


def round_trip(url: str) -> None:
    with session_scope(url) as session:
        dataset = Dataset(
            name="pets", storage_key="k1", fingerprint="f" * 64, class_names=["cat", "dog"],
            class_counts={"cat": {"train": 1, "test": 0}}, size_bytes=5 * 1024**3,
        )
        dataset.images.append(
            DatasetImage(path="train/0/0.png", original_path="cat/a.png", split="train",
                         label=0, sha256="a" * 64, width=28, height=28)
        )
        session.add(dataset)
        session.flush()
        experiment = Experiment(dataset_id=dataset.id, backbone="tf_efficientnet_lite0",
                                methods=["self-tuning"], budgets=[0.05], seeds=[0],
                                preset="quick")
        session.add(experiment)
        session.flush()
        run = Run(experiment_id=experiment.id, dataset_id=dataset.id, method="self-tuning",
                  budget=0.05, budget_label="5%", config={"iterations": 10})
        session.add(run)
        session.flush()
        session.add(RunMetric(run_id=run.id, kind="eval", step=10, values={"test_top1": 0.5}))
        session.add(Artifact(run_id=run.id, name="model.safetensors", path="runs/1/m",
                             sha256="b" * 64, size_bytes=3))
    with session_scope(url) as session:
        dataset = session.scalars(select(Dataset)).one()
        assert dataset.size_bytes == 5 * 1024**3  # BigInteger: archives over 2 GiB fit
        assert dataset.class_names == ["cat", "dog"]
        assert [image.label for image in dataset.images] == [0]
        run = session.scalars(select(Run)).one()
        assert run.status == "queued" and run.experiment.backbone == "tf_efficientnet_lite0"
        metric = session.scalars(select(RunMetric)).one()
        assert metric.values == {"test_top1": 0.5}
        assert [a.name for a in run.artifacts] == ["model.safetensors"]
        assert run.created_at.tzinfo is not None or url.startswith("sqlite")


def migrate_down_and_up(url: str) -> None:
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(get_engine(url)).get_table_names()) & TABLES == set()
    upgrade_to_head(url)
    assert TABLES <= set(inspect(get_engine(url)).get_table_names())


def test_sqlite_migrates_to_head_and_round_trips(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'selftune.db'}"
    upgrade_to_head(url)
    assert TABLES <= set(inspect(get_engine(url)).get_table_names())
    round_trip(url)
    get_engine(url).dispose()


def test_sqlite_migrations_downgrade_to_base_and_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'selftune.db'}"
    upgrade_to_head(url)
    migrate_down_and_up(url)
    get_engine(url).dispose()


def test_postgresql_migrates_to_head_and_round_trips(postgres_url):
    upgrade_to_head(postgres_url)
    round_trip(postgres_url)
    migrate_down_and_up(postgres_url)


def add_rows_at_an_older_schema(url: str, method: str, configs: list[dict],
                                overrides: dict | None = None,
                                skipped: list[dict] | None = None) -> int:
    """A dataset, an experiment and one run per config, as an older schema holds them. Rows
    are written column by column: the models have columns that older schemas lack (runs since
    0002, datasets since 0007). Returns the dataset's id."""
    columns = ("name", "storage_key", "created_at", "fingerprint", "class_names",
               "class_counts", "unlabeled_count", "image_count", "test_source", "skipped",
               "size_bytes")
    old_datasets = sa.table("datasets", *(sa.column(name, Dataset.__table__.c[name].type)
                                          for name in columns))
    with session_scope(url) as session:
        session.execute(old_datasets.insert().values(
            name="d", storage_key="k", created_at=utcnow(), fingerprint="f" * 64,
            class_names=["a"], class_counts={}, unlabeled_count=0, image_count=0,
            test_source="holdout", skipped=skipped or [], size_bytes=1))
        dataset_id = session.scalar(select(Dataset.id).where(Dataset.storage_key == "k"))
        experiment = Experiment(dataset_id=dataset_id, backbone="b", methods=[method],
                                budgets=[0.05], seeds=[0], preset="quick",
                                overrides=overrides or {})
        session.add(experiment)
        session.flush()
        for config in configs:
            session.execute(Run.__table__.insert().values(
                experiment_id=experiment.id, dataset_id=dataset_id, method=method,
                budget=0.05, budget_label="5%", config=config))
        return dataset_id


def runs_recorded_before_labeled_query_view(url: str) -> None:
    """Migration 0002: configs stored under 0001 gain the strong view they trained with;
    newer ones keep theirs; downgrading removes the key that older code would reject.
    (Runs are written and read column by column: the model has columns added after 0002.)"""
    command.upgrade(alembic_config(url), "0001")
    add_rows_at_an_older_schema(
        url, "self-tuning",
        [{"iterations": 10}, {"iterations": 10, "labeled_query_view": "weak"}, {}],
        overrides={"labeled_query_view": "weak"},
    )
    command.upgrade(alembic_config(url), "0002")
    with session_scope(url) as session:
        configs = session.scalars(select(Run.config).order_by(Run.id)).all()
    assert configs == [{"iterations": 10, "labeled_query_view": "strong"},
                       {"iterations": 10, "labeled_query_view": "weak"}, {}]
    command.downgrade(alembic_config(url), "0001")
    with session_scope(url) as session:
        configs = session.scalars(select(Run.config).order_by(Run.id)).all()
        assert configs == [{"iterations": 10}, {"iterations": 10}, {}]
        assert session.scalars(select(Experiment)).one().overrides == {}


def test_runs_recorded_before_labeled_query_view_keep_the_strong_view(database_url):
    runs_recorded_before_labeled_query_view(database_url)


def test_models_and_migrations_agree(tmp_path):
    """Autogenerate against a migrated database finds nothing to add: no drift."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.models import Base

    url = f"sqlite:///{tmp_path / 'drift.db'}"
    upgrade_to_head(url)
    with get_engine(url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models changed without a migration: {diff}"


@pytest.mark.parametrize("host,token,allowed,refused", [
    ("127.0.0.1", None, False, False),
    ("localhost", None, False, False),
    ("0.0.0.0", None, False, True),
    ("0.0.0.0", "s3cret", False, False),
    ("192.0.2.1", None, True, False),
])
def test_non_loopback_bind_without_token_is_refused(host, token, allowed, refused, tmp_path):
    from app.config import Settings
    from app.launcher import bind_refusal

    settings = Settings(data_dir=tmp_path, host=host, api_token=token,
                        allow_public_without_token=allowed)
    reason = bind_refusal(settings)
    assert (reason is not None) == refused
    if refused:
        assert "SELFTUNE_API_TOKEN" in reason


def test_sqlite_connections_switching_a_new_database_together_all_succeed(tmp_path):
    """A database file not made by our migrations (which switch it: see the next test) is in
    rollback-journal mode until a connection switches it to WAL. The web's start-up tasks and
    the worker open their first connections at the same moment, and SQLite refuses one of two
    concurrent switches at once ('database is locked', busy timeout or not): about one start
    in ten failed so before the switch was retried."""
    for attempt in range(60):
        path = tmp_path / f"{attempt}.db"
        with sqlite3.connect(path) as setup:
            setup.execute("CREATE TABLE t (a INTEGER)")
        barrier = threading.Barrier(2)

        def open_and_read(_: int, path=path, barrier=barrier) -> str:
            connection = sqlite3.connect(path, timeout=30, check_same_thread=False)
            try:
                barrier.wait()
                sqlite_pragmas(connection)
                connection.execute("SELECT a FROM t").fetchall()
                return connection.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                connection.close()

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(open_and_read, range(2))) == ["wal", "wal"]


def test_sqlite_migrations_leave_the_database_in_wal_mode(tmp_path):
    """Migrating switches the file to WAL, so the connections that open right after (the web's
    start-up tasks, the worker) find it switched and do not race to switch it."""
    path = tmp_path / "selftune.db"
    upgrade_to_head(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:  # a raw connection: no pragmas of ours
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert TABLES <= {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_the_sqlite_log_shrinks_back_after_a_large_write(tmp_path):
    """The write-ahead log kept the size of the largest write for good (183 MB after a big
    upload and delete); once written back it now goes back to its limit."""
    from app.db import WAL_SIZE_LIMIT_BYTES

    path = tmp_path / "selftune.db"
    engine = get_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE blobs (data BLOB)")
        for _ in range(100):  # 100 MiB in one transaction: all of it goes through the log
            connection.exec_driver_sql("INSERT INTO blobs VALUES (zeroblob(1048576))")
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 100 * 1024**2
    with engine.begin() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)")
    with engine.begin() as connection:  # the next write starts the log again, cut back
        connection.exec_driver_sql("INSERT INTO blobs VALUES (zeroblob(10))")
    assert wal.stat().st_size <= WAL_SIZE_LIMIT_BYTES
    engine.dispose()


def runs_queued_before_0003_count_as_queued_when_created(url: str) -> None:
    """Migration 0003: a run's queue position follows `queued_at`; runs recorded before it
    were queued when they were created."""
    command.upgrade(alembic_config(url), "0002")
    add_rows_at_an_older_schema(url, "fine-tune", [{}])
    upgrade_to_head(url)
    with session_scope(url) as session:
        run = session.scalars(select(Run)).one()
        assert run.queued_at is not None and run.queued_at == run.created_at
    command.downgrade(alembic_config(url), "0002")
    assert "queued_at" not in {c["name"] for c in inspect(get_engine(url)).get_columns("runs")}


def test_runs_queued_before_0003_count_as_queued_when_created(database_url):
    runs_queued_before_0003_count_as_queued_when_created(database_url)


def test_sqlite_never_gives_a_deleted_rows_id_to_a_new_row(tmp_path):
    """Migration 0004: rows from before it keep their ids, links and indexes; after it, the
    newest experiment or run deleted does not lend its id to the next one (a bookmark, an API
    client or a cached thumbnail would meet another row)."""
    url = f"sqlite:///{tmp_path / 'selftune.db'}"
    command.upgrade(alembic_config(url), "0003")
    dataset_id = add_rows_at_an_older_schema(url, "fine-tune", [{}])
    with session_scope(url) as session:
        session.add(DatasetImage(dataset_id=dataset_id, path="0.png", original_path="a/0.png",
                                 split="train", label=0, sha256="0" * 64, width=8, height=8))
    upgrade_to_head(url)
    with session_scope(url) as session:
        run = session.scalars(select(Run)).one()
        assert (run.id, run.experiment_id, run.dataset_id) == (1, 1, 1)
        assert session.scalars(select(DatasetImage.dataset_id)).all() == [1]
        session.delete(run)
        session.flush()
        session.delete(session.get(Experiment, 1))
        session.flush()
        session.add(Experiment(dataset_id=1, backbone="b", methods=["fine-tune"],
                               budgets=[0.05], seeds=[0], preset="quick", overrides={}))
        session.flush()
        assert session.scalars(select(Experiment.id)).all() == [2]
    indexes = {index["name"] for table in ("runs", "dataset_images")
               for index in inspect(get_engine(url)).get_indexes(table)}
    assert indexes == {"ix_runs_status", "ix_dataset_images_dataset_split"}
    with session_scope(url) as session:  # cascades still hold: the images go with the dataset
        session.execute(Experiment.__table__.delete())
        session.delete(session.get(Dataset, 1))
    with session_scope(url) as session:
        assert session.scalars(select(DatasetImage)).all() == []
    command.downgrade(alembic_config(url), "0003")
    get_engine(url).dispose()


def test_datasets_stored_before_0007_count_their_skipped_files(database_url):
    """Migration 0007: the skipped-file count moves to a column of its own (lists read it only
    to count it), filled from the lists stored before."""
    command.upgrade(alembic_config(database_url), "0006")
    skipped = [{"path": f"{n}.txt", "reason": "not an image"} for n in range(3)]
    dataset_id = add_rows_at_an_older_schema(database_url, "fine-tune", [], skipped=skipped)
    upgrade_to_head(database_url)
    with session_scope(database_url) as session:
        dataset = session.get(Dataset, dataset_id)
        assert (dataset.skipped_count, dataset.skipped) == (3, skipped)
    command.downgrade(alembic_config(database_url), "0006")
    columns = {c["name"] for c in inspect(get_engine(database_url)).get_columns("datasets")}
    assert "skipped_count" not in columns and "skipped" in columns


def test_runs_stored_before_0008_keep_their_confusion_matrix_apart(database_url):
    """Migration 0008: a run's confusion matrix leaves `metrics` (which every experiment
    read loads) for `details`; the run's record shows the same metrics; downgrading puts
    it back."""
    command.upgrade(alembic_config(database_url), "0007")
    add_rows_at_an_older_schema(database_url, "fine-tune", [{}, {}])
    old_runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("metrics", sa.JSON))
    stored = [{"test_top1": 0.5, "confusion_matrix": [[1, 1], [0, 2]]}, {"test_top1": 0.25}]
    with session_scope(database_url) as session:
        ids = session.scalars(sa.select(old_runs.c.id).order_by(old_runs.c.id)).all()
        for run_id, metrics in zip(ids, stored, strict=True):
            session.execute(old_runs.update().where(old_runs.c.id == run_id)
                            .values(metrics=metrics))
    upgrade_to_head(database_url)
    with session_scope(database_url) as session:
        runs = [session.get(Run, run_id) for run_id in ids]
        assert [run.metrics for run in runs] == [{"test_top1": 0.5}, {"test_top1": 0.25}]
        # Sparse since 0010.
        assert [run.details for run in runs] == [{"confusion_sparse": {
            "size": 2, "diagonal": [1, 2], "row_totals": [2, 2], "cells": [[0, 1, 1]]}}, {}]
        assert [run.all_metrics() for run in runs] == stored
    command.downgrade(alembic_config(database_url), "0007")
    with session_scope(database_url) as session:
        assert session.scalars(sa.select(old_runs.c.metrics).order_by(old_runs.c.id)
                               ).all() == stored
    columns = {c["name"] for c in inspect(get_engine(database_url)).get_columns("runs")}
    assert "details" not in columns
    get_engine(database_url).dispose()


def test_runs_stored_before_0010_keep_their_confusion_matrix_sparse(database_url):
    """Migration 0010: each run's dense matrix in `details` (75 MB of JSON at 5,000 classes)
    becomes the sparse form, which the run's record makes dense again equal; downgrading
    rebuilds the dense matrices as they were."""
    command.upgrade(alembic_config(database_url), "0009")
    add_rows_at_an_older_schema(database_url, "fine-tune", [{}, {}, {}, {}])
    old_runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("metrics", sa.JSON),
                        sa.column("details", sa.JSON))
    matrices = [[[5, 0, 0, 0], [2, 3, 0, 1], [0, 0, 0, 0], [4, 0, 0, 0]], [[7]], [], None]
    stored = [{} if matrix is None else {"confusion_matrix": matrix} for matrix in matrices]
    with session_scope(database_url) as session:
        ids = session.scalars(sa.select(old_runs.c.id).order_by(old_runs.c.id)).all()
        for run_id, details in zip(ids, stored, strict=True):
            session.execute(old_runs.update().where(old_runs.c.id == run_id)
                            .values(metrics={"test_top1": 0.5}, details=details))
    command.upgrade(alembic_config(database_url), "0010")
    with session_scope(database_url) as session:
        runs = [session.get(Run, run_id) for run_id in ids]
        assert [run.details for run in runs] == [
            {"confusion_sparse": {"size": 4, "diagonal": [5, 3, 0, 0], "row_totals": [5, 6, 0, 4],
                                  "cells": [[1, 0, 2], [1, 3, 1], [3, 0, 4]]}},
            {"confusion_sparse": {"size": 1, "diagonal": [7], "row_totals": [7], "cells": []}},
            {"confusion_sparse": {"size": 0, "diagonal": [], "row_totals": [], "cells": []}},
            {}]
        assert [run.all_metrics() for run in runs] == [{"test_top1": 0.5, **details}
                                                       for details in stored]
    command.downgrade(alembic_config(database_url), "0009")
    with session_scope(database_url) as session:
        assert session.execute(sa.select(old_runs.c.metrics, old_runs.c.details)
                               .order_by(old_runs.c.id)).all() == [
            ({"test_top1": 0.5}, details) for details in stored]
    get_engine(database_url).dispose()


def test_a_runs_queue_position_counted_by_the_database_matches_the_whole_queues_order(
    database_url: str,
) -> None:
    """The run page's one-run count (a query) and the experiment page's ranking of them all
    agree: by queue time, ties by id, and a run not yet stamped counts those created before."""
    from datetime import timedelta

    from app.experiments import queue_position, queue_positions
    from tests.support import add_dataset_row

    upgrade_to_head(database_url)
    dataset_id = add_dataset_row(database_url)
    now = utcnow()
    queue_times = [now, now - timedelta(seconds=5), None, now, now + timedelta(seconds=1),
                   None, now - timedelta(seconds=5)]
    with session_scope(database_url) as session:
        experiment = Experiment(dataset_id=dataset_id, backbone="b", methods=["fine-tune"],
                                budgets=[0.5], seeds=[0], preset="quick")
        session.add(experiment)
        session.flush()
        for index, queued_at in enumerate(queue_times):
            session.add(Run(experiment_id=experiment.id, dataset_id=dataset_id,
                            method="fine-tune", budget=0.5, budget_label=f"b{index}",
                            queued_at=queued_at))
        session.add(Run(experiment_id=experiment.id, dataset_id=dataset_id, method="fine-tune",
                        budget=0.5, budget_label="done", status="succeeded", queued_at=now))
    with session_scope(database_url) as session:
        runs = session.scalars(select(Run).order_by(Run.id)).all()
        ranked = queue_positions(session, runs)
        one_by_one = {run.id: queue_position(session, run) for run in runs}
    ids = [run.id for run in runs]
    # Stamped in queue-time order: ids[1] and ids[6] (5 s early, by id), ids[0] and ids[3]
    # (now, by id), ids[4]; unstamped ids[2] has two queued runs before it, ids[5] five.
    assert ranked == {ids[1]: 1, ids[6]: 2, ids[0]: 3, ids[3]: 4, ids[4]: 5,
                      ids[2]: 3, ids[5]: 6}
    assert one_by_one == {**ranked, ids[7]: None}


def test_the_experiment_list_counts_each_experiments_runs_by_status(database_url: str,
                                                                    redis_url: str) -> None:
    from app.live import get_redis
    from app.routers.experiments import experiment_items
    from tests.support import add_dataset_row

    upgrade_to_head(database_url)
    first, second = add_dataset_row(database_url), add_dataset_row(database_url)
    statuses = {first: [["succeeded", "succeeded", "failed"], ["queued", "running", "queued"]],
                second: [["cancelled", "succeeded"], []]}
    with session_scope(database_url) as session:
        for dataset_id, experiments in statuses.items():
            for run_statuses in experiments:
                experiment = Experiment(dataset_id=dataset_id, backbone="b",
                                        methods=["fine-tune"], budgets=[0.5], seeds=[0],
                                        preset="quick")
                session.add(experiment)
                session.flush()
                for status in run_statuses:
                    session.add(Run(experiment_id=experiment.id, dataset_id=dataset_id,
                                    method="fine-tune", budget=0.5, budget_label="50%",
                                    status=status))
    live = get_redis(redis_url)
    with session_scope(database_url) as session:
        total, items = experiment_items(session, live, None, None, 0)
        listed = [(item.dataset_id, item.run_counts, item.status) for item in items]
        on_first = [item.run_counts
                    for item in experiment_items(session, live, first, None, 0)[1]]
        # A page counts every experiment, and its own experiments' runs only.
        paged = experiment_items(session, live, None, 2, 1)
        paged_on_first = experiment_items(session, live, first, 1, 1)
        past_the_end = experiment_items(session, live, second, 5, 2)
    assert total == 4 and paged[0] == 4 and paged_on_first[0] == 2
    assert [(item.dataset_id, item.run_counts, item.status) for item in paged[1]] == listed[1:3]
    assert [item.run_counts for item in paged_on_first[1]] == [{"succeeded": 2, "failed": 1}]
    assert past_the_end == (2, [])
    assert listed == [  # newest first
        (second, {}, "finished"),
        (second, {"cancelled": 1, "succeeded": 1}, "partly cancelled"),
        (first, {"queued": 2, "running": 1}, "running"),
        (first, {"succeeded": 2, "failed": 1}, "finished with failures"),
    ]
    assert on_first == [{"queued": 2, "running": 1}, {"succeeded": 2, "failed": 1}]
    # In the order a run goes through them, as the experiments page lists them.
    assert [list(counts) for _, counts, _ in listed] == [
        [], ["succeeded", "cancelled"], ["queued", "running"], ["succeeded", "failed"]]


def test_the_experiment_list_names_each_experiments_best_run(database_url: str,
                                                             redis_url: str) -> None:
    """Each listed experiment names its succeeded run with the highest test top-1, read out of
    the runs' stored metrics by the database (SQLite's JSON functions, PostgreSQL's)."""
    from app.live import get_redis
    from app.routers.experiments import experiment_items
    from tests.support import add_dataset_row

    upgrade_to_head(database_url)
    dataset_id = add_dataset_row(database_url)
    # (status, budget label, seed, metrics) of each experiment's runs, in the order made.
    sweeps = [
        [("succeeded", "10%", 0, {"test_top1": 0.8}),
         ("succeeded", "50%", 0, {"test_top1": 0.91, "pseudo_label_acc": 0.7}),
         ("failed", "50%", 1, {"test_top1": 0.99}),  # not a model to take
         ("succeeded", "50%", 1, {"test_top1": 0.91}),  # tied: the first made stays
         ("succeeded", "all", 0, {}),  # recorded without its score
         ("running", "all", 1, {})],
        [("queued", "10%", 0, {}), ("cancelled", "10%", 1, {"test_top1": 0.5})],
        [("succeeded", "all", 2, {"test_top1": 1, "confusion_matrix": [[2, 0], [0, 2]]})],
    ]
    run_ids = []
    with session_scope(database_url) as session:
        for runs in sweeps:
            experiment = Experiment(dataset_id=dataset_id, backbone="b", methods=["self-tuning"],
                                    budgets=[0.1], seeds=[0], preset="quick")
            session.add(experiment)
            session.flush()
            made = [Run(experiment_id=experiment.id, dataset_id=dataset_id, method="self-tuning",
                        budget=0.1, budget_label=label, seed=seed, status=status,
                        metrics=metrics)
                    for status, label, seed, metrics in runs]
            session.add_all(made)
            session.flush()
            run_ids.append([run.id for run in made])
    live = get_redis(redis_url)
    with session_scope(database_url) as session:
        def best_runs(*where) -> list:
            return [item.best_run for item in experiment_items(session, live, *where)[1]]

        listed, on_dataset, paged = (best_runs(None, None, 0), best_runs(dataset_id, None, 0),
                                     best_runs(None, 1, 1))
    expected = [  # newest first
        {"id": run_ids[2][0], "method": "self-tuning", "budget_label": "all", "seed": 2,
         "test_top1": 1.0},
        None,
        {"id": run_ids[0][1], "method": "self-tuning", "budget_label": "50%", "seed": 0,
         "test_top1": 0.91},
    ]
    assert [best and best.model_dump() for best in listed] == expected
    assert on_dataset == listed and paged == listed[1:2]


def _queries_in_a_forked_child(url: str, results) -> None:
    try:
        for _ in range(8):  # psycopg prepares a statement from its fifth run on
            with session_scope(url) as session:
                session.scalar(select(sa.func.count()).select_from(Run))
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the child reports what went wrong
        results.put(f"{type(exc).__name__}: {exc}")


def test_forked_processes_open_connections_of_their_own(database_url):
    """A Celery worker's pool processes are forked from its main process, which has used the
    database (the data directory's claim, each message's check): on PostgreSQL they shared
    its open connection, one server session, and from the second on failed with "prepared
    statement "_pg3_0" already exists" (runs failed to start, or stayed running once
    trained). Each forked process now connects anew, and the parent's connection stays
    good."""
    import multiprocessing

    upgrade_to_head(database_url)
    with session_scope(database_url) as session:
        session.scalar(select(sa.func.count()).select_from(Run))
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    for _ in range(3):
        child = fork.Process(target=_queries_in_a_forked_child, args=(database_url, results))
        child.start()
        child.join(60)
        assert child.exitcode == 0
    assert [results.get(timeout=10) for _ in range(3)] == ["ok"] * 3
    with session_scope(database_url) as session:
        assert session.scalar(select(sa.func.count()).select_from(Run)) == 0
