"""HTML pages for experiments and runs: the list, the start form, and the live result pages.

The routes only gather what the REST API already serves (same functions, same shapes) and
hand it to the templates as JSON; the static JS draws it and keeps it live.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, get_args, get_origin

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import (
    DatasetFilter,
    DbDep,
    ExperimentFilter,
    ExperimentId,
    RedisDep,
    RunId,
    SettingsDep,
)
from app.experiments import (
    PRETRAINED_LABEL,
    budget_unlabeled_count,
    experiment_status,
    suggested_budgets,
)
from app.live import experiment_stream_key, feed_position, run_stream_key
from app.models import Artifact, Dataset, Experiment, Run
from app.responses import shortened
from app.routers.datasets import dataset_names
from app.routers.experiments import (
    MOST_COMPARED,
    ComparedIds,
    compared_experiments,
    experiment_items,
    experiment_out,
    get_experiment,
)
from app.routers.pages import METHOD_TITLES, PageNumber, Pager, page_guard, render
from app.routers.runs import read_run
from app.schemas import ExperimentIn, MethodName, Overrides
from app.try_model import MAX_IMAGES
from worker.selftuning.budgets import Budget
from worker.selftuning.config import PRESETS, RunConfig
from worker.selftuning.files import MODEL_FILE
from worker.selftuning.offline_weights import installed_offline_backbones

router = APIRouter(include_in_schema=False)

# What the form starts with: the comparison the product is about, over the paper's budgets
# (those the chosen dataset can tell apart: `suggested_budgets`).
DEFAULT_METHODS = ("self-tuning", "fine-tune")
# Form labels where the field name alone reads poorly; other fields show their name.
OVERRIDE_LABELS = {
    "image_size": "Image size (px)",
    "batch_size": "Labeled batch",
    "unlabeled_batch_size": "Unlabeled batch",
    "lr": "Learning rate",
    "head_lr_ratio": "Classifier lr ratio",
    "projector_lr_ratio": "Projector lr ratio",
    "lr_milestones": "lr steps (fractions)",
    "lr_gamma": "lr step factor",
    "ema_momentum": "Key encoder EMA",
    "pseudo_label_threshold": "Pseudo-label threshold",
    "labeled_query_view": "Labeled query view",
    "cpu_threads": "CPU threads",
    "num_workers": "Loader processes",
    "momentum": "SGD momentum",
    "queue_size": "Queue keys per class",
    "temperature": "Temperature τ",
    "fixmatch_threshold": "FixMatch threshold",
    "eval_interval": "Evaluate every",
    "checkpoint_interval": "Checkpoint every",
    "log_interval": "Log every",
    "pretrained": PRETRAINED_LABEL,
}
OVERRIDE_HELP = {
    "pretrained": "Untick to train from random init (tests, models without weights).",
    "lr_milestones": "Comma-separated, e.g. 0.5, 0.75.",
}


def dataset_choices(session: Session) -> list[dict[str, Any]]:
    return [
        {"id": d.id, "name": d.name, "classes": len(d.class_names),
         "labeled": sum(c.get("train", 0) for c in d.class_counts.values()),
         "unlabeled": d.unlabeled_count, "budgets": suggested_budgets(d)}
        for d in session.scalars(select(Dataset).order_by(Dataset.id.desc()))
    ]


# Succeeded runs whose models the backbone field suggests, the latest first.
BACKBONE_RUNS_SHOWN = 10


def backbone_choices(session: Session) -> list[dict[str, str]]:
    """What the backbone field suggests: the backbones whose ImageNet weights are installed
    (they train offline), then the models of the latest succeeded runs, to go on from."""
    offline = [{"value": name, "label": "ImageNet weights installed here: works offline"}
               for name in installed_offline_backbones()]
    latest = session.execute(
        select(Run, Artifact.path, Dataset.name)
        .join(Artifact, (Artifact.run_id == Run.id) & (Artifact.name == MODEL_FILE))
        .join(Dataset, Dataset.id == Run.dataset_id)
        .where(Run.status == "succeeded")
        .order_by(Run.finished_at.desc(), Run.id.desc()).limit(BACKBONE_RUNS_SHOWN)).tuples()
    runs = []
    for run, path, dataset_name in latest:
        top1 = run.metrics.get("test_top1")
        scored = f": top-1 {top1:.1%}" if isinstance(top1, int | float) else ""
        method = METHOD_TITLES.get(run.method, run.method)
        runs.append({"value": path, "label": f"run #{run.id}'s model ({method}, "
                     f"{run.budget_label}, {dataset_name}{scored})"})
    return offline + runs


def override_fields() -> list[dict[str, Any]]:
    """The form's hyper-parameter inputs: exactly the fields the API accepts as overrides."""
    fields = []
    for name, info in Overrides.model_fields.items():
        annotation = next(t for t in get_args(info.annotation) if t is not type(None))
        label = OVERRIDE_LABELS.get(name, name.replace("_", " ").capitalize())
        field = {"name": name, "label": label,
                 "help": OVERRIDE_HELP.get(name, info.description or "")}
        if get_origin(annotation) is Literal:
            field |= {"kind": "choice", "options": list(get_args(annotation))}
        else:
            field["kind"] = annotation.__name__
        fields.append(field)
    return fields


@router.get("/experiments", response_class=HTMLResponse)
def experiments_page(
    request: Request, settings: SettingsDep, session: DbDep, live: RedisDep,
    dataset_id: DatasetFilter = None, page: PageNumber = 1,
) -> Response:
    """All experiments, or with `?dataset_id=` those on one dataset, a page at a time."""
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    pager, experiments = Pager.fetch(request, page, lambda limit, offset: experiment_items(
        session, live, dataset_id, limit, offset))
    names = dataset_names(session, {e.dataset_id for e in experiments} | ({dataset_id} - {None}))
    return render(request, "experiments.html", experiments=experiments, dataset_names=names,
                  dataset_id=dataset_id, method_titles=METHOD_TITLES,
                  pager=pager, most_compared=MOST_COMPARED)


def preset_summary(factory) -> str:
    """A preset's first paragraph, as the form shows it: the rest of its docstring is why
    its values were chosen (in code, README), and it reads as plain text (no `code` marks)."""
    first = (factory.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(first.replace("`", "").split())


def budget_text(value: Any) -> str:
    """A recorded budget as the form's user would type it: "15%", "4/class" or "all" (to
    twelve digits: a label's six would start another experiment on other labels)."""
    budget = Budget.parse(value)
    if budget.fraction is not None:
        return f"{budget.fraction * 100:.12g}%"
    return budget.label


@router.get("/experiments/new", response_class=HTMLResponse)
def new_experiment_page(
    request: Request, settings: SettingsDep, session: DbDep, dataset_id: DatasetFilter = None,
    like: ExperimentFilter = None,
) -> Response:
    """The start form: the usual values, or with `?like=` an experiment's own (its dataset
    unless `?dataset_id=` names another), to run it again with something changed."""
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    model = session.get(Experiment, like) if like is not None else None
    if model is not None and dataset_id is None:
        dataset_id = model.dataset_id
    datasets = dataset_choices(session)
    # A dataset deleted since the link was made (in another tab): the form says so and
    # chooses none, rather than the newest in its place.
    missing_dataset_id = (dataset_id if dataset_id is not None
                          and dataset_id not in {d["id"] for d in datasets} else None)
    form = {
        "datasets": datasets,
        "dataset_id": dataset_id,
        "presets": {
            name: {"values": RunConfig.from_preset(name).to_dict(),
                   "about": preset_summary(factory)}
            for name, factory in PRESETS.items()
        },
        "preset": ExperimentIn.model_fields["preset"].default,
        "backbone": ExperimentIn.model_fields["backbone"].default,
        "backbone_choices": backbone_choices(session),
        "offline_backbones": installed_offline_backbones(),
        "methods": [
            {"name": m, "title": METHOD_TITLES.get(m, m), "checked": m in DEFAULT_METHODS}
            for m in get_args(MethodName)
        ],
        # The browser chooses the first dataset when the link names none.
        "budgets": next((d["budgets"] for d in datasets if d["id"] == dataset_id),
                        datasets[0]["budgets"] if datasets and dataset_id is None
                        else suggested_budgets(None)),
        "overrides": override_fields(),
        "seeds": "0",
        "changed": {},  # hyper-parameters set over the preset's values
    }
    if model is not None:
        checked = set(model.methods)
        form |= {
            "backbone": model.backbone,
            "methods": [m | {"checked": m["name"] in checked} for m in form["methods"]],
            "budgets": ", ".join(budget_text(b) for b in model.budgets),
            "seeds": ", ".join(str(seed) for seed in model.seeds),
            "preset": model.preset if model.preset in PRESETS else form["preset"],
            "changed": model.overrides,
            "like": {"id": model.id, "name": model.name},
        }
    return render(request, "experiment_new.html", form=form,
                  missing_dataset_id=missing_dataset_id, missing_like=like if like is not None
                  and model is None else None)


# The line of each compared experiment (its methods keep the colours of the experiment page).
COMPARED_DASHES = ([], [8, 4], [2, 3], [12, 4, 2, 4], [4, 8], [16, 6])
LEGEND_NAME_CHARS = 28  # of an experiment's name in the compare chart's legend
DASH_NAMES = ("solid line", "dashed line", "dotted line", "dash-dot line", "sparse dashes",
              "long dashes")


@router.get("/experiments/compare", response_class=HTMLResponse)
def compare_page(request: Request, settings: SettingsDep, session: DbDep,
                 ids: ComparedIds = None) -> Response:
    """Experiments side by side (`?ids=3&ids=5`, as the list's check boxes send them): one
    accuracy-against-budget chart with a line per experiment and method, and one table."""
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    # The list's ticks are kept for the tab (compare_ticks.js): one may name an experiment
    # deleted since. The others are compared, and the page says which was left out.
    chosen = list(dict.fromkeys(ids or []))
    gone = [experiment_id for experiment_id in chosen
            if session.get(Experiment, experiment_id) is None]
    if gone and len(chosen) >= 2 and len(chosen) - len(gone) < 2:
        # A bookmark of two, one deleted since: the page links to the one left and the list.
        left = [session.get(Experiment, experiment_id) for experiment_id in chosen
                if experiment_id not in gone]
        return render(request, "error.html", status_code=404, title="Not found",
                      detail=f"{gone_words(gone).capitalize()} (deleted?): tick another "
                             "experiment to compare with.",
                      links=[{"href": f"/experiments/{experiment.id}",
                              "text": f"Open {experiment.name or f'experiment {experiment.id}'}"}
                             for experiment in left])
    experiments, splits, labels, tables = compared_experiments(
        session, [experiment_id for experiment_id in chosen if experiment_id not in gone])
    compared = []
    for experiment, split, table in zip(experiments, splits, tables, strict=True):
        dataset = session.get(Dataset, experiment.dataset_id)
        cells: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in experiment.methods}
        for row in table:
            cells.setdefault(row["method"], {})[row["budget_label"]] = row
        compared.append({
            "id": experiment.id, "name": experiment.name, "dataset_id": experiment.dataset_id,
            "dataset_name": dataset.name if dataset else f"#{experiment.dataset_id}",
            "tested_on": split,
            "backbone": experiment.backbone, "preset": experiment.preset,
            "overrides": experiment.overrides or {}, "seeds": experiment.seeds,
            "status": experiment_status(Counter(run.status for run in experiment.runs)),
            "cells": cells, "budget_count": len(experiment.budgets),
        })
    # The chart's budgets: each label at each labeled count it keeps (on two datasets, "5%"
    # keeps two), fewest labels first; a line per experiment and method, through its own.
    points = sorted({(row["budget_label"], row["labeled_count"]) for table in tables
                     for row in table},
                    key=lambda point: (labels.index(point[0]), point[1] or 0))

    def line(cells: dict[str, dict[str, Any]], key: str) -> list[float | None]:
        return [cells[label][key] if label in cells and cells[label]["labeled_count"] == count
                else None for label, count in points]

    # Named with their ids too: "Start a similar experiment" keeps the name it is given. The
    # legend cuts a long name (the table above has it whole): four of 80 characters took a
    # phone's chart box, leaving the lines a strip of it.
    series = [{"name": method,
               "title": f"{e['name']} (#{e['id']}) · {METHOD_TITLES.get(method, method)}",
               "key": f"{shortened(e['name'], LEGEND_NAME_CHARS)} (#{e['id']}) · "
                      f"{METHOD_TITLES.get(method, method)}",
               "dash": COMPARED_DASHES[index], "spanGaps": True, "budgetCount": e["budget_count"],
               "means": line(cells, "mean_top1"), "spreads": line(cells, "std_top1")}
              for index, e in enumerate(compared) for method, cells in e["cells"].items()]
    return render(request, "compare.html", compared=compared, labels=labels,
                  gone=gone, gone_words=gone_words(gone).capitalize() if gone else None,
                  method_titles=METHOD_TITLES, dashes=COMPARED_DASHES, dash_names=DASH_NAMES,
                  chart={"budgets": [{"label": label, "count": count} for label, count in points],
                         "series": series})


def gone_words(ids: list[int]) -> str:
    """"experiment 7 does not exist", or "experiments 7 and 9 do not exist"."""
    if len(ids) == 1:
        return f"experiment {ids[0]} does not exist"
    return f"experiments {', '.join(map(str, ids[:-1]))} and {ids[-1]} do not exist"


# FEED_FROM: a page follows its feed from the event that was the last before it read the
# record. What it shows comes from the record, which has each event's news by the time the
# event is in the feed (the worker and the web write the record first), so the events before
# are not sent again: replayed from the start, 20,000 of a long run's (6 MB) came again to
# each run page opened late, and an experiment page drew its runs once for each of 18,000.
@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def experiment_page(
    experiment_id: ExperimentId, request: Request, settings: SettingsDep, session: DbDep,
    live: RedisDep,
) -> Response:
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    feed_from = feed_position(live, experiment_stream_key(experiment_id))  # FEED_FROM
    experiment = get_experiment(session, experiment_id)
    dataset = session.get(Dataset, experiment.dataset_id)
    source, before = before_labels_added(session, experiment, dataset)
    return render(request, "experiment.html",
                  experiment=experiment_out(experiment, live).model_dump(mode="json"),
                  feed_from=feed_from,
                  dataset_name=dataset.name if dataset else f"#{experiment.dataset_id}",
                  method_titles=METHOD_TITLES, source=source, labels_added=dataset.labels_added
                  if dataset else 0, before=before,
                  after=after_labels_added(session, experiment), try_max_images=MAX_IMAGES,
                  test_images=sum(counts.get("test", 0) for counts in (
                      dataset.class_counts if dataset else {}).values()))


# Experiments of a dataset's source (the dataset it was made from by adding labels) that an
# experiment page offers to compare with.
BEFORE_SHOWN = 5
BEFORE_READ = 500  # the newest, among which those with the same settings are found


def before_labels_added(session: Session, experiment: Experiment, dataset: Dataset | None
                        ) -> tuple[Dataset | None, list[tuple[Experiment, bool]]]:
    """The dataset `experiment`'s dataset was made from by adding labels, and the experiments
    on it to compare with, each with whether it has the same settings (backbone, methods,
    budgets, seeds, preset and changes): those first, then the newest. What the added labels
    bought is the difference."""
    source = (session.get(Dataset, dataset.derived_from_id)
              if dataset is not None and dataset.derived_from_id else None)
    if source is None:
        return None, []
    settings = _settings_of(experiment)
    on_source = [(other, _settings_of(other) == settings) for other in session.scalars(
        select(Experiment).where(Experiment.dataset_id == source.id)
        .order_by(Experiment.id.desc()).limit(BEFORE_READ))]
    on_source.sort(key=lambda item: not item[1])  # stable: the newest first within each
    return source, on_source[:BEFORE_SHOWN]


def after_labels_added(session: Session, experiment: Experiment
                       ) -> list[tuple[Experiment, Dataset]]:
    """The experiments with `experiment`'s settings run since on datasets made from its
    dataset by adding labels (the other way of `before_labels_added`), newest first, each
    with its dataset."""
    settings = _settings_of(experiment)
    since = session.execute(
        select(Experiment, Dataset).join(Dataset, Experiment.dataset_id == Dataset.id)
        .where(Dataset.derived_from_id == experiment.dataset_id)
        .order_by(Experiment.id.desc()).limit(BEFORE_READ)).tuples()
    return [(other, dataset) for other, dataset in since
            if _settings_of(other) == settings][:BEFORE_SHOWN]


def _settings_of(experiment: Experiment) -> tuple:
    return (experiment.backbone, sorted(experiment.methods), experiment.budgets,
            sorted(experiment.seeds), experiment.preset, experiment.overrides or {})


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: RunId, request: Request, settings: SettingsDep, session: DbDep,
             live: RedisDep) -> Response:
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    feed_from = feed_position(live, run_stream_key(run_id))  # FEED_FROM
    # The page holds the run without its metrics: run.js reads them from the API
    # (`?confusion=sparse`, as at the end of a run it follows live) while the page paints.
    # Their per-class lists were 0.66 MB of a 5,000-class run's page and put its first paint
    # 0.05-0.3 s later, the more the busier the machine (bench/run_classes.py).
    run = read_run(run_id, session, settings, confusion="none")
    dataset = session.get(Dataset, run.dataset_id)
    experiment = session.get(Experiment, run.experiment_id)
    return render(request, "run.html",
                  run=run.model_dump(mode="json", exclude={"metrics"}),
                  class_names=list(dataset.class_names) if dataset else [],
                  dataset_name=dataset.name if dataset else f"#{run.dataset_id}",
                  experiment_name=experiment.name,
                  # None when the dataset is gone (its runs go with it, but a page may race).
                  unlabeled_images=budget_unlabeled_count(dataset, run.budget) if dataset else None,
                  method_titles=METHOD_TITLES, try_max_images=MAX_IMAGES, feed_from=feed_from)
