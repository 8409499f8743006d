"""Experiments: validate a sweep, expand it into runs, cancel or delete them, summarise results
per method and budget."""

from __future__ import annotations

import bisect
import heapq
import math
import re
import statistics
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from operator import attrgetter
from pathlib import Path
from typing import Any

import redis
from fastapi import HTTPException
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.engine_preload import wait_for_preload
from app.estimates import estimate_label_gains
from app.live import ANY_ATTEMPT, forget_feeds, publish_ends, run_cancel_key
from app.models import MAX_ID, Artifact, Dataset, Experiment, Run, RunMetric, utcnow
from app.responses import human_bytes, in_utc
from app.schemas import (
    TERMINAL_STATUSES,
    TO_GO_STATUSES,
    ExperimentIn,
    LabelEstimate,
    TimeLeft,
    parse_budget_values,
)
from app.trash import move_to_trash
from worker.selftuning.budgets import Budget
from worker.selftuning.config import RunConfig, backbone_in
from worker.selftuning.labels_csv import untested_class_warnings

TRAIN_TASK = "selftune.train_run"
CANCEL_FLAG_TTL_S = 7 * 24 * 3600  # outlives any run; the database flag is the record
# Results list methods in this order: the baseline first, the method under study last.
METHOD_ORDER = {"fine-tune": 0, "fixmatch": 1, "self-tuning": 2}


def as_utc(moment: datetime | None) -> datetime | None:
    """A stored moment in UTC, or None (see `in_utc`)."""
    return None if moment is None else in_utc(moment)


def unprocessable(field: str | tuple[str, ...], message: str,
                  where: str = "body") -> HTTPException:
    """A 422 in FastAPI's shape; `field` is a field of the body (or of `where`: header,
    query) or a path into one."""
    loc = [field] if isinstance(field, str) else list(field)
    detail = [{"loc": [where, *loc], "msg": message, "type": "value_error"}]
    return HTTPException(422, detail=detail)


def parse_budgets(raw: list[Any], dataset: Dataset) -> list[Budget]:
    try:
        budgets = parse_budget_values(raw)
    except ValueError as exc:
        raise unprocessable("budgets", str(exc)) from None
    without_labels = [
        name for name, counts in dataset.class_counts.items() if counts.get("train", 0) < 1
    ]
    if without_labels:
        raise unprocessable(
            "budgets",
            f"class(es) {without_labels} have no labeled training image, so no budget can give "
            "them a label; upload labeled images for them",
        )
    # On this dataset two budgets may keep the same labels (1% and 2% of 40 images: one per
    # class); their runs would train on the same subset, twice, under two names.
    sizes = _train_sizes(dataset)
    kept: dict[tuple[int, ...], Budget] = {}
    for index, budget in enumerate(budgets):
        if budget.over_every_class(sizes):
            raise unprocessable(
                "budgets", f"budgets[{index}]: {budget.label} is more than any class holds (the "
                f"largest has {max(sizes):,} labeled training images), so it keeps every label: "
                f'use "all", or at most {max(sizes):,} per class')
        counts = tuple(budget.count_for(size) for size in sizes)
        if same := kept.get(counts):
            raise unprocessable(
                "budgets", f"budgets[{index}]: {budget.label} keeps the same {sum(counts):,} "
                f"labeled images as {same.label} on this dataset (as many in every class), so "
                "their runs would train on the same subset: leave one out")
        kept[counts] = budget
    return budgets


# The form's control for `pretrained`, which a refusal names for a person at the form.
PRETRAINED_LABEL = "Start from pre-trained weights"


def resolve_backbone(name: str, pretrained: bool, settings: Settings) -> str:
    """The backbone name the engine gets, or a 422 saying what is wrong with it.

    A timm architecture (with offline or hub weights), or a `.safetensors` file inside the
    data directory (e.g. `runs/12/model.safetensors`, to continue from an earlier run).
    """
    name = name.strip()
    if name.endswith(".safetensors"):
        root = settings.data_dir.resolve()
        path = (root / name.rpartition(":")[2]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise unprocessable(
                "backbone", f"{name}: a weight file must exist inside the data directory, "
                "e.g. runs/<run id>/model.safetensors",
            )
        # Stored relative to the data directory (`backbone_in` resolves it): what a person
        # wrote, and still right when the data directory moves.
        relative = path.relative_to(root).as_posix()
        return f"{name.rpartition(':')[0]}:{relative}" if ":" in name else relative
    wait_for_preload()
    import timm  # imported at start (app.engine_preload) or on first use

    from worker.selftuning.backbones import hub_weights_problem
    from worker.selftuning.offline_weights import OFFLINE_WEIGHTS, installed_offline_backbones

    if not timm.is_model(name):
        raise unprocessable("backbone", f"unknown backbone {name!r}: not a timm architecture")
    has_weights = (
        name in OFFLINE_WEIGHTS
        or timm.list_pretrained(name)
        or timm.list_pretrained(f"{name}.*")
    )
    if pretrained and not has_weights:
        raise unprocessable(
                "backbone", f"{name!r} has no pre-trained weights; set pretrained to false "
                f"(on the form, untick “{PRETRAINED_LABEL}”) to train it from scratch",
            )
    installed = installed_offline_backbones()
    if pretrained and name not in installed and (problem := hub_weights_problem(name)):
        raise unprocessable(
            "backbone", f"cannot get the pre-trained weights of {name!r}: {problem}. "
            f"Backbones that work offline here: {', '.join(installed)}; or name a "
            ".safetensors file in the data directory, or set pretrained to false (on the "
            f"form, untick “{PRETRAINED_LABEL}”) to train from scratch",
        )
    return name


def check_input_size(backbone: str, image_size: int, batch_size: int) -> None:
    """A 422 for a backbone that cannot train on `image_size` px images (a ViT made for 224
    px only, a distilled model with two heads), or on `batch_size` of them at a time (one
    image whose last feature map is 1x1: batch norm fails), before any run is queued to fail.
    A labeled batch alone is the smallest forward of every method (fine-tuning's, and the
    others' on a dataset with no unlabeled image left). `backbone` is named as the engine
    opens it (`backbone_in`)."""
    wait_for_preload()
    from worker.selftuning.backbones import (
        BackboneError,
        check_forward_batch,
        check_image_size,
        check_local_weights,
    )

    try:
        check_local_weights(backbone)  # a weight file made for another architecture
        check_image_size(backbone, image_size)
    except BackboneError as exc:
        raise unprocessable("backbone", str(exc)) from None
    try:
        check_forward_batch(backbone, image_size, batch_size)
    except BackboneError as exc:
        raise unprocessable(("overrides", "batch_size"), str(exc)) from None


def run_config(payload: ExperimentIn, method: str, seed: int) -> dict[str, Any]:
    overrides = payload.overrides.model_dump(exclude_none=True)
    try:
        config = RunConfig.from_preset(
            payload.preset, method=method, backbone=payload.backbone, seed=seed, **overrides
        )
    except ValueError as exc:
        # The engine's messages start with the field's name: put the error next to it.
        field = next((name for name in overrides if str(exc).startswith(f"{name} ")), None)
        loc = ("overrides", field) if field else ("overrides",)
        raise unprocessable(loc, str(exc)) from None
    return config.to_dict()


def default_name(dataset_name: str, methods: list[str]) -> str:
    """"<dataset>: <methods>", shortened to fit the 200 characters a name may have."""
    name = f"{dataset_name}: {', '.join(methods)}"
    return name if len(name) <= 200 else f"{name[:199]}…"


def plan_experiment(session: Session, settings: Settings, payload: ExperimentIn, *,
                    hold: bool = True) -> tuple[Dataset, Experiment]:
    """Validate, and build the experiment and its runs without storing them. With `hold`, a
    backbone that is another run's model has that run's row locked until the transaction
    ends (see `hold_weight_source`); without it, only checked."""
    dataset = session.get(Dataset, payload.dataset_id)
    if dataset is None:
        raise unprocessable("dataset_id", f"dataset {payload.dataset_id} does not exist")
    for field, values in (("methods", payload.methods), ("seeds", payload.seeds)):
        twice = [str(value) for value in sorted({v for v in values if values.count(v) > 1})]
        if len(twice) == 1:
            raise unprocessable(field, f"{field[:-1]} {twice[0]} is listed twice")
        if twice:
            raise unprocessable(field, f"{field} {', '.join(twice[:-1])} and {twice[-1]} are "
                                       "listed twice")
    if any(not 0 <= seed < 2**31 for seed in payload.seeds):
        raise unprocessable("seeds", "seeds must be between 0 and 2147483647")
    budgets = parse_budgets(payload.budgets, dataset)
    total = len(payload.methods) * len(budgets) * len(payload.seeds)
    if total > settings.max_runs_per_experiment:
        raise unprocessable(
            "budgets",
            f"this sweep has {total} runs (methods x budgets x seeds); the limit is "
            f"{settings.max_runs_per_experiment} (SELFTUNE_MAX_RUNS_PER_EXPERIMENT)",
        )
    pretrained = payload.overrides.pretrained is not False
    payload.backbone = resolve_backbone(payload.backbone, pretrained, settings)
    configs = {
        (method, seed): run_config(payload, method, seed)
        for method in payload.methods
        for seed in payload.seeds
    }
    first = next(iter(configs.values()))
    check_input_size(backbone_in(payload.backbone, settings.data_dir.resolve()),
                     first["image_size"], first["batch_size"])
    if missing := hold_weight_source(session, settings, payload.backbone, hold=hold):
        raise unprocessable("backbone", missing)
    experiment = Experiment(
        name=payload.name or default_name(dataset.name, payload.methods),
        dataset_id=dataset.id,
        backbone=payload.backbone,
        methods=list(payload.methods),
        budgets=[budget.to_json() for budget in budgets],
        seeds=list(payload.seeds),
        preset=payload.preset,
        overrides=payload.overrides.model_dump(exclude_none=True),
        runs=[
            Run(
                dataset_id=dataset.id,
                method=method,
                budget=budget.to_json(),
                budget_label=budget.label,
                seed=seed,
                config=configs[(method, seed)],
                total_steps=configs[(method, seed)]["iterations"],
            )
            for budget in budgets
            for method in payload.methods
            for seed in payload.seeds
        ],
    )
    return dataset, experiment


def create_experiment(session: Session, settings: Settings, payload: ExperimentIn) -> Experiment:
    """Validate, store the experiment and its runs (status queued). The caller enqueues."""
    _, experiment = plan_experiment(session, settings, payload)
    session.add(experiment)  # its runs with it, in the order above (their ids follow it)
    session.flush()
    return experiment


class QueueUnavailable(Exception):
    """The queue (Redis) did not take a run's task. `reason` says why in one plain line;
    `unsent` are the runs whose tasks were not sent (those before them were)."""

    def __init__(self, reason: str, unsent: list[Run]) -> None:
        super().__init__(f"the queue (Redis) did not answer: {reason}")
        self.reason, self.unsent = reason, unsent


def broker_error_reason(exc: BaseException) -> str:
    """One plain line on why the broker did not take a task: Redis's own error where the
    chain holds one (it names the server and what went wrong). Celery's result backend, its
    reconnection retries spent, says "The Celery application must be restarted", which is
    not so: the next send connects afresh."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    shown = next((error for error in chain if isinstance(error, redis.RedisError)), exc)
    lines = [line.strip() for line in str(shown).splitlines() if line.strip()]
    return lines[0] if lines else type(shown).__name__


def stamp_runs(session: Session, runs: list[Run]) -> None:
    """Give each run a new task id and queue time, and commit: the id is committed before
    the message is sent, so the worker can tell the run's current task from a stale
    redelivery."""
    for run in runs:
        run.celery_task_id = uuid.uuid4().hex
        run.queued_at = utcnow()
    session.commit()


def send_tasks(runs: list[Run]) -> None:
    """Send each stamped run's task; raises QueueUnavailable at the first the broker does
    not take."""
    from worker.celery_app import app as celery

    for index, run in enumerate(runs):
        try:
            # ignore_result: the web never waits for a task's result, and subscribing to it
            # made each send with Redis down wait out the result backend's 20 reconnections.
            celery.send_task(TRAIN_TASK, args=[run.id], task_id=run.celery_task_id,
                             ignore_result=True)
        except Exception as exc:  # noqa: BLE001 - kombu's, redis's or the result backend's
            raise QueueUnavailable(broker_error_reason(exc), runs[index:]) from exc


def enqueue_runs(session: Session, runs: list[Run]) -> None:
    """One Celery task per run, for a person's request. When the broker is down the runs
    end failed with the reason and the request answers 503: the person sees it at once, and
    no run waits forever. (The reaper's requeue waits for the broker instead.)"""
    stamp_runs(session, runs)
    try:
        send_tasks(runs)
    except QueueUnavailable as exc:
        for run in runs:
            run.status = "failed"
            run.error = f"could not be queued: {exc}"
        session.commit()
        raise HTTPException(
            503, detail=f"the queue (Redis) is not reachable: {exc.reason}") from exc


def cancel_runs(session: Session, live: redis.Redis, runs: Iterable[Run]) -> list[Run]:
    """Cancel the runs that have not ended, and commit: a queued run ends at once (its feeds
    get the end event), a running one stops within about one iteration (its worker checks the
    flag in Redis and in the database). Ended runs are left alone, and so are runs past their
    last training step (`is_finishing`): they end succeeded in moments. Returns the runs it
    cancelled or flagged. Runs deleted (with their experiment) as they were cancelled make it
    a 404."""
    active = [run for run in runs if not is_terminal(run.status) and not is_finishing(run)]
    if not active:
        return []
    attempts: dict[int, str | None] = {}  # run id: the task id of the attempt cancelled
    for run in active:
        # Conditional updates: a worker may take a queued run at this very moment, and then
        # it is running (its flag stops it), not cancelled behind the worker's back; and a
        # requeue since the run was read sent another attempt, which this does not cancel.
        this_attempt = (Run.id == run.id,
                        Run.celery_task_id.is_not_distinct_from(run.celery_task_id))
        ended = session.execute(
            update(Run).where(*this_attempt, Run.status == "queued")
            .values(status="cancelled", finished_at=utcnow(), cancel_requested=True)
            .execution_options(synchronize_session=False)
        ).rowcount
        # Nor a run whose worker has recorded its last step since (`is_finishing`): that one
        # was not checked for a cancel again, and would end succeeded, flagged cancelled.
        training = (Run.status != "running") | (Run.step < Run.total_steps)
        if ended or session.execute(
                update(Run).where(*this_attempt, Run.status.not_in(TERMINAL_STATUSES), training)
                .values(cancel_requested=True).execution_options(synchronize_session=False)
        ).rowcount:
            attempts[run.id] = run.celery_task_id
    session.commit()
    # What the database holds now, for the answer and the feeds; a delete of the experiment
    # may have come in since the commit (a refresh of a row gone was a 500).
    ids = [run.id for run in active]
    active = list(session.scalars(select(Run).where(Run.id.in_(ids)).order_by(Run.id)
                                  .execution_options(populate_existing=True)))
    if gone := sorted(set(ids) - {run.id for run in active}):
        raise HTTPException(404, detail=f"run {gone[0]} was deleted, with its experiment, "
                                        "while it was being cancelled")
    active = [run for run in active if run.id in attempts]
    try:
        with live.pipeline(transaction=False) as pipe:
            for run in active:
                pipe.set(run_cancel_key(run.id), attempts[run.id] or ANY_ATTEMPT,
                         ex=CANCEL_FLAG_TTL_S)
            pipe.execute()
    except redis.RedisError:
        pass  # the worker also polls the database flag
    publish_ends(live, [run for run in active if run.status == "cancelled"])
    return active


def delete_experiment_with_runs(session: Session, settings: Settings, live: redis.Redis,
                                experiment: Experiment) -> list[Path]:
    """Delete an experiment with its runs (metrics, artifacts, run folders) and its live feeds;
    its dataset stays. Refused (409) while a run of it is queued or running, or while
    queued or running runs start from one of its runs' models (`weights_in_use`). Returns
    the run folders, moved aside for the caller to remove (`app.trash.empty_trash`) once it
    has answered."""
    experiment_id = experiment.id
    # Take the locks before the check, so that no run of it can be queued again (requeue)
    # between the check and the delete: SQLite takes its write lock on the first write;
    # PostgreSQL locks the run rows, whose statuses are read under that lock.
    locked = session.execute(
        update(Experiment).where(Experiment.id == experiment_id).values(name=Experiment.name)
    ).rowcount
    if not locked:  # a delete running alongside this one took it first
        session.rollback()
        raise HTTPException(404, detail=f"experiment {experiment_id} does not exist")
    runs = session.execute(
        select(Run.id, Run.status).where(Run.experiment_id == experiment_id).with_for_update()
    ).all()
    if active := sum(1 for run in runs if not is_terminal(run.status)):
        session.rollback()
        raise HTTPException(
            409, detail=f"experiment {experiment_id} has {active} queued or running run(s): "
            f"cancel them (POST /api/experiments/{experiment_id}/cancel) and wait for them to "
            "end, then delete it",
        )
    run_ids = [run.id for run in runs]
    if reason := weights_in_use(session, settings, run_ids, f"experiment {experiment_id}"):
        session.rollback()
        raise HTTPException(409, detail=reason)
    delete_run_rows(session, run_ids)
    session.execute(delete(Experiment).where(Experiment.id == experiment_id))
    session.commit()
    # Files and feeds go after the commit: a crash here leaves only invisible orphans (ids
    # are never reused, so no later run can mistake them for its own).
    aside = move_to_trash(settings, run_folders(settings, run_ids))
    forget_feeds(live, [experiment_id], run_ids)
    return aside


def weight_file(settings: Settings, backbone: str) -> Path | None:
    """The `.safetensors` file a backbone name loads (`resolve_backbone` stores it relative
    to the data directory; experiments from before, absolute), or None for a timm
    architecture."""
    if not backbone.endswith(".safetensors"):
        return None
    return Path(backbone_in(backbone, settings.data_dir.resolve()).rpartition(":")[2])


def source_run(settings: Settings, path: Path) -> int | None:
    """The run whose folder holds the weight file `path`, if it is another run's model: a
    folder named as runs are (`runs/12`), not any Python reads as a number (`²` was a 500,
    `012` and `١٢` were run 12's)."""
    runs_dir = settings.runs_dir.resolve()
    if not path.is_relative_to(runs_dir):
        return None
    folder = path.relative_to(runs_dir).parts[0]
    if not re.fullmatch(r"[1-9][0-9]{0,9}", folder) or int(folder) > MAX_ID:
        return None
    return int(folder)


def hold_weight_source(session: Session, settings: Settings, backbone: str,
                       hold: bool = True) -> str | None:
    """What is missing for a run to start from the weight file `backbone`, or None. When
    the file is another run's model, that run's row is locked first (a no-op update), so a
    delete of it either has committed (the row is gone) or waits until this transaction
    ends and then sees the runs that start from it (`weights_in_use`). Without `hold` the
    row is only looked for."""
    path = weight_file(settings, backbone)
    if path is None:
        return None
    shown = backbone.rpartition(":")[2]  # as stored: inside the data directory, relative to it
    if (source := source_run(settings, path)) is not None:
        if hold:
            held = session.execute(
                update(Run).where(Run.id == source).values(step=Run.step)).rowcount
        else:
            held = session.get(Run, source) is not None
        if not held:
            return f"run {source}, whose model {shown} is the backbone, was deleted"
    if not path.is_file():
        return f"the backbone weight file {shown} is gone"
    return None


def weights_in_use(session: Session, settings: Settings, run_ids: Iterable[int],
                   what: str) -> str | None:
    """Why deleting `what` (with the folders of `run_ids`) must wait, or None: queued or
    running runs, other than those, whose backbone is a weight file inside those folders
    would fail for want of it."""
    deleted = set(run_ids)
    if not deleted:
        return None
    active = session.execute(
        select(Run.id, Run.config).where(Run.status.in_(TO_GO_STATUSES))
    ).all()
    users = sorted(
        run_id for run_id, config in active
        if run_id not in deleted
        and (path := weight_file(settings, str(config.get("backbone", "")))) is not None
        and source_run(settings, path) in deleted
    )
    if not users:
        return None
    return (f"{what} holds the model that queued or running run(s) "
            f"{', '.join(map(str, users))} start from (their backbone): cancel them or let "
            "them finish, then delete it")


def delete_run_rows(session: Session, run_ids: list[int]) -> None:
    """The runs' rows with their metrics and artifact records (not committed)."""
    if run_ids:
        session.execute(delete(Artifact).where(Artifact.run_id.in_(run_ids)))
        session.execute(delete(RunMetric).where(RunMetric.run_id.in_(run_ids)))
        session.execute(delete(Run).where(Run.id.in_(run_ids)))


def run_folders(settings: Settings, run_ids: Iterable[int]) -> list[Path]:
    """The runs' folders (checkpoints, exports: gigabytes a run), for `move_to_trash` once
    the rows' delete is committed: removing 2 GB of a run's files inside the delete request
    took 0.4 s, a sweep's runs as many times that."""
    return [settings.runs_dir / str(run_id) for run_id in run_ids]


# The experiment statuses of one with runs to go (experiment_status).
GOING = ("queued", "running", "in progress")


def experiment_status(run_counts: Mapping[str, int]) -> str:
    """An experiment's status from how many of its runs are in each status."""
    counts = Counter(run_counts)
    if counts["running"]:
        return "running"
    if counts["queued"]:
        # Some runs done and the rest waiting for a worker: under way, though none trains now.
        return "in progress" if counts["queued"] < counts.total() else "queued"
    if counts["failed"] or counts["lost"]:
        # None succeeded: nothing to read but why they failed.
        return "finished with failures" if counts["succeeded"] else "failed"
    if counts["cancelled"]:
        return "partly cancelled" if counts["succeeded"] else "cancelled"
    return "finished"


def budget_sort_key(budget: Any) -> tuple[int, float]:
    parsed = Budget.parse(budget)
    if parsed.per_class is not None:
        return (1, parsed.per_class)
    if parsed.fraction is not None:
        return (0, parsed.fraction)
    return (2, 0.0)


def budget_labeled_counts(dataset: Dataset | None, runs: list[Run]) -> dict[str, int]:
    """Labeled images each budget of the runs keeps, by budget label: the engine's rule
    (`Budget.count_for` on every class's labeled training images), so it is known before any
    run finishes and is the same for every seed."""
    if dataset is None:
        return {}
    labeled = {}
    for run in runs:
        if run.budget_label not in labeled:
            labeled[run.budget_label] = budget_labeled_count(dataset, run.budget)
    return labeled


def budget_labeled_count(dataset: Dataset, budget: Any) -> int:
    return _labels_kept(Budget.parse(budget), _train_sizes(dataset))


def _labels_kept(budget: Budget, sizes: list[int]) -> int:
    """Labeled images `budget` keeps of classes of `sizes` labeled training images."""
    return sum(budget.count_for(size) for size in sizes if size)


def budget_unlabeled_count(dataset: Dataset, budget: Any) -> int:
    """Unlabeled images a run at this budget draws from: the dataset's unlabeled ones and the
    labeled ones the budget leaves out."""
    return training_images(dataset) - budget_labeled_count(dataset, budget)


# Decoded images above this size get a warning: the worker's disk holds them for as long as
# the dataset lives, and decoding them takes long before the first step.
LARGE_CACHE_BYTES = 10 * 2**30
CROP_PCT = 0.875  # timm's usual: training images are kept at image_size / 0.875 a side


def experiment_warnings(dataset: Dataset | None, runs: list[Run],
                        overrides: dict[str, Any]) -> list[str]:
    """What to know about an experiment before trusting or waiting for it."""
    image_size = next((run.config.get("image_size") for run in runs if run.config), None)
    return (budget_warnings(dataset, runs) + unlabeled_warnings(dataset, runs, overrides)
            + queue_warnings(dataset, runs) + logging_warnings(dataset, runs)
            + (untested_class_warnings(untested_classes(dataset)) if dataset else [])
            + (cache_warnings(dataset, image_size) if dataset is not None and image_size else []))


def untested_classes(dataset: Dataset) -> list[str]:
    """The classes an uploaded test split has no image of (`untested_class_warnings`): said
    on the dataset and on each experiment of it, whose top-1 leaves them out."""
    if dataset.test_source != "uploaded":
        return []
    return [name for name in dataset.class_names
            if not dataset.class_counts.get(name, {}).get("test")]


def budget_warnings(dataset: Dataset | None, runs: list[Run]) -> list[str]:
    """Fractions that keep more than twice the labels asked for: every class keeps at least
    one, so 1 % of a dataset of 1,000 classes of 4 images keeps 1,000 labels, 25 % of them,
    and only the chart's label count said so."""
    if dataset is None:
        return []
    sizes = _train_sizes(dataset)
    pool = sum(sizes)
    warnings = []
    for label, budget in {run.budget_label: run.budget for run in runs}.items():
        parsed = Budget.parse(budget)
        if _keeps_over_twice(parsed, sizes):
            kept = budget_labeled_count(dataset, budget)
            warnings.append(
                f"budget {label!r} keeps {kept:,} of the {pool:,} labeled images, "
                f"{kept / pool:.1%} rather than {parsed.fraction:.1%}: every class keeps at "
                "least one (a count per class such as '1/class' says so plainly)")
    return warnings


def _keeps_over_twice(budget: Budget, sizes: list[int]) -> bool:
    """A fraction keeping more than twice the labels it asks for (see `budget_warnings`)."""
    pool = sum(sizes)
    return (budget.fraction is not None and pool > 0
            and _labels_kept(budget, sizes) > 2 * budget.fraction * pool)


# The start form's budgets: the paper's ladder of shares of each class, and counts per class
# for datasets with too few labeled images a class for those shares to differ.
FORM_BUDGETS = (Budget(fraction=0.15), Budget(fraction=0.3), Budget(fraction=0.5), Budget())
FORM_COUNT_BUDGETS = (Budget(per_class=1), Budget(per_class=2), Budget(per_class=4),
                      Budget(per_class=8), Budget())


def suggested_budgets(dataset: Dataset | None) -> str:
    """The budgets the start form offers for a dataset, as the user would type them.

    `FORM_BUDGETS` less each budget this dataset would refuse (one keeping the same labels as
    a larger one, a count over every class) or warn about (a share keeping over twice the
    labels it asks, as every class keeps one). Where fewer than three are left (classes of
    one or two labeled images), `FORM_COUNT_BUDGETS` read the same way, if they keep more.
    The paper's ladder stands for a dataset every budget is refused on (a class without
    labels): the form then says why."""
    sizes = _train_sizes(dataset) if dataset is not None else []
    if not sizes or min(sizes) < 1:
        return ", ".join(budget.label for budget in FORM_BUDGETS)

    def fitting(ladder: tuple[Budget, ...]) -> list[Budget]:
        kept: set[tuple[int, ...]] = set()
        chosen = []
        for budget in reversed(ladder):  # "all" and the larger shares win a tie
            counts = tuple(budget.count_for(size) for size in sizes)
            if (counts in kept or budget.over_every_class(sizes)
                    or _keeps_over_twice(budget, sizes)):
                continue
            kept.add(counts)
            chosen.insert(0, budget)
        return chosen

    shares = fitting(FORM_BUDGETS)
    if len(shares) < 3 and len(counts := fitting(FORM_COUNT_BUDGETS)) >= len(shares):
        shares = counts
    return ", ".join(budget.label for budget in shares)


def queue_warnings(dataset: Dataset | None, runs: list[Run]) -> list[str]:
    """Self-Tuning runs too short to fill their key queue: it starts as random vectors, one
    row of `queue_size` a class, and each step puts at most its labeled and unlabeled keys in
    it. Every slot of a class is a positive in the PGC loss, so the slots never filled stay
    noise to the end (the quick preset at 1,000 classes: 12,800 keys for 32,000 slots)."""
    if dataset is None:
        return []
    classes = len(dataset.class_names)
    warnings = set()  # the runs of a sweep differ in budget and seed only
    for config in (run.config for run in runs if run.method == "self-tuning" and run.config):
        slots = classes * config["queue_size"]
        keys = _images_drawn(config)
        if keys < slots:
            warnings.add(
                f"Self-Tuning's queue has {slots:,} slots ({classes:,} classes × "
                f"{config['queue_size']} keys), and {config['iterations']:,} iterations put at "
                f"most {keys:,} keys in it: at least {1 - keys / slots:.0%} of it stays the "
                "random vectors it starts with, which the PGC loss counts as each class's "
                "positives; more iterations or a smaller queue_size fill it")
    return sorted(warnings)


# Points of its curves a run records (a progress point every log_interval steps, an
# evaluation every eval_interval) past which recording them takes minutes a run (about 5 ms a
# point on SQLite) and its page reads them all: the presets record under 600.
MANY_POINTS = 100_000
# A training image costs about three times an evaluated one (a forward pass and a backward
# pass of twice its cost): interim evaluations scoring this many times the images the steps
# draw take about as long as the training.
EVALUATED_PER_TRAINED = 3


def logging_warnings(dataset: Dataset | None, runs: list[Run]) -> list[str]:
    """Runs that would spend their time on their curves rather than on training: points by the
    hundred thousand, or evaluations that take as long as the training steps."""
    warnings = set()  # the runs of a sweep differ in budget and seed only
    tests = (sum(counts.get("test", 0) for counts in dataset.class_counts.values())
             if dataset is not None else 0)
    for run in runs:
        if not run.config:
            continue
        config = run.config
        iterations, log_every, eval_every = (
            config["iterations"], config["log_interval"], config["eval_interval"])
        drawn = _images_drawn(config, run.method)
        points = iterations // log_every + iterations // eval_every
        if points > MANY_POINTS:
            warnings.add(
                f"each run records about {points:,} points of its curves (progress every "
                f"{log_every:,} and an evaluation every {eval_every:,} of {iterations:,} "
                "iterations): writing them takes minutes a run, and its page reads them all; "
                "a larger log_interval or eval_interval records fewer")
        evaluations = (iterations - 1) // eval_every  # the last step's is the final score
        if evaluations * tests > EVALUATED_PER_TRAINED * drawn:
            every = "every iteration" if eval_every == 1 else f"every {eval_every:,} iterations"
            warnings.add(
                f"an evaluation {every} scores the {tests:,} test images {evaluations:,} "
                f"times, {evaluations * tests:,} images in all, over {EVALUATED_PER_TRAINED} "
                f"times the {drawn:,} a {run.method} run's steps train on: evaluating takes "
                "longer than training; a larger eval_interval leaves more of each run to "
                "training")
    return sorted(warnings)


# A run this many times the quick preset's work (iterations x images a step x pixels) is
# sized for a GPU: the paper preset is about 1,200 times.
GPU_SIZED = 20


def device_warnings(workers: list[dict[str, Any]], runs: list[Run]) -> list[str]:
    """Runs sized for a GPU when every worker that answers trains on its CPU (`workers`:
    app.live.live_workers): the paper preset takes days a run there."""
    if not workers or any(worker.get("torch_device") != "cpu" for worker in workers):
        return []
    quick = _work(RunConfig().to_dict())
    largest = max((run.config for run in runs if run.config), key=_work, default=None)
    if largest is None or _work(largest) < GPU_SIZED * quick:
        return []
    return [f"every worker that answers trains on its CPU, and these runs are sized for a GPU "
            f"({largest['iterations']:,} iterations of {largest['batch_size']} + "
            f"{largest['unlabeled_batch_size']} images at {largest['image_size']} px, "
            f"{_work(largest) / quick:,.0f} times the quick preset's work): expect days a "
            "run; the quick preset is sized for a CPU"]


def _work(config: dict[str, Any]) -> int:
    return _images_drawn(config) * config["image_size"] ** 2


def _images_drawn(config: dict[str, Any], method: str | None = None) -> int:
    """Labeled and unlabeled images a run's steps draw in all (keys, for Self-Tuning); a
    fine-tuning `method` draws labeled ones only."""
    unlabeled = 0 if method == "fine-tune" else config["unlabeled_batch_size"]
    return config["iterations"] * (config["batch_size"] + unlabeled)


def decoded_bytes(dataset: Dataset, image_size: int) -> int:
    """About what a dataset's decoded images take at `image_size` (the engine's cache):
    training images (labeled and unlabeled) at image_size / crop_pct a side, and again as
    centre crops at image_size with the test images (the end of a run predicts the unlabeled
    ones from crops of the whole training pool, kept for every budget's runs), 3 bytes a
    pixel."""
    train = training_images(dataset)
    evaluated = sum(counts.get("test", 0) for counts in dataset.class_counts.values()) + train
    scale = math.floor(image_size / CROP_PCT)
    return 3 * (train * scale * scale + evaluated * image_size * image_size)


def cache_warnings(dataset: Dataset, image_size: int) -> list[str]:
    size = decoded_bytes(dataset, image_size)
    if size < LARGE_CACHE_BYTES:
        return []
    return [f"at image_size {image_size} the decoded images take about {human_bytes(size)} "
            "of the worker's disk (kept for every run of this dataset at this size), and "
            "decoding them comes before the first step: a smaller image_size takes a "
            "fraction of that"]


SEMI_SUPERVISED = {"self-tuning": "Self-Tuning trains on the labeled images alone",
                   "fixmatch": "FixMatch trains as fine-tuning does"}


def unlabeled_warnings(dataset: Dataset | None, runs: list[Run],
                       overrides: dict[str, Any]) -> list[str]:
    """What to know before reading a comparison: a semi-supervised run with no unlabeled
    image to use (a budget that keeps every label on a dataset without unlabeled images, or
    `unlabeled_batch_size` 0) uses labeled images only. It runs, as a baseline may want it."""
    methods = [method for method in SEMI_SUPERVISED if any(run.method == method for run in runs)]
    if not methods:
        return []
    what = "; ".join(SEMI_SUPERVISED[method] for method in methods)
    if overrides.get("unlabeled_batch_size") == 0:
        return [f"unlabeled_batch_size 0 leaves every unlabeled image out: {what}"]
    if dataset is None:
        return []
    budgets = {run.budget_label: run.budget for run in runs if run.method in methods}
    return [f"at budget {label!r} no image is unlabeled (the budget keeps every label and the "
            f"dataset has no unlabeled images): {what}"
            for label, budget in budgets.items() if budget_unlabeled_count(dataset, budget) == 0]


def _train_sizes(dataset: Dataset) -> list[int]:
    """Labeled training images per class: the pool a budget draws its labels from."""
    return [counts.get("train", 0) for counts in dataset.class_counts.values()]


def training_images(dataset: Dataset) -> int:
    """The dataset's training images, labeled and unlabeled: the most labels a budget of it
    can have."""
    return sum(_train_sizes(dataset)) + dataset.unlabeled_count


def budget_table(runs: list[Run], labeled: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per method and budget: mean and spread (sample std, None below two seeds) of final
    test top-1 over the succeeded seeds; the best methods per budget are flagged (see
    `flag_best`). With `labeled` (budget_labeled_counts), rows carry their labeled count and
    budgets run from fewest labels to most."""
    labeled = labeled or {}
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.budget_label)].append(run)
    rows = []
    for (method, label), members in groups.items():
        scores = [
            run.metrics["test_top1"]
            for run in members
            if run.status == "succeeded" and run.metrics.get("test_top1") is not None
        ]
        rows.append({
            "method": method,
            "budget": members[0].budget,
            "budget_label": label,
            "labeled_count": labeled.get(label),
            "runs": len(members),
            "finished": len(scores),
            "pending": sum(not is_terminal(run.status) for run in members),
            "mean_top1": statistics.fmean(scores) if scores else None,
            "std_top1": statistics.stdev(scores) if len(scores) > 1 else None,
            "best": False,
        })
    by_budget: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_budget[row["budget_label"]].append(row)
    for members in by_budget.values():
        flag_best(members)
    rows.sort(key=lambda r: (
        r["labeled_count"] if r["labeled_count"] is not None else math.inf,
        budget_sort_key(r["budget"]),
        METHOD_ORDER.get(r["method"], 9),
    ))
    return rows


def tested_on(session: Session, dataset_id: int) -> int:
    """The dataset whose test split `dataset_id`'s is: the one it was made from by adding
    labels (which keeps the test split, app.add_labels), and so on back; a dataset deleted
    since still names it. Experiments on datasets of one test split compare."""
    seen = {dataset_id}
    while (dataset := session.get(Dataset, dataset_id)) is not None and (
            dataset.derived_from_id is not None and dataset.derived_from_id not in seen):
        dataset_id = dataset.derived_from_id
        seen.add(dataset_id)
    return dataset_id


def compare_budget_tables(tables: list[list[dict[str, Any]]], datasets: list[int]
                          ) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Experiments' budget tables side by side (`datasets`: each one's test split,
    `tested_on`): the budget labels of any of them, fewest labels first, and a copy of
    each table with `best` flagged per budget label across those scored on the same test
    split (`flag_best`), where each alone flagged its own best. Another dataset's test images
    are others: its top-1 is not comparable."""
    copies = [[{**row, "best": False} for row in table] for table in tables]
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_dataset_label: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for table, dataset in zip(copies, datasets, strict=True):
        for row in table:
            by_label[row["budget_label"]].append(row)
            by_dataset_label[dataset, row["budget_label"]].append(row)
    for members in by_dataset_label.values():
        flag_best(members)

    def order(label: str) -> tuple[float, tuple[int, float]]:
        counts = [row["labeled_count"] for row in by_label[label]
                  if row["labeled_count"] is not None]
        return (min(counts) if counts else math.inf, budget_sort_key(by_label[label][0]["budget"]))

    return sorted(by_label, key=order), copies


def flag_best(rows: list[dict[str, Any]]) -> None:
    """Flag the best methods of one budget: the highest mean top-1 as the page shows it (to
    0.1 point; a tie flags each), among the methods with the most succeeded seeds, so that a
    method with one lucky seed does not win over one whose every seed has finished."""
    scored = [row for row in rows if row["mean_top1"] is not None]
    if not scored:
        return
    most = max(row["finished"] for row in scored)
    contenders = [row for row in scored if row["finished"] == most]
    top = max(as_shown(row["mean_top1"]) for row in contenders)
    for row in contenders:
        row["best"] = as_shown(row["mean_top1"]) == top


def as_shown(share: float) -> Decimal:
    """A share as the pages print it, in percent to 0.1 (JavaScript's toFixed rounds the
    double's exact value half up, where Python's round() goes half to even)."""
    return Decimal(share * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def label_estimates(runs: list[Run], labeled: dict[str, int] | None = None,
                    dataset: Dataset | None = None) -> list[LabelEstimate]:
    """What more labels would buy per method, fitted on the succeeded runs: each at the
    labeled count the worker recorded in its metrics, else its budget's count in `labeled`
    (budget_labeled_counts); runs with neither are left out. With the runs' `dataset`, each
    estimate says how many more images it holds."""
    labeled = labeled or {}
    points = []
    for run in runs:
        count = run.metrics.get("labeled_count", labeled.get(run.budget_label))
        if (run.status == "succeeded" and isinstance(count, int)
                and run.metrics.get("test_top1") is not None):
            points.append((run.method, count, run.metrics["test_top1"]))
    images = None if dataset is None else training_images(dataset)
    estimates = estimate_label_gains(points, images)
    return sorted(estimates, key=lambda estimate: METHOD_ORDER.get(estimate.method, 9))


def queue_position(session: Session, run: Run) -> int | None:
    """1 for the next run a free worker takes: runs are taken in the order they were queued,
    and a requeued run goes to the back. Counted by the database (a run page polls this),
    in the order queue_positions gives."""
    if run.status != "queued":
        return None
    queued = Run.status == "queued"
    if run.queued_at is None:
        ahead = queued & (Run.id < run.id)
    else:
        ahead = queued & Run.queued_at.is_not(None) & (
            (Run.queued_at < run.queued_at)
            | ((Run.queued_at == run.queued_at) & (Run.id < run.id)))
    return session.scalar(select(func.count()).select_from(Run).where(ahead)) + 1


def queue_positions(session: Session, runs: Iterable[Run]) -> dict[int, int]:
    """The queue position of each queued run among `runs` (see queue_position), reading the
    queue once however many there are."""
    wanted = [run for run in runs if run.status == "queued"]
    if not wanted:
        return {}
    line = session.execute(select(Run.id, Run.queued_at).where(Run.status == "queued")).all()
    # Ordered by when they were queued, then by id; a run not yet stamped (between its
    # creation and its task's sending) counts the runs created before it.
    stamped = sorted((as_utc(queued_at), run_id) for run_id, queued_at in line
                     if queued_at is not None)
    positions = {}
    for run in wanted:
        if run.queued_at is None:
            ahead = sum(1 for run_id, _ in line if run_id < run.id)
        else:
            ahead = bisect.bisect_left(stamped, (as_utc(run.queued_at), run.id))
        positions[run.id] = ahead + 1
    return positions


def eta_seconds(run: Run, dataset: Dataset | None) -> float | None:
    """Training time left at the last reported speed (evaluations not counted)."""
    step_s = _seconds_a_step_at_speed(run, dataset)
    return None if step_s is None else max(0, run.total_steps - run.step) * step_s


def _seconds_a_step_at_speed(run: Run, dataset: Dataset | None) -> float | None:
    """What a training step of a running run takes at its last reported speed: the images it
    draws (its labeled batch, and its unlabeled one where the budget leaves an unlabeled
    image: the engine draws none where it does not) by its images a second."""
    if run.status != "running" or not run.images_per_s:
        return None
    config = run.config or {}
    draws_unlabeled = run.method != "fine-tune" and (
        dataset is None or budget_unlabeled_count(dataset, run.budget) > 0)
    images = config.get("batch_size", 0) + (
        config.get("unlabeled_batch_size", 0) if draws_unlabeled else 0)
    return images / run.images_per_s if images else None


def seconds_per_step(runs: Iterable[Run], key: Callable[[Run], Any] = attrgetter("method")
                     ) -> dict[Any, float]:
    """What one step of each method (or other `key`) took in these finished runs, by the
    clock: the median of their time from start to end (evaluations, checkpoints, loading and
    export included) by their steps. A run queued again after it started is left out: its time
    from start to end holds the wait."""
    finished: defaultdict[Any, list[float]] = defaultdict(list)
    for run in runs:
        if (run.status == "succeeded" and run.started_at and run.finished_at
                and run.total_steps > 0
                and (run.queued_at is None or as_utc(run.queued_at) <= as_utc(run.started_at))):
            took = (as_utc(run.finished_at) - as_utc(run.started_at)).total_seconds()
            finished[key(run)].append(max(took, 0.0) / run.total_steps)
    return {kind: statistics.median(times) for kind, times in finished.items()}


def run_shape(run: Run) -> tuple[Any, ...]:
    """What a step's cost depends on most, for timing a run by other experiments' runs: its
    method, backbone, image size and batches."""
    config = run.config or {}
    return (run.method, config.get("backbone"), config.get("image_size"),
            config.get("batch_size"), config.get("unlabeled_batch_size"))


def step_costs(runs: list[Run], dataset: Dataset | None,
               similar: Mapping[tuple[Any, ...], float]) -> dict[str, float]:
    """What a step of each method costs in one sweep: by the clock in its finished runs
    (seconds_per_step); for a method with none finished yet, by the clock in `similar` runs of
    other experiments (seconds_per_step by run_shape), else at its running run's speed
    (training steps only: evaluations and export come on top)."""
    costs = seconds_per_step(runs)
    for run in runs:
        if run.method not in costs and run_shape(run) in similar:
            costs[run.method] = similar[run_shape(run)]
    for run in runs:
        if (run.status == "running" and run.method not in costs
                and (step_s := _seconds_a_step_at_speed(run, dataset))):
            costs[run.method] = step_s
    return costs


EPOCH = datetime.fromtimestamp(0, UTC)


def queue_order(run: Run) -> tuple[bool, bool, datetime, int]:
    """Where a run still to go stands in the line workers take runs from: the running ones
    (taken), then the queued ones in queue order (queue_positions), those not yet stamped last."""
    return (run.status != "running", run.queued_at is None, as_utc(run.queued_at) or EPOCH,
            run.id or 0)


def times_left(sweeps: Mapping[Any, list[Run]], datasets: Mapping[Any, Dataset | None],
               workers: int, similar: Mapping[tuple[Any, ...], float] | None = None
               ) -> dict[Any, TimeLeft]:
    """How long until each sweep's last run to go has trained, for `sweeps` (every experiment
    with runs still to go, by id, each with all its runs): the runs of every sweep are taken
    in queue order by the first worker free, of `workers` (at least one, and at least as many
    as train now). Each run takes its steps left at what a step of its method costs in its
    own sweep, else in `similar` runs (step_costs). A run that cannot be timed yet counts as
    none, so the time is then at least this; the run is counted in `untimed_runs` or
    `ahead_untimed_runs`."""
    line = sorted(((key, run) for key, runs in sweeps.items() for run in runs
                   if run.status in TO_GO_STATUSES),
                  key=lambda entry: queue_order(entry[1]))
    costs = {key: step_costs(runs, datasets.get(key), similar or {})
             for key, runs in sweeps.items()}
    slots = max(1, workers, sum(run.status == "running" for _, run in line))
    free = [0.0] * slots  # when each worker is next free: a heap
    ends = []  # (sweep, when the run has trained, whether it is timed), in line order
    for key, run in line:
        cost = costs[key].get(run.method)
        end = heapq.heappop(free) + (
            max(0, run.total_steps - run.step) * cost if cost is not None else 0.0)
        heapq.heappush(free, end)
        ends.append((key, end, cost is not None))
    lefts = {}
    for key in sweeps:
        mine = [place for place, (sweep, _, _) in enumerate(ends) if sweep == key]
        if not mine:
            continue
        ahead = [timed for sweep, _, timed in ends[:mine[-1]] if sweep != key]
        untimed = [line[place][1].method for place in mine if not ends[place][2]]
        lefts[key] = TimeLeft(
            seconds=round(max(ends[place][1] for place in mine), 1), runs=len(mine),
            untimed_runs=len(untimed),
            untimed_methods=sorted(set(untimed), key=lambda method: METHOD_ORDER.get(method, 9)),
            ahead_runs=len(ahead), ahead_untimed_runs=ahead.count(False), workers=slots)
    return lefts


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def is_finishing(run: Run) -> bool:
    """A running run past its last training step: it scores and exports its model, which a
    cancel would not stop (the engine checks the flag between training steps)."""
    return run.status == "running" and run.step >= run.total_steps
