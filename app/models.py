"""Database models: datasets and their images, experiments, runs, run metrics and artifacts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.confusion import dense_confusion, sparse_confusion

# SQLite would otherwise give a deleted row's id to the next row (migration 0004).
NEVER_REUSE_IDS = {"sqlite_autoincrement": True}
# The largest id a row can have: PostgreSQL's integer columns stop there (SQLite at 2**63).
MAX_ID = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Installation(Base):
    """One row: the random id of this database, which its data directory records
    (`app.db.claim_data_dir`)."""

    __tablename__ = "installation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    database_id: Mapped[str] = mapped_column(String(32))


class Dataset(Base):
    """An uploaded, verified image collection stored under `data_dir/datasets/<storage_key>`."""

    __tablename__ = "datasets"
    __table_args__ = (NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    storage_key: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    fingerprint: Mapped[str] = mapped_column(String(64))
    # Class names in natural sort order; position = class index.
    class_names: Mapped[list[Any]] = mapped_column(default=list)
    # Per class name: {"train": n, "test": n}.
    class_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    unlabeled_count: Mapped[int] = mapped_column(default=0)
    image_count: Mapped[int] = mapped_column(default=0)
    # "uploaded" when the archive had a test/ (or val/) split, else "holdout".
    test_source: Mapped[str] = mapped_column(String(16), default="holdout")
    # The first MAX_SKIPPED_KEPT files the upload skipped, with why (read only when asked for:
    # lists count with `skipped_count`).
    skipped: Mapped[list[Any]] = mapped_column(default=list, deferred=True)
    skipped_count: Mapped[int] = mapped_column(default=0, server_default="0")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # The dataset this one was made from by adding labels (app.add_labels), and how many it
    # added. The id stays once that dataset is deleted: ids are never given again.
    derived_from_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    labels_added: Mapped[int] = mapped_column(default=0, server_default="0")
    # What the upload looked wrong in, known only while its archive was read (a labels.csv
    # that gives images in a class's folder another class): said with `dataset_warnings`.
    upload_warnings: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")

    images: Mapped[list[DatasetImage]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class DatasetImage(Base):
    """One stored image: its split (train/test/unlabeled) and class index where labeled."""

    __tablename__ = "dataset_images"
    __table_args__ = (Index("ix_dataset_images_dataset_split", "dataset_id", "split"),
                      NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the dataset directory
    original_path: Mapped[str] = mapped_column(String(1024))  # as named in the archive
    split: Mapped[str] = mapped_column(String(16))  # train | test | unlabeled
    label: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(default=0)
    height: Mapped[int] = mapped_column(default=0)

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class Experiment(Base):
    """One submission: methods x budgets x seeds on a dataset, expanded into runs."""

    __tablename__ = "experiments"
    __table_args__ = (NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    backbone: Mapped[str] = mapped_column(String(200))
    methods: Mapped[list[Any]] = mapped_column(default=list)
    budgets: Mapped[list[Any]] = mapped_column(default=list)
    seeds: Mapped[list[Any]] = mapped_column(default=list)
    preset: Mapped[str] = mapped_column(String(32))
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="experiment", order_by="Run.id")


class Run(Base):
    """One training job: a method at a budget and seed. queued -> running -> terminal."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_status", "status"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    method: Mapped[str] = mapped_column(String(32))
    budget: Mapped[Any] = mapped_column(JSON)
    budget_label: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(default=0)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(200), nullable=True)
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    celery_task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What only the run's own record shows (the confusion matrix, sparse: CONFUSION_KEYS),
    # kept apart from `metrics`, which every read of an experiment loads for each of its
    # runs; loaded only when asked for.
    details: Mapped[dict[str, Any]] = mapped_column(server_default="{}", deferred=True)
    images_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    def stored_metrics(self) -> dict[str, Any]:
        """The final metrics as the run keeps them: `metrics` with `details`, the confusion
        matrix sparse, or dense where an older version recorded it (`CONFUSION_KEYS`)."""
        return {**(self.metrics or {}), **(self.details or {})}

    def all_metrics(self) -> dict[str, Any]:
        """The final metrics as the engine reported them, the confusion matrix whole."""
        return with_dense_confusion(self.stored_metrics())

    experiment: Mapped[Experiment] = relationship(back_populates="runs")
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )


# The confusion matrix as the engine reports it (dense), and as Run.details keeps it since
# migration 0010 (sparse, app.confusion): dense, it was 75 MB of JSON in one row at 5,000
# classes, parsed again (1.0-1.4 s) on every read of the run's record. A row may still hold
# the dense key: a run recorded before 0008 (in `metrics`) or by an older worker.
DENSE_CONFUSION = "confusion_matrix"
SPARSE_CONFUSION = "confusion_sparse"
CONFUSION_KEYS = (DENSE_CONFUSION, SPARSE_CONFUSION)


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, details) as a run keeps the engine's final metrics: the confusion matrix in
    `details`, sparse."""
    details = ({SPARSE_CONFUSION: sparse_confusion(metrics[DENSE_CONFUSION])}
               if DENSE_CONFUSION in metrics else {})
    return {key: value for key, value in metrics.items() if key != DENSE_CONFUSION}, details


def with_dense_confusion(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with a sparse confusion matrix made whole again, under the engine's key and
    in the same place, so the answer is the one the dense row gave."""
    if SPARSE_CONFUSION not in metrics:
        return metrics
    return {DENSE_CONFUSION if key == SPARSE_CONFUSION else key:
            dense_confusion(value) if key == SPARSE_CONFUSION else value
            for key, value in metrics.items()}


class RunMetric(Base):
    """One point of a run's time series (a progress or an eval event), unique per step."""

    __tablename__ = "run_metrics"
    # A run's points in their order, (step, id), which a page of them starts in (migration
    # 0009); its first column serves the lookups by run too.
    __table_args__ = (UniqueConstraint("run_id", "kind", "step", name="uq_run_metrics_point"),
                      Index("ix_run_metrics_run_step", "run_id", "step", "id"),
                      NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # progress | eval
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A file a run produced, stored under `data_dir/runs/<run id>/`."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_artifacts_run_name"),
                      NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the data directory
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship(back_populates="artifacts")
