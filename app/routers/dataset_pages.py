"""HTML pages for datasets: the list, the upload page and one dataset's overview."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import dataset_export
from app.deps import DatasetId, DbDep, SettingsDep
from app.ingest import dataset_warnings
from app.models import MAX_ID, Dataset, DatasetImage, Experiment
from app.responses import human_bytes
from app.routers.datasets import newest_datasets
from app.routers.pages import PageNumber, Pager, page_guard, render, templates

router = APIRouter(include_in_schema=False)

THUMBS_PER_CLASS = 12
# A dataset made by adding labels offers to run again the newest experiments of its source.
SOURCE_EXPERIMENTS_SHOWN = 5
DERIVED_SHOWN = 5  # datasets made from this one, linked from its page
# The thumbnails of this many classes a page (a dataset of 1,000 classes: ten pages of them).
CLASSES_PER_THUMBS_PAGE = 100
MAX_SKIPPED_SHOWN = 500

templates.env.filters.setdefault("bytes", human_bytes)


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, settings: SettingsDep, db: DbDep,
                  page: PageNumber = 1) -> Response:
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    pager, datasets = Pager.fetch(request, page, lambda limit, offset: newest_datasets(
        db, limit, offset))
    return render(request, "datasets.html", datasets=datasets, pager=pager)


@router.get("/datasets/new", response_class=HTMLResponse)
def new_dataset_page(request: Request, settings: SettingsDep) -> Response:
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    return render(request, "dataset_new.html", max_upload=human_bytes(settings.max_upload_bytes),
                  max_upload_bytes=settings.max_upload_bytes,
                  max_archive_files=settings.max_archive_files,
                  holdout_percent=f"{settings.holdout_fraction * 100:g}")


def _file_name(original_path: str) -> str:
    """A thumbnail's alt text: its file's name in the archive. The class is the heading above
    the thumbnails (alt text that said it again was all a screen reader heard of each image);
    the name tells one image from the next and finds it in the user's folder."""
    return original_path.rsplit("/", 1)[-1]


def _class_thumbnails(db: Session, dataset_id: int, classes: range
                      ) -> dict[int, list[tuple[int, str]]]:
    """The first THUMBS_PER_CLASS training images of each class in `classes` (id and file
    name), in one query."""
    ranked = (
        select(
            DatasetImage.id,
            DatasetImage.label,
            DatasetImage.original_path,
            func.row_number()
            .over(partition_by=DatasetImage.label, order_by=DatasetImage.id)
            .label("rank"),
        )
        .where(
            DatasetImage.dataset_id == dataset_id,
            DatasetImage.split == "train",
            DatasetImage.label >= classes.start,
            DatasetImage.label < classes.stop,
        )
        .subquery()
    )
    rows = db.execute(
        select(ranked.c.id, ranked.c.label, ranked.c.original_path)
        .where(ranked.c.rank <= THUMBS_PER_CLASS)
        .order_by(ranked.c.label, ranked.c.id)
    )
    by_class: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for image_id, label, original_path in rows:
        by_class[label].append((image_id, _file_name(original_path)))
    return by_class


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    request: Request, dataset_id: DatasetId, settings: SettingsDep, db: DbDep,
    thumbs: Annotated[int, Query(ge=1, le=MAX_ID, description="page of class thumbnails")] = 1,
) -> Response:
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    dataset = db.get(Dataset, dataset_id)
    if dataset is None:
        return templates.TemplateResponse(
            request, "dataset.html", {"dataset": None, "dataset_id": dataset_id},
            status_code=404,
        )
    class_count = len(dataset.class_names)
    shown = range(min((thumbs - 1) * CLASSES_PER_THUMBS_PAGE, class_count),
                  min(thumbs * CLASSES_PER_THUMBS_PAGE, class_count))
    thumbnails = _class_thumbnails(db, dataset.id, shown)
    classes = [
        {"index": index, "name": name, "thumbs": thumbnails.get(index, []),
         **dataset.class_counts.get(name, {"train": 0, "test": 0})}
        for index, name in enumerate(dataset.class_names)
    ]
    unlabeled = db.execute(
        select(DatasetImage.id, DatasetImage.original_path)
        .where(DatasetImage.dataset_id == dataset.id, DatasetImage.split == "unlabeled")
        .order_by(DatasetImage.id)
        .limit(THUMBS_PER_CLASS)
    )
    unlabeled_thumbs = [(image_id, _file_name(path)) for image_id, path in unlabeled]
    experiments = db.scalar(select(func.count()).select_from(Experiment)
                            .where(Experiment.dataset_id == dataset.id)) or 0
    source = db.get(Dataset, dataset.derived_from_id) if dataset.derived_from_id else None
    # What was run on the dataset it was made from, to run again on this one and compare.
    source_experiments = list(db.scalars(
        select(Experiment).where(Experiment.dataset_id == source.id)
        .order_by(Experiment.id.desc()).limit(SOURCE_EXPERIMENTS_SHOWN))) if source else []
    # The datasets made from this one by adding labels, newest first.
    made_from = list(db.execute(
        select(Dataset.id, Dataset.name, Dataset.labels_added)
        .where(Dataset.derived_from_id == dataset.id)
        .order_by(Dataset.id.desc()).limit(DERIVED_SHOWN + 1)))
    # What a delete takes with it is counted when Delete is clicked (upload.js).
    return render(
        request, "dataset.html", dataset=dataset, source=source,
        archive_size=dataset_export.size_estimate(dataset),
        made_from=made_from[:DERIVED_SHOWN], more_made_from=len(made_from) > DERIVED_SHOWN,
        source_experiments=source_experiments, source_experiments_shown=SOURCE_EXPERIMENTS_SHOWN,
        classes=classes,
        totals={"train": sum(c["train"] for c in classes), "test": sum(c["test"] for c in classes)},
        unlabeled_thumbs=unlabeled_thumbs, skipped=dataset.skipped[:MAX_SKIPPED_SHOWN],
        warnings=dataset_warnings(db, dataset),
        thumbs_page=thumbs, thumbs_pages=math.ceil(class_count / CLASSES_PER_THUMBS_PAGE),
        thumbs_shown=shown, classes_per_page=CLASSES_PER_THUMBS_PAGE, experiments=experiments,
    )
