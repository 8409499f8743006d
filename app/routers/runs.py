"""REST for runs: status and metrics, the live feed, cancel, and the downloads."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session

from app.config import MISSED_HEARTBEATS, Settings
from app.confusion import sparse_confusion
from app.db import session_scope
from app.deps import TOKEN_RESPONSES, DbDep, LastEventId, RedisDep, RunId, SettingsDep
from app.events import Outcome, event_stream_response
from app.experiments import (
    as_utc,
    cancel_runs,
    eta_seconds,
    hold_weight_source,
    is_finishing,
    is_terminal,
    queue_position,
    unprocessable,
)
from app.ingest import IngestError
from app.live import (
    FEED_POSITION_HEADER,
    FEED_POSITION_OUT,
    ended,
    feed_position,
    publish_status,
    run_stream_key,
    timestamp,
)
from app.model_onnx import onnx_file
from app.models import (
    CONFUSION_KEYS,
    DENSE_CONFUSION,
    MAX_ID,
    SPARSE_CONFUSION,
    Artifact,
    Dataset,
    Run,
    RunMetric,
    utcnow,
)
from app.reaper import REQUEUEABLE, requeue
from app.responses import (
    FILE_DELETED,
    READ_ONLY,
    csv_download,
    files_tag,
    send_file,
    send_temporary_file,
    shortened,
)
from app.routers.datasets import MULTIPART_ANSWERS, multipart_body
from app.schemas import (
    CONFUSION_FORMS,
    CSV_NOT_MODIFIED,
    ERROR_LINE_MAX,
    ArtifactOut,
    ClassProbability,
    ErrorOut,
    MetricPoint,
    RunMetricsOut,
    RunOut,
    RunSummary,
    TriedImage,
    TriedOut,
    feed_events_description,
)
from app.try_model import (
    MAX_BODY_BYTES,
    MAX_IMAGES,
    TOP_DEFAULT,
    TOP_MAX,
    label_images,
    receive_images,
)
from worker.selftuning.files import (
    CONFIG_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    TEST_PREDICTIONS_FILE,
    TRAINING_FILE,
    checkpoint_path,
    read_csv,
    temporary_path,
)

router = APIRouter(prefix="/api/runs", tags=["runs"])

CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, TRAINING_FILE)
DOWNLOADABLE = CHECKPOINT_FILES + (PREDICTIONS_FILE, TEST_PREDICTIONS_FILE)
def sse_responses(experiment: bool) -> dict:
    """A run's (or an experiment's) feed's answers."""
    return {200: {"content": {"text/event-stream": {}},
                  "description": feed_events_description(experiment)},
            204: {"description": "the Last-Event-ID sent was the end of a feed that is over: "
                                 "nothing more will come (an EventSource stops)"}}
NO_RUN = {404: {"model": ErrorOut, "description": "no such run"}}
FileName = Annotated[str, PathParam(description="one of " + ", ".join(DOWNLOADABLE),
                                    examples=list(DOWNLOADABLE))]


def file_responses(*media_types: str) -> dict:
    """What a download may answer besides the whole file (and a HEAD, the same headers)."""
    return {
        200: {"content": {media_type: {} for media_type in media_types}},
        206: {"description": "the part a `Range: bytes=...` asked for"},
        304: {"description": "not modified: `If-None-Match` holds this file's ETag"},
        404: {"model": ErrorOut, "description": "no such run, or it has not exported the file "
              "(it has not finished)"},
        416: {"description": "the byte range asked for lies outside the file"},
    }


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(404, detail=f"run {run_id} does not exist")
    return run


def error_line(error: str | None) -> str | None:
    """A run's error in one line: its first, cut at ERROR_LINE_MAX characters (the rest of a
    failure is where it came from, a traceback)."""
    line = next(iter((error or "").strip().splitlines()), "").strip()
    return shortened(line, ERROR_LINE_MAX) or None


def run_summary(run: Run, queue_position: int | None = None,
                live_top1: float | None = None) -> RunSummary:
    return RunSummary(
        id=run.id, experiment_id=run.experiment_id, method=run.method, budget=run.budget,
        budget_label=run.budget_label, seed=run.seed, status=run.status, step=run.step,
        total_steps=run.total_steps, test_top1=run.metrics.get("test_top1"),
        live_top1=live_top1,
        created_at=as_utc(run.created_at), started_at=as_utc(run.started_at),
        finished_at=as_utc(run.finished_at), queue_position=queue_position,
        error_line=error_line(run.error),
    )


def silent_seconds(run: Run, settings: Settings) -> float | None:
    """How long a running run's worker has said nothing, once that is longer than three of
    its heartbeats: a worker that died keeps its run "running" until the reaper notices
    (`stale_after_s`), and the page should not look as if all were well meanwhile."""
    if run.status != "running" or run.heartbeat_at is None:
        return None
    silent = (utcnow() - as_utc(run.heartbeat_at)).total_seconds()
    return round(silent, 1) if silent > MISSED_HEARTBEATS * settings.heartbeat_interval_s else None


# The forms of a finished run's confusion matrix (`?confusion=`): the matrix holds classes²
# numbers (50 MB of JSON at 5,000 classes, seconds to send and to parse), while what a reader
# looks at, the run page included, is the diagonal, each class's total and the few cells off
# the diagonal that are not 0 (at most one a test image).
ConfusionForm = Literal["dense", "sparse", "none"]
Confusion = Annotated[ConfusionForm, Query(description=CONFUSION_FORMS)]


def answer_metrics(run: Run, confusion: ConfusionForm) -> dict[str, Any]:
    """The run's final metrics with its confusion matrix in the form asked for."""
    if confusion == "none":
        # Without reading `details`, which holds the matrix only; a run recorded before it
        # had a column of its own keeps it in `metrics`.
        return {key: value for key, value in run.metrics.items() if key not in CONFUSION_KEYS}
    if confusion == "dense":
        return run.all_metrics()
    # The run keeps the matrix sparse: as it is, unless an older version recorded it dense.
    metrics = run.stored_metrics()
    if DENSE_CONFUSION in metrics:
        metrics[SPARSE_CONFUSION] = sparse_confusion(metrics.pop(DENSE_CONFUSION))
    return metrics


@router.get("/{run_id}", response_model=RunOut, responses=NO_RUN)
def read_run(run_id: RunId, session: DbDep, settings: SettingsDep,
             confusion: Confusion = "dense"):
    run = get_run(session, run_id)
    return RunOut(
        **run_summary(run, queue_position(session, run)).model_dump(),
        dataset_id=run.dataset_id, config=run.config, metrics=answer_metrics(run, confusion),
        worker=run.worker, device=run.device, error=run.error, attempts=run.attempts,
        heartbeat_at=as_utc(run.heartbeat_at), images_per_s=run.images_per_s,
        eta_s=eta_seconds(run, session.get(Dataset, run.dataset_id)),
        silent_s=silent_seconds(run, settings),
        cancel_requested=run.cancel_requested,
        resumable=checkpoint_path(settings.runs_dir / str(run.id)).is_file(),
        artifacts=[
            ArtifactOut(name=a.name, size_bytes=a.size_bytes, sha256=a.sha256,
                        url=f"/api/runs/{run.id}/files/{a.name}")
            for a in run.artifacts if a.name in DOWNLOADABLE
        ],
    )


# A page of a run's record: a paper-length run holds 110,000 points (23 MB in one answer).
METRICS_PAGE_MAX = 10_000
METRICS_CURSOR = re.compile(r"([0-9]{1,10}):([0-9]{1,10})")
MetricsLimit = Annotated[int | None, Query(
    ge=1, le=METRICS_PAGE_MAX, description="read a page of at most this many points, "
    "in the same order (without `limit` and `after`: every point at once)")]
MetricsAfter = Annotated[str | None, Query(
    description="where the page starts: after the point this cursor (`<step>:<id>`) names; "
    "take it from the `next` of the page before, or give `<step>:0` to start at the first "
    "point of a step (a client that has read the record up to a step reads on from there: "
    "that step's points again, then those recorded since). A page of "
    f"{METRICS_PAGE_MAX:,} points unless `limit` says less", examples=["1200:5531"])]


def metrics_cursor(after: str) -> tuple[int, int]:
    """The (step, id) of the point a page starts after, or a 422."""
    match = METRICS_CURSOR.fullmatch(after)
    if match is None or max(int(match[1]), int(match[2])) > MAX_ID:
        raise unprocessable(
            "after", "not a cursor: give the `next` of the page before (`after=<step>:<id>`, "
            "e.g. `after=1200:5531`), or leave `after` out to start at the first point",
            where="query")
    return int(match[1]), int(match[2])


def points_after(run_id: int, cursor: tuple[int, int] | None) -> Select[tuple[RunMetric]]:
    """A run's recorded points in their order, after the point at `cursor` (step, id) if
    given: in SQL, on the index of (run_id, step, id), so no page reads the ones before."""
    query = (select(RunMetric).where(RunMetric.run_id == run_id)
             .order_by(RunMetric.step, RunMetric.id))
    if cursor is not None:
        query = query.where(tuple_(RunMetric.step, RunMetric.id) > tuple_(*cursor))
    return query


def metric_point(row: RunMetric) -> MetricPoint:
    return MetricPoint(step=row.step, kind=row.kind, values=row.values)


@router.get("/{run_id}/metrics", response_model=RunMetricsOut, response_model_exclude_unset=True,
            responses=NO_RUN)
def read_metrics(run_id: RunId, session: DbDep, response: Response,
                 limit: MetricsLimit = None, after: MetricsAfter = None):
    """The recorded time series: progress points (losses, lr, images/s) and evaluations, in
    the order of their step, then of their recording. With `limit` (or `after`), a page of
    them and in `next` the address of the page after it (null on the last; also a Link
    header), read while the run trains: the cursor is the last point's step and id, and a
    run records its new points at later steps (a resumed run keeps the points of the steps
    it repeats as first recorded), so they come in a later page."""
    cursor = None if after is None else metrics_cursor(after)
    get_run(session, run_id)
    query = points_after(run_id, cursor)
    if limit is None and cursor is None:  # as before paging: all of them, and no `next`
        return RunMetricsOut(run_id=run_id,
                             points=[metric_point(r) for r in session.scalars(query)])
    size = limit or METRICS_PAGE_MAX
    rows = list(session.scalars(query.limit(size + 1)))  # one more: is there a next page?
    next_page = None
    if len(rows) > size:
        last = rows[size - 1]
        next_page = f"/api/runs/{run_id}/metrics?limit={size}&after={last.step}:{last.id}"
        response.headers["Link"] = f'<{next_page}>; rel="next"'
    return RunMetricsOut(run_id=run_id, points=[metric_point(r) for r in rows[:size]],
                         next=next_page)


@router.post("/{run_id}/cancel", response_model=RunOut, responses={
    **NO_RUN, 409: {"model": ErrorOut, "description": "the run already ended, or has trained "
                    "every step and is scoring and exporting its model"}})
def cancel_run(run_id: RunId, session: DbDep, settings: SettingsDep, live: RedisDep):
    """A queued run ends at once; a running one stops within about one iteration. A run past
    its last training step (scoring and exporting) is not stopped: a 409 says so."""
    run = get_run(session, run_id)
    _refuse_cancel_of_ended(run)
    if not cancel_runs(session, live, [run]):
        # Its worker recorded the last step (or the run ended) after it was read above.
        _refuse_cancel_of_ended(get_run(session, run_id))
    return read_run(run_id, session, settings)


def _refuse_cancel_of_ended(run: Run) -> None:
    """A 409 for a run a cancel no longer stops: ended, or past its last training step with
    no cancel asked before (one asked before stops it there: its worker checks once more)."""
    if is_terminal(run.status):
        raise HTTPException(409, detail=f"run {run.id} already ended ({run.status})")
    if is_finishing(run) and not run.cancel_requested:
        raise HTTPException(
            409, detail=f"run {run.id} has trained all {run.total_steps} steps and is scoring "
            "and exporting its model (the final evaluation reads every test and unlabeled "
            "image): it ends when that is done; delete its experiment afterwards if you do "
            "not want it")


@router.post("/{run_id}/requeue", response_model=RunOut, responses={
    200: FEED_POSITION_OUT, **NO_RUN,
    409: {"model": ErrorOut, "description": "the run is queued, running or succeeded, or the "
          "model it starts from was deleted"},
    503: {"model": ErrorOut, "description": "the queue (Redis) is not reachable: the run is "
          "stored failed with the reason; run it again once Redis is back"}})
def requeue_run(run_id: RunId, session: DbDep, settings: SettingsDep, live: RedisDep,
                response: Response):
    """Queue a lost, failed or cancelled run again; it resumes from its last training
    checkpoint (a finished run is never retrained). The `Feed-Last-Event-ID` header names
    the run's last event before the requeue: its feed read from there
    (`?last_event_id=`) tells what came since without the rest again."""
    position = feed_position(live, run_stream_key(run_id))
    if run_again(session, settings, live, run_id) is None:
        run = get_run(session, run_id)  # a 404 when it is gone
        raise HTTPException(
            409, detail=f"run {run_id} is {run.status}; only lost, failed or cancelled runs "
            "can be requeued",
        )
    if position is not None:
        response.headers[FEED_POSITION_HEADER] = position
    return read_run(run_id, session, settings)


def run_again(session: Session, settings: Settings, live: redis.Redis, run_id: int
              ) -> Run | None:
    """Queue a lost, failed or cancelled run again at a person's request (`requeue`) and tell
    its pages; None when it is not one of those. A 404 when it is gone, a 409 when the model
    it starts from was deleted, a 503 when the queue does not take it (it is then failed)."""
    run = get_run(session, run_id)
    if run.status in REQUEUEABLE and (
            missing := hold_weight_source(session, settings, run.config.get("backbone", ""))):
        session.rollback()
        raise HTTPException(409, detail=f"run {run_id} cannot run again: {missing}; start a "
                            "new experiment from another backbone")
    run = requeue(session, live, run_id, by_person=True)
    if run is not None:
        publish_status(live, run)
    return run


# Recorded points read at a time to retell the feed of a run whose stream is gone.
FEED_PAGE = 5_000


def run_outcome(database_url: str, run_id: int) -> Outcome:
    """Whether the run's feed is over, its record (read when it is retold), its end event."""
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        if run is None:  # deleted while watched: nothing more will come
            return Outcome(True)
        if not is_terminal(run.status):
            return Outcome(False)
        history = recorded_events(database_url, run_id, run.total_steps)
        return Outcome(True, history, ended(run))


def recorded_events(database_url: str, run_id: int,
                    total_steps: int) -> Iterator[list[dict[str, Any]]]:
    """The run's recorded points as the worker sent them (app.schemas.FEED_EVENTS), FEED_PAGE
    at a time, each page read in a session of its own when the one before has been sent."""
    cursor = None
    while True:
        with session_scope(database_url) as session:
            rows = session.scalars(points_after(run_id, cursor).limit(FEED_PAGE)).all()
            events = [{"type": m.kind, "run_id": run_id, "time": timestamp(m.created_at),
                       "step": m.step, "total_steps": total_steps, **m.values} for m in rows]
            cursor = (rows[-1].step, rows[-1].id) if rows else None
        if events:
            yield events
        if len(events) < FEED_PAGE:
            return


@router.get("/{run_id}/events", responses={**sse_responses(False), **NO_RUN},
            response_class=StreamingResponse)
async def run_events(run_id: RunId, request: Request, settings: SettingsDep,
                     last_event_id: LastEventId = None):
    """Live events of a run (Server-Sent Events). Reconnect with `Last-Event-ID` (or
    `?last_event_id=`) to get what was missed; heartbeats keep the connection open; the `end`
    event is the last one. A run that was run again (requeue) replays the end of each earlier
    try as `earlier_end`, followed by the new try's events. Redis keeps a run's newest events
    only (`SELFTUNE_EVENT_STREAM_MAXLEN`): a feed that would skip some it trimmed (read from
    the start of a long run, or resumed after an event trimmed since) first says so
    (`dropped`); /api/runs/{id}/metrics has every recorded point."""
    def check_exists() -> None:
        with session_scope(settings.sqlalchemy_url) as session:
            get_run(session, run_id)

    # Off the event loop: thousands of feeds opening at once held every other request.
    await run_in_threadpool(check_exists)

    return await event_stream_response(request, run_stream_key(run_id),
                                       partial(run_outcome, settings.sqlalchemy_url, run_id),
                                       settings.sse_heartbeat_s,
                                       earlier_ends=True, maxlen=settings.event_stream_maxlen,
                                       record=f"/api/runs/{run_id}/metrics",
                                       last_event_id=last_event_id)


# --- downloads ---------------------------------------------------------------------------


def artifact_path(settings: Settings, session: Session, run_id: int, name: str) -> Path:
    """The file of a recorded artifact, resolved strictly inside the data directory."""
    run = get_run(session, run_id)
    artifact = session.scalar(
        select(Artifact).where(Artifact.run_id == run_id, Artifact.name == name)
    )
    if artifact is None:
        state = "has not finished" if not is_terminal(run.status) else f"ended {run.status}"
        raise HTTPException(404, detail=f"run {run_id} has no {name} (the run {state})")
    root = settings.data_dir.resolve()
    path = (root / artifact.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(404, detail=f"{name} of run {run_id} is missing on disk")
    return path


# Downloads answer HEAD too (download managers and `wget --spider` ask it first).
@router.get("/{run_id}/files/{name}", response_class=FileResponse,
            responses=file_responses("application/octet-stream", "application/json",
                                     "text/csv"))
@router.head("/{run_id}/files/{name}", include_in_schema=False)
def download_file(run_id: RunId, name: FileName, request: Request, session: DbDep,
                  settings: SettingsDep):
    """One exported file: model.safetensors, config.json, training.json, predictions.csv (the
    unlabeled images) or test_predictions.json (each test image's `image_id`, `path` as
    uploaded, `label` and the exported model's `predicted` class). Saved by a browser as
    `run-<id>-<name>`, as the other downloads of a run are: two runs' files would be one
    name in a downloads folder (`curl -O` keeps the address's name)."""
    if name not in DOWNLOADABLE:
        raise HTTPException(404, detail=f"no file {name!r}; files are {list(DOWNLOADABLE)}")
    return send_file(request, artifact_path(settings, session, run_id, name),
                     f"run-{run_id}-{name}")


@router.get("/{run_id}/checkpoint", response_class=FileResponse,
            responses=file_responses("application/zip"))
@router.head("/{run_id}/checkpoint", include_in_schema=False)
def download_checkpoint(run_id: RunId, request: Request, session: DbDep, settings: SettingsDep):
    """A zip of model.safetensors, config.json and training.json: a plain timm model."""
    paths = [artifact_path(settings, session, run_id, name) for name in CHECKPOINT_FILES]
    bundle = paths[0].parent / f"run-{run_id}-checkpoint.zip"
    if not bundle.exists():
        # Each request zips into a file of its own and links it into place unless another
        # got there first: requests arriving together never write into one file, none
        # serves a half-written zip, and all serve the one that stays (one ETag; a rename
        # over it gave each request the tag of its own file).
        temp = temporary_path(bundle, one_of_several=True)
        try:
            write_checkpoint_zip(paths, temp)
            try:
                os.link(temp, bundle)
            except FileExistsError:
                pass  # another request's zip is in place: this one serves it too
            except FileNotFoundError:  # the run's folder deleted meanwhile: a 404 below
                raise
            except OSError:  # a file system without hard links
                temp.replace(bundle)
        except FileNotFoundError:  # the run deleted while zipping or linking
            raise HTTPException(404, detail=FILE_DELETED) from None
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            # The run's folder cannot be written (a read-only mount, say): this request's
            # own zip in the temp folder, deleted once sent.
            return send_checkpoint_zip_once(request, paths, bundle.name)
        finally:
            if temp.exists():  # (on a read-only mount, unlinking even a missing file fails)
                temp.unlink(missing_ok=True)
    return send_file(request, bundle, bundle.name, "application/zip")


@router.get("/{run_id}/model.onnx", response_class=FileResponse, responses={
    **file_responses("application/octet-stream"),
    409: {"model": ErrorOut, "description": "the run has not succeeded, or its model does "
          "not load or convert (an architecture with an operation ONNX lacks)"}})
@router.head("/{run_id}/model.onnx", include_in_schema=False)
def download_onnx(run_id: RunId, request: Request, session: DbDep, settings: SettingsDep
                  ) -> Response:
    """The run's model as ONNX (opset 17), for serving without PyTorch: input `pixels`
    (float32, batch x 3 x the input size of config.json's pretrained_cfg, normalised by its
    mean and std), output `logits` in the order of `label_names`; both are also in the file's
    metadata. Made on the first download (seconds), then kept beside the model."""
    folder = model_folder(session, settings, run_id)
    # Made for a request alone where the run's folder cannot be written: tagged by the model
    # it is made from, so a download resumed with a Range goes on with the same bytes.
    etag = files_tag([folder / MODEL_FILE])
    try:
        path, temporary = onnx_file(folder)
    except FileNotFoundError:
        raise HTTPException(404, detail=FILE_DELETED) from None
    except ValueError as exc:
        raise HTTPException(409, detail=f"run {run_id}'s model cannot be given as ONNX: {exc}"
                            ) from None
    name = f"run-{run_id}-model.onnx"
    if temporary:
        return send_temporary_file(request, path, name, "application/octet-stream", etag)
    return send_file(request, path, name, "application/octet-stream")


def write_checkpoint_zip(paths: list[Path], target: Path) -> None:
    with zipfile.ZipFile(target, "w") as archive:
        for path in paths:
            compression = zipfile.ZIP_STORED if path.suffix == ".safetensors" else (
                zipfile.ZIP_DEFLATED
            )
            archive.write(path, arcname=path.name, compress_type=compression)


def send_checkpoint_zip_once(request: Request, paths: list[Path], filename: str) -> Response:
    """The checkpoint zip built for one request in the temp folder, tagged by the files in it
    (so a download resumed with a Range gets the same bytes from the next request's zip)."""
    etag = files_tag(paths)
    handle, name = tempfile.mkstemp(prefix="selftune-checkpoint-", suffix=".zip")
    os.close(handle)
    temp = Path(name)
    try:
        write_checkpoint_zip(paths, temp)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, FileNotFoundError):  # the run deleted while zipping
            raise HTTPException(404, detail=FILE_DELETED) from None
        raise
    return send_temporary_file(request, temp, filename, "application/zip", etag)


@router.get("/{run_id}/predictions.csv", response_class=FileResponse,
            responses=file_responses("text/csv"))
@router.head("/{run_id}/predictions.csv", include_in_schema=False)
def download_predictions(run_id: RunId, request: Request, session: DbDep, settings: SettingsDep):
    """The final model's prediction for every unlabeled image (label, confidence, margin)."""
    path = artifact_path(settings, session, run_id, PREDICTIONS_FILE)
    return send_file(request, path, f"run-{run_id}-predictions.csv", "text/csv")


def label_next_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The predictions' columns, and their rows from least to most certain."""
    try:
        columns, rows = read_csv(path)
    except FileNotFoundError:  # the run deleted since its artifact was looked up
        raise HTTPException(404, detail=FILE_DELETED) from None
    rows.sort(key=rows_order)
    return columns, rows


def spread_over_classes(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """`rows` (least certain first) taken in rounds over their predicted labels: each round
    the next least certain image of every class that has one left, least certain first."""
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    spread = []
    for depth in range(max(map(len, by_label.values()), default=0)):
        spread.extend(sorted((queue[depth] for queue in by_label.values() if depth < len(queue)),
                             key=rows_order))
    return spread


def rows_order(row: dict[str, str]) -> tuple[float, float]:
    """Least certain first: the smallest margin between the top two classes, then the lowest
    confidence."""
    return float(row["margin"]), float(row["confidence"])


@router.get("/{run_id}/label-next.csv", response_class=Response, responses={
    200: {"content": {"text/csv": {}}}, 304: CSV_NOT_MODIFIED,
    404: file_responses("text/csv")[404]})
@router.head("/{run_id}/label-next.csv", include_in_schema=False)
def download_label_next(
    run_id: RunId, request: Request, session: DbDep, settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=0, description="at most this many rows")] = None,
    include_withheld: bool = False,
    order: Annotated[Literal["margin", "spread"], Query(
        description="`margin`: the least certain first, whatever the model predicts; "
        "`spread`: the least certain of each predicted class in turn (the least certain of "
        "each class, then the second of each, ...), so that the first rows are not all of "
        "the classes the model confuses most")] = "margin",
):
    """Unlabeled images ranked by uncertainty (smallest top-1/top-2 margin first): the ones
    whose labels would teach the model most. Images whose labels you gave but the budget
    withheld are left out unless `include_withheld=true`."""
    columns, rows = label_next_rows(artifact_path(settings, session, run_id, PREDICTIONS_FILE))
    if not include_withheld:
        rows = [row for row in rows if not row.get("hidden_label")]
    if order == "spread":
        rows = spread_over_classes(rows)
    if limit is not None:
        rows = rows[:limit]
    # The two lists in one folder must not collide ("run-7-label-next (1).csv").
    return csv_download(
        request, [{"rank": rank, **row} for rank, row in enumerate(rows, start=1)],
        ["rank", *columns],
        f"run-{run_id}-label-next{'-with-withheld' if include_withheld else ''}"
        f"{'-spread' if order == 'spread' else ''}.csv")


# --- trying the model ---------------------------------------------------------------------


REASONS_SAID = 5  # of the files of a form none of which could be labeled
# Forms of images taken at once: each is held in memory (up to 64 MiB) until it is labeled,
# one labeling at a time (app.try_model.Models); the next ones are asked to come back.
TRYING_AT_ONCE = 4
TRYING = asyncio.Semaphore(TRYING_AT_ONCE)


class TryForm(BaseModel):
    """The multipart form of `POST /api/runs/{id}/predict` (read as a stream)."""

    file: list[Annotated[bytes, Field(json_schema_extra={"format": "binary"})]] = Field(
        description=f"1 to {MAX_IMAGES} images (JPEG, PNG, WebP, BMP, TIFF or GIF), each in a "
        f"field named `file`, {MAX_BODY_BYTES // 1024**2} MiB in all")


@router.post("/{run_id}/predict", response_model=TriedOut, responses={
    **NO_RUN, 400: MULTIPART_ANSWERS[400],
    409: {"model": ErrorOut, "description": "the run has no model: it has not succeeded, or "
          "its export does not load"},
    413: {"model": ErrorOut, "description": f"over {MAX_BODY_BYTES // 1024**2} MiB in all"},
    415: {"model": ErrorOut, "description": "not multipart"},
    422: {"model": ErrorOut, "description": f"no image, more than {MAX_IMAGES}, none "
          "that is an image this app reads, or a form field other than `file`"},
    # Besides the token's 429 (TOKEN_RESPONSES), which this one replaces in the schema.
    429: {**TOKEN_RESPONSES[429], "description": f"{TRYING_AT_ONCE} forms of images are "
          "being labeled already, or " + TOKEN_RESPONSES[429]["description"]}},
    openapi_extra=multipart_body(TryForm))
async def try_model(run_id: RunId, request: Request, session: DbDep, settings: SettingsDep,
                    top: Annotated[int, Query(ge=1, le=TOP_MAX, description="the most likely "
                                              "classes answered for each image")] = TOP_DEFAULT
                    ) -> TriedOut:
    """Label a few images of your own with the run's model, as plain timm loads its export
    (the command line's `predict`, for a folder of them): each image's most likely classes
    with their probabilities, or why it could not be read. The images are not kept; they
    are labeled on the web server's CPU."""
    folder = await run_in_threadpool(model_folder, session, settings, run_id)
    if TRYING.locked():
        raise HTTPException(429, detail=f"{TRYING_AT_ONCE} forms of images are being labeled "
                            "already: try again in a moment", headers={"Retry-After": "2"})
    async with TRYING:
        try:
            images = await receive_images(request.headers, request.stream())
        except IngestError as exc:
            raise HTTPException(exc.status_code, exc.detail) from None
        try:
            labeled = await run_in_threadpool(label_images, folder, images,
                                              settings.max_image_pixels, top)
        except FileNotFoundError:  # the run deleted meanwhile
            raise HTTPException(404, detail=FILE_DELETED) from None
        except ValueError as exc:
            raise HTTPException(409, detail=f"run {run_id}'s model does not load: {exc}"
                                ) from None
    if not labeled.top:
        reasons = "; ".join(f"{images[index].name}: {reason}"
                            for index, reason in list(labeled.skipped.items())[:REASONS_SAID])
        more = len(images) - REASONS_SAID
        raise HTTPException(422, detail=f"none of the {len(images)} file"
                            f"{'' if len(images) == 1 else 's'} is an image this app can "
                            f"label: {reasons}" + (f"; and {more} more" if more > 0 else ""))
    return TriedOut(run_id=run_id, seconds=round(labeled.seconds, 3), images=[
        tried_image(index, image.name, labeled.top.get(index), labeled.skipped.get(index), top)
        for index, image in enumerate(images)])


def model_folder(session: Session, settings: Settings, run_id: int) -> Path:
    """The folder of a succeeded run's exported model: a 404 for no such run, a 409 for one
    that has not succeeded."""
    run = get_run(session, run_id)
    if run.status != "succeeded":
        raise HTTPException(409, detail=f"run {run_id} has no model: it is "
                            f"{run.status}; a run exports its model when it succeeds")
    model = artifact_path(settings, session, run_id, MODEL_FILE)
    if artifact_path(settings, session, run_id, CONFIG_FILE).parent != model.parent:
        raise HTTPException(404, detail=f"run {run_id}'s {CONFIG_FILE} is not beside its "
                            f"{MODEL_FILE}")
    return model.parent


def tried_image(index: int, name: str, classes: list[tuple[str, float]] | None,
                skipped: str | None, shown: int) -> TriedImage:
    """An image's answer: its most likely classes (at least two, for the margin, of which
    `shown` are answered) or why it was skipped."""
    if classes is None:
        return TriedImage(index=index, name=name, label=None, confidence=None, margin=None,
                          top=[], skipped=skipped)
    (label, confidence), *others = classes
    return TriedImage(index=index, name=name, label=label, confidence=confidence,
                      margin=confidence - others[0][1] if others else confidence, skipped=None,
                      top=[ClassProbability(label=label, probability=probability)
                           for label, probability in classes[:shown]])
