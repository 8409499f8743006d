"""REST for experiments: start a budget sweep, list, read with its budget table, follow live,
cancel every run, queue the ended ones again, delete."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Annotated, NamedTuple

import redis
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, load_only, object_session

from app import idempotency
from app.db import session_scope
from app.deps import (
    DatasetFilter,
    DbDep,
    ExperimentId,
    LastEventId,
    PageLimit,
    PageOffset,
    RedisDep,
    SettingsDep,
    page_headers,
)
from app.events import Outcome, event_stream_response
from app.experiments import (
    GOING,
    as_utc,
    budget_labeled_counts,
    budget_table,
    cancel_runs,
    compare_budget_tables,
    create_experiment,
    delete_experiment_with_runs,
    device_warnings,
    enqueue_runs,
    experiment_status,
    experiment_warnings,
    is_terminal,
    label_estimates,
    plan_experiment,
    queue_positions,
    run_shape,
    seconds_per_step,
    tested_on,
    times_left,
    unprocessable,
)
from app.live import (
    FEED_POSITION_HEADER,
    FEED_POSITION_OUT,
    ended,
    experiment_stream_key,
    feed_position,
    live_workers,
)
from app.models import MAX_ID, Dataset, Experiment, Run, RunMetric
from app.reaper import REQUEUEABLE
from app.responses import csv_download
from app.routers.runs import error_line, run_again, run_summary, sse_responses
from app.schemas import (
    RUN_STATUSES,
    TO_GO_STATUSES,
    UNREADABLE_BODY_OUT,
    BestRunOut,
    ErrorOut,
    ExperimentCheckOut,
    ExperimentIn,
    ExperimentListItem,
    ExperimentOut,
    FieldErrorsOut,
    RenameIn,
    TimeLeft,
)
from app.trash import deleted_answer

router = APIRouter(prefix="/api/experiments", tags=["experiments"])


def get_experiment(session: Session, experiment_id: int) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise HTTPException(404, detail=f"experiment {experiment_id} does not exist")
    return experiment


def experiment_budget_table(session: Session, experiment: Experiment) -> list[dict]:
    """The experiment's results table (`budget_table`), each budget with its labeled count."""
    runs = list(experiment.runs)
    dataset = session.get(Dataset, experiment.dataset_id)
    return budget_table(runs, budget_labeled_counts(dataset, runs))


def experiment_out(experiment: Experiment, live: redis.Redis) -> ExperimentOut:
    runs = list(experiment.runs)
    session = object_session(experiment)
    dataset = session.get(Dataset, experiment.dataset_id) if session else None
    labeled = budget_labeled_counts(dataset, runs)
    positions = queue_positions(session, runs) if session else {}
    latest = latest_top1(session, runs) if session else {}
    return ExperimentOut(
        id=experiment.id,
        name=experiment.name,
        dataset_id=experiment.dataset_id,
        backbone=experiment.backbone,
        methods=experiment.methods,
        budgets=experiment.budgets,
        seeds=experiment.seeds,
        preset=experiment.preset,
        overrides=experiment.overrides,
        created_at=as_utc(experiment.created_at),
        status=experiment_status(Counter(run.status for run in runs)),
        runs=[run_summary(run, positions.get(run.id), latest.get(run.id)) for run in runs],
        budget_table=budget_table(runs, labeled),
        label_estimates=label_estimates(runs, labeled, dataset),
        time_left=queue_times_left(session, live, [experiment.id]).get(experiment.id)
        if session and any(run.status in TO_GO_STATUSES for run in runs) else None,
        warnings=experiment_warnings(dataset, runs, experiment.overrides or {}),
    )


def latest_top1(session: Session, runs: list[Run]) -> dict[int, float]:
    """Each running run's test top-1 at its latest evaluation so far (a page that follows
    the feed from where it stood when the page was made has no older evaluation to show)."""
    latest = {}
    for run in runs:
        if run.status != "running":
            continue
        values = session.scalar(
            select(RunMetric.values).where(RunMetric.run_id == run.id, RunMetric.kind == "eval")
            .order_by(RunMetric.step.desc()).limit(1))
        if values and isinstance(values.get("test_top1"), int | float):
            latest[run.id] = values["test_top1"]
    return latest


@router.post("", status_code=201, response_model=ExperimentOut, responses={
    **idempotency.keyed_answers(ExperimentOut, "experiment", "body"),
    422: {"model": FieldErrorsOut, "description": "what to fix in the body (or the "
          "Idempotency-Key, sent before with another body)"},
    503: {"model": ErrorOut, "description": "the queue (Redis) is not reachable: the runs are "
          "stored as failed, with the reason"}, **UNREADABLE_BODY_OUT})
def start_experiment(payload: ExperimentIn, response: Response, session: DbDep,
                     settings: SettingsDep, live: RedisDep,
                     idempotency_key: idempotency.IdempotencyKey = None):
    """Expand methods x budgets x seeds into runs, one Celery task each."""
    digest = idempotency.request_digest(payload.model_dump_json())
    if idempotency_key is not None:
        try:
            experiment = idempotency.made_before(
                live, idempotency_key, digest, "experiment",
                lambda made: session.get(Experiment, made))
        except idempotency.KeyRefused as exc:
            if exc.status_code == 422:
                raise unprocessable("Idempotency-Key", exc.message, "header") from None
            raise HTTPException(exc.status_code, detail=exc.message,
                                headers=exc.headers) from None
        if experiment is not None:
            idempotency.replayed(response, f"/api/experiments/{experiment.id}")
            return experiment_out(experiment, live)
    try:
        try:
            experiment = create_experiment(session, settings, payload)
            session.commit()
        except IntegrityError:  # its dataset was deleted after it was read: runs need one
            session.rollback()
            raise unprocessable("dataset_id", f"dataset {payload.dataset_id} does not exist "
                                "(it was deleted while the experiment was being created)") from None
        enqueue_runs(session, list(experiment.runs))
    except BaseException:
        if idempotency_key is not None:
            idempotency.release(live, idempotency_key)
        raise
    if idempotency_key is not None:
        idempotency.remember(live, idempotency_key, digest, experiment)
    response.headers["Location"] = f"/api/experiments/{experiment.id}"
    started = experiment_out(experiment, live)
    started.warnings += device_warnings(workers_now(live), experiment.runs)
    return started


def workers_now(live: redis.Redis) -> list[dict]:
    """The workers that answer now; none known when Redis does not answer."""
    try:
        return live_workers(live)
    except redis.RedisError:
        return []


@router.post("/check", response_model=ExperimentCheckOut, responses={
    422: {"model": FieldErrorsOut, "description": "what POST /api/experiments would refuse, "
          "in the same words"}, **UNREADABLE_BODY_OUT})
def check_experiment(payload: ExperimentIn, session: DbDep, settings: SettingsDep,
                     live: RedisDep):
    """What POST /api/experiments would make of this body, without making it: the same
    checks and refusals, the number of runs and the experiment's warnings (with runs sized
    for a GPU when every worker trains on its CPU). Nothing is stored or queued (the start
    form asks as it is filled in)."""
    dataset, experiment = plan_experiment(session, settings, payload, hold=False)
    return ExperimentCheckOut(
        runs=len(experiment.runs), backbone=experiment.backbone,
        warnings=experiment_warnings(dataset, experiment.runs, experiment.overrides or {})
        + device_warnings(workers_now(live), experiment.runs))


MOST_LISTED_IDS = 100
ListedIds = Annotated[list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None, Query(
    max_length=MOST_LISTED_IDS, description="only the experiments of these ids that exist "
    f"(`?ids=3&ids=5`, up to {MOST_LISTED_IDS}): those deleted are left out, without a 404")]


@router.get("", response_model=list[ExperimentListItem])
def list_experiments(request: Request, response: Response, session: DbDep, live: RedisDep,
                     dataset_id: DatasetFilter = None, ids: ListedIds = None,
                     limit: PageLimit = None, offset: PageOffset = 0):
    """Every experiment, newest first, or with `?dataset_id=` those on one dataset, or with
    `?ids=` those of some ids; a page of them with `limit` and `offset`."""
    total, items = experiment_items(session, live, dataset_id, limit, offset, ids)
    page_headers(request, response, total, limit, offset)
    return items


def experiment_items(session: Session, live: redis.Redis, dataset_id: int | None,
                     limit: int | None, offset: int, ids: list[int] | None = None
                     ) -> tuple[int, list[ExperimentListItem]]:
    """How many experiments there are (on one dataset, of some ids, or all), and those of one
    page."""
    where = [] if dataset_id is None else [Experiment.dataset_id == dataset_id]
    if ids is not None:
        where.append(Experiment.id.in_(ids))
    total = session.scalar(select(func.count()).select_from(Experiment).where(*where)) or 0
    experiments = list(session.scalars(
        select(Experiment).where(*where).order_by(Experiment.id.desc())
        .limit(limit).offset(offset)))
    # Counted by the database: loading every run (metrics, confusion matrices) of every
    # experiment took 2.6 s for 1,000 experiments of 12 runs.
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    best: dict[int, BestRunOut] = {}
    if experiments:
        def listed_runs(query):
            if limit is not None or offset or ids is not None:  # those experiments' runs only
                return query.where(Run.experiment_id.in_([e.id for e in experiments]))
            return query if dataset_id is None else query.where(Run.dataset_id == dataset_id)

        counting = (select(Run.experiment_id, Run.status, func.count())
                    .group_by(Run.experiment_id, Run.status))
        for experiment_id, status, count in session.execute(listed_runs(counting)):
            counts[experiment_id][status] = count
        # The one number of each succeeded run, read out of its metrics by the database.
        top1 = Run.metrics["test_top1"].as_float()
        scoring = (select(Run.experiment_id, Run.id, Run.method, Run.budget_label, Run.seed, top1)
                   .where(Run.status == "succeeded", top1.is_not(None)).order_by(Run.id))
        for experiment_id, run_id, method, label, seed, score in session.execute(
                listed_runs(scoring)):
            if experiment_id not in best or score > best[experiment_id].test_top1:
                best[experiment_id] = BestRunOut(id=run_id, method=method, budget_label=label,
                                                 seed=seed, test_top1=score)
    items = []
    for experiment in experiments:
        # In the order a run goes through them: "1 running, 2 succeeded, 1 failed".
        run_counts = {status: counts[experiment.id][status] for status in RUN_STATUSES
                      if status in counts[experiment.id]}
        items.append(ExperimentListItem(
            id=experiment.id, name=experiment.name, dataset_id=experiment.dataset_id,
            backbone=experiment.backbone, methods=experiment.methods, preset=experiment.preset,
            created_at=as_utc(experiment.created_at), status=experiment_status(run_counts),
            run_counts=run_counts, best_run=best.get(experiment.id),
        ))
    lefts = queue_times_left(session, live,
                             [item.id for item in items if item.status in GOING])
    for item in items:
        item.time_left = lefts.get(item.id)
    return total, items


# What a step's cost and a run's time left are read from (app.experiments.times_left): not
# the runs' metrics, which hold confusion matrices.
TIMING_COLUMNS = (Run.id, Run.experiment_id, Run.dataset_id, Run.method, Run.budget, Run.config,
                  Run.status, Run.step, Run.total_steps, Run.images_per_s, Run.queued_at,
                  Run.started_at, Run.finished_at)


# The runs that succeeded last, those alike (run_shape: the same method, backbone, image size
# and batches) timing a run whose experiment has not finished one of its method yet.
SIMILAR_RUNS = 200


def queue_times_left(session: Session, live: redis.Redis, experiment_ids: list[int]
                     ) -> dict[int, TimeLeft]:
    """The time left of each of these experiments with runs to go, in the queue they share
    with every other experiment's runs to go, on the workers that answer now
    (app.experiments.times_left). Reads the timings of the runs of every experiment with runs
    to go, and of the last SIMILAR_RUNS that succeeded."""
    if not experiment_ids:
        return {}
    going = select(Run.experiment_id).where(Run.status.in_(TO_GO_STATUSES))
    sweeps: defaultdict[int, list[Run]] = defaultdict(list)
    for run in session.scalars(select(Run).options(load_only(*TIMING_COLUMNS))
                               .where(Run.experiment_id.in_(going))):
        sweeps[run.experiment_id].append(run)
    dataset_ids = {sweep[0].dataset_id for sweep in sweeps.values()}
    datasets = {dataset.id: dataset for dataset in session.scalars(
        select(Dataset).where(Dataset.id.in_(dataset_ids)))}
    similar = seconds_per_step(session.scalars(
        select(Run).options(load_only(*TIMING_COLUMNS)).where(Run.status == "succeeded")
        .order_by(Run.finished_at.desc()).limit(SIMILAR_RUNS)), key=run_shape)
    lefts = times_left(sweeps, {experiment_id: datasets.get(sweep[0].dataset_id)
                                for experiment_id, sweep in sweeps.items()},
                       len(workers_now(live)), similar)
    return {experiment_id: lefts[experiment_id] for experiment_id in experiment_ids
            if experiment_id in lefts}


RUN_COLUMNS = [
    "run_id", "method", "budget_label", "labeled_count", "seed", "status", "test_top1",
    "test_mean_class_acc", "pseudo_label_acc", "train_pseudo_label_acc", "iterations",
    "step", "seconds_per_iteration", "attempts", "first_started_at", "last_queued_at",
    "finished_at", "backbone", "device", "error",
]
SUMMARY_COLUMNS = ["budget_label", "labeled_count", "method", "runs", "finished", "pending",
                   "mean_top1", "std_top1", "best"]
CSV_FILE = {200: {"content": {"text/csv": {}}}, 404: {"model": ErrorOut},
            304: {"description": "not modified: `If-None-Match` holds this table's ETag"}}


# How many experiments one comparison holds: each adds a line per method to one chart.
MOST_COMPARED = 6
ComparedIds = Annotated[list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None, Query(
    description=f"the experiments to compare, 2 to {MOST_COMPARED}: `?ids=3&ids=5`")]


class Comparison(NamedTuple):
    """Experiments side by side: each one's test split (`tested_on`), the budget labels of
    any of them and their results tables."""
    experiments: list[Experiment]
    tested_on: list[int]
    labels: list[str]
    tables: list[list[dict]]


def compared_experiments(session: Session, ids: list[int] | None) -> Comparison:
    """The experiments `ids` names (each once, in its order), the test split of each, the
    budget labels of any of them and their results tables, with the best of each budget among
    those on one test split flagged (`compare_budget_tables`); a 422 for too few or too many,
    a 404 for one that is gone."""
    chosen = list(dict.fromkeys(ids or []))
    if not 2 <= len(chosen) <= MOST_COMPARED:
        raise HTTPException(422, f"choose 2 to {MOST_COMPARED} experiments to compare: "
                                 f"{len(chosen)} chosen")
    experiments = [get_experiment(session, experiment_id) for experiment_id in chosen]
    splits = [tested_on(session, experiment.dataset_id) for experiment in experiments]
    labels, tables = compare_budget_tables(
        [experiment_budget_table(session, experiment) for experiment in experiments], splits)
    return Comparison(experiments, splits, labels, tables)


COMPARE_COLUMNS = ["experiment_id", "experiment_name", "dataset_id", "backbone",
                   *SUMMARY_COLUMNS]


@router.get("/compare.csv", response_class=Response,
            responses={**CSV_FILE, 422: {"model": ErrorOut}})
@router.head("/compare.csv", include_in_schema=False)
def download_comparison(request: Request, session: DbDep, ids: ComparedIds = None
                        ) -> Response:
    """Experiments' results tables in one, as the compare page shows them: per experiment
    (in the order asked), budget (fewest labels first) and method, the mean and sample
    standard deviation of final test top-1 over the succeeded seeds; `best` flags the best
    of each budget label across those on the same dataset."""
    experiments, _, _, tables = compared_experiments(session, ids)
    rows = [{"experiment_id": experiment.id, "experiment_name": experiment.name,
             "dataset_id": experiment.dataset_id, "backbone": experiment.backbone, **row}
            for experiment, table in zip(experiments, tables, strict=True) for row in table]
    return csv_download(request, rows, COMPARE_COLUMNS,
                        f"experiments-{'-'.join(str(e.id) for e in experiments)}-compared.csv")


@router.get("/{experiment_id}", response_model=ExperimentOut,
            responses={404: {"model": ErrorOut}})
def read_experiment(experiment_id: ExperimentId, session: DbDep, live: RedisDep):
    return experiment_out(get_experiment(session, experiment_id), live)


@router.patch("/{experiment_id}", response_model=ExperimentOut, responses={
    404: {"model": ErrorOut}, 422: {"model": FieldErrorsOut}, **UNREADABLE_BODY_OUT})
def rename_experiment(experiment_id: ExperimentId, change: RenameIn, session: DbDep,
                      live: RedisDep):
    """Give the experiment another name (its runs and results stay as they are)."""
    experiment = get_experiment(session, experiment_id)
    experiment.name = change.name
    session.commit()
    return experiment_out(experiment, live)


def run_rows(experiment: Experiment, session: Session) -> list[dict]:
    """One row per run: what it was and what it scored, scores as fractions (0-1)."""
    runs = list(experiment.runs)
    labeled = budget_labeled_counts(session.get(Dataset, experiment.dataset_id), runs)
    rows = []
    for run in runs:
        metrics = run.metrics or {}
        rows.append({
            **{key: metrics.get(key) for key in RUN_COLUMNS if key in metrics},
            "run_id": run.id, "method": run.method, "budget_label": run.budget_label,
            "labeled_count": metrics.get("labeled_count", labeled.get(run.budget_label)),
            "seed": run.seed, "status": run.status, "iterations": run.total_steps,
            "step": run.step, "attempts": run.attempts,
            # A run queued again resumes: its first start stays, its last queueing moves.
            "first_started_at": as_utc(run.started_at), "last_queued_at": as_utc(run.queued_at),
            "finished_at": as_utc(run.finished_at),
            "backbone": experiment.backbone, "device": run.device,
            "error": error_line(run.error) or "",
        })
    return rows


@router.get("/{experiment_id}/runs.csv", responses=CSV_FILE, response_class=Response)
@router.head("/{experiment_id}/runs.csv", include_in_schema=False)
def download_runs(experiment_id: ExperimentId, request: Request, session: DbDep) -> Response:
    """Every run of the experiment, one row each: method, budget, labeled count, seed,
    status, final scores (fractions: test top-1, mean per-class accuracy, the final model's
    pseudo-label accuracy on the images whose labels the budget withheld, and training's
    own), iterations, seconds per training iteration, times (UTC; a run queued again keeps
    its first start) and the first line of a failure."""
    experiment = get_experiment(session, experiment_id)
    return csv_download(request, run_rows(experiment, session), RUN_COLUMNS,
                        f"experiment-{experiment_id}-runs.csv")


@router.get("/{experiment_id}/summary.csv", responses=CSV_FILE, response_class=Response)
@router.head("/{experiment_id}/summary.csv", include_in_schema=False)
def download_summary(experiment_id: ExperimentId, request: Request, session: DbDep
                     ) -> Response:
    """The results table: per budget (fewest labels first) and method, the mean and sample
    standard deviation of final test top-1 over the succeeded seeds, and which methods are
    the best of their budget (the page's bold cells)."""
    table = experiment_budget_table(session, get_experiment(session, experiment_id))
    return csv_download(request, table, SUMMARY_COLUMNS,
                        f"experiment-{experiment_id}-summary.csv")


@router.post("/{experiment_id}/cancel", response_model=ExperimentOut,
             responses={404: {"model": ErrorOut}})
def cancel_experiment(experiment_id: ExperimentId, session: DbDep, live: RedisDep):
    """Cancel every run that has not ended: queued runs end at once, running ones stop within
    about one iteration. Runs already ended are left alone, and so are runs past their last
    training step, which score and export their model and end succeeded in moments; with
    nothing left to cancel this is a no-op that answers 200 with the experiment as it is."""
    experiment = get_experiment(session, experiment_id)
    cancel_runs(session, live, experiment.runs)
    return experiment_out(experiment, live)


@router.post("/{experiment_id}/requeue", response_model=ExperimentOut, responses={
    200: FEED_POSITION_OUT, 404: {"model": ErrorOut},
    409: {"model": ErrorOut, "description": "the model its runs start from was deleted: "
          "nothing is queued"},
    503: {"model": ErrorOut, "description": "the queue (Redis) is not reachable: the run it "
          "could not queue is stored failed with the reason, and those after it stay as they "
          "were; run them again once Redis is back"}})
def requeue_experiment(experiment_id: ExperimentId, session: DbDep, settings: SettingsDep,
                       live: RedisDep, response: Response):
    """Queue every lost, failed or cancelled run of the experiment again, in run order; each
    resumes from its last training checkpoint, as a run's own requeue does. Runs queued,
    running or succeeded are left alone: with none to run again this is a no-op that answers
    200 with the experiment as it is. The `Feed-Last-Event-ID` header names the
    experiment's last event before the requeue: its feed read from there
    (`?last_event_id=`) tells what came since without the rest again."""
    experiment = get_experiment(session, experiment_id)
    position = feed_position(live, experiment_stream_key(experiment_id))
    for run_id in sorted(run.id for run in experiment.runs if run.status in REQUEUEABLE):
        run_again(session, settings, live, run_id)  # None: queued since by someone else
    if position is not None:
        response.headers[FEED_POSITION_HEADER] = position
    return experiment_out(get_experiment(session, experiment_id), live)


@router.delete(
    "/{experiment_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"model": ErrorOut},
               409: {"model": ErrorOut, "description": "a run of it is queued or running, or "
                    "queued or running runs start from one of its runs' models"}},
)
def delete_experiment(experiment_id: ExperimentId, session: DbDep, settings: SettingsDep,
                      live: RedisDep) -> Response:
    """Delete the experiment with its runs, their metrics and files (checkpoints, exports);
    its dataset stays. Refused (409) while a run of it is queued or running: cancel it
    first (`POST /api/experiments/{id}/cancel`) and wait for it to end."""
    aside = delete_experiment_with_runs(session, settings, live,
                                        get_experiment(session, experiment_id))
    # The run folders were moved aside: they are removed once the answer has gone, and the
    # database's pages of the runs' metric points are given back to the disk.
    return deleted_answer(settings, aside)


@router.get("/{experiment_id}/events", responses={**sse_responses(True),
                                                  404: {"model": ErrorOut}},
            response_class=StreamingResponse)
async def experiment_events(experiment_id: ExperimentId, request: Request,
                            settings: SettingsDep, last_event_id: LastEventId = None):
    """Live events of every run of the experiment (Server-Sent Events; resumable with
    `Last-Event-ID` or `?last_event_id=`): each run's status, started and end events, and
    its progress, eval and checkpoint events at most once per 1 % of its steps (its own feed
    has every one). Ends with an `experiment_end` event once every run has ended. A feed
    that would skip events Redis trimmed first says so (`dropped`)."""
    def check_exists() -> None:
        with session_scope(settings.sqlalchemy_url) as session:
            get_experiment(session, experiment_id)

    # Off the event loop: thousands of feeds opening at once held every other request.
    await run_in_threadpool(check_exists)

    def outcome() -> Outcome:
        with session_scope(settings.sqlalchemy_url) as session:
            runs = session.scalars(select(Run).where(Run.experiment_id == experiment_id)
                                   .order_by(Run.id)).all()
            finished = all(is_terminal(run.status) for run in runs)
            final = {
                "type": "experiment_end",
                "experiment_id": experiment_id,
                "runs": {str(run.id): run.status for run in runs},
            }
            history = [[ended(run) for run in runs]]  # one page: an end event a run
        return Outcome(finished, history, final)

    key = experiment_stream_key(experiment_id)
    return await event_stream_response(request, key, outcome, settings.sse_heartbeat_s,
                                       maxlen=settings.event_stream_maxlen,
                                       record=f"/api/experiments/{experiment_id}",
                                       last_event_id=last_event_id)
