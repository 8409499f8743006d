"""REST API for datasets: streaming upload, summaries, image listings, thumbnails, deletion.

What a crash during an upload or a deletion left behind is removed once the web has checked
its data directory against its database (app.startup).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import anyio
import redis
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer
from starlette.requests import ClientDisconnect

from app import add_labels, dataset_export, idempotency, ingest
from app.config import Settings
from app.deps import (
    DatasetId,
    DbDep,
    ImageId,
    PageLimit,
    PageOffset,
    RedisDep,
    SettingsDep,
    page_headers,
)
from app.experiments import unprocessable
from app.live import forget_feeds
from app.models import MAX_ID, Dataset, DatasetImage
from app.responses import (
    FILE_DELETED,
    attachment,
    client_holds,
    csv_body_download,
    human_bytes,
    in_utc,
    one_range,
    send_file,
)
from app.schemas import (
    CSV_NOT_MODIFIED,
    UNREADABLE_BODY_OUT,
    ErrorOut,
    FieldErrorsOut,
    RenameIn,
)
from app.trash import deleted_answer

log = logging.getLogger(__name__)


router = APIRouter(prefix="/api/datasets", tags=["datasets"])

Split = Literal["train", "test", "unlabeled"]


class UploadForm(BaseModel):
    """The multipart form of `POST /api/datasets` (read as a stream, so documented here)."""

    file: bytes = Field(
        json_schema_extra={"format": "binary"},
        description="zip, tar, tar.gz, tar.bz2 or tar.xz: <class>/<image> and "
        "unlabeled/<image>, optional train/ and test/ (or val/) folders, or images plus "
        "labels.csv (path,label)",
    )
    name: str | None = Field(None, max_length=200, description="Defaults to the file name")


class ClassOut(BaseModel):
    name: str
    train: int = Field(description="training images (labeled pool)")
    test: int = Field(description="test images")


class SkippedOut(BaseModel):
    path: str = Field(description="as named in the archive")
    reason: str


class DatasetListItem(BaseModel):
    id: int
    name: str
    created_at: datetime
    classes: list[ClassOut] = Field(description="in class-index order (natural sort)")
    unlabeled: int
    fingerprint: str = Field(description="sha256 over sorted (split, class, image sha256)")
    test_source: Literal["uploaded", "holdout"]
    image_count: int
    size_bytes: int
    skipped_count: int
    derived_from: int | None = Field(
        description="the dataset this one was made from by adding labels (POST "
                    "/api/datasets/{id}/labels), null for an upload; the id stays once that "
                    "dataset is deleted")
    labels_added: int = Field(description="how many labels were added to make it (0 for an "
                                          "upload)")


class DatasetOut(DatasetListItem):
    skipped: list[SkippedOut] = Field(
        description=f"the first {ingest.MAX_SKIPPED_KEPT:,} files the upload skipped, with "
                    "why (skipped_count counts them all)")
    warnings: list[str] = Field(
        default_factory=list,
        description="what was stored but looks like a mistake (class folders whose names "
                    "differ only in letter case; the same images, labels and splits as "
                    "another dataset)")


class ImageOut(BaseModel):
    id: int
    split: Split
    label: int | None = Field(description="class index, null for unlabeled images")
    original_path: str
    width: int
    height: int


class ImagePage(BaseModel):
    total: int
    items: list[ImageOut]


def list_item(dataset: Dataset) -> DatasetListItem:
    return DatasetListItem(
        id=dataset.id, name=dataset.name, created_at=in_utc(dataset.created_at),
        classes=[
            ClassOut(name=name, **dataset.class_counts.get(name, {"train": 0, "test": 0}))
            for name in dataset.class_names
        ],
        unlabeled=dataset.unlabeled_count, fingerprint=dataset.fingerprint,
        test_source=dataset.test_source, image_count=dataset.image_count,
        size_bytes=dataset.size_bytes, skipped_count=dataset.skipped_count,
        derived_from=dataset.derived_from_id, labels_added=dataset.labels_added,
    )


def summary(db: Session, dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        **list_item(dataset).model_dump(),
        skipped=[SkippedOut(**item) for item in dataset.skipped],
        warnings=ingest.dataset_warnings(db, dataset),
    )


def get_dataset_or_404(db: Session, dataset_id: int) -> Dataset:
    dataset = db.get(Dataset, dataset_id)
    if dataset is None:
        raise HTTPException(404, f"dataset {dataset_id} does not exist")
    return dataset


# What a route that streams a multipart form (`ingest.receive_upload`) may answer besides its
# own refusals.
MULTIPART_ANSWERS = {
    400: {"model": ErrorOut, "description": "malformed multipart body"},
    507: {"model": ErrorOut, "description": "the server's disk is full; nothing was kept"},
}


# What a route that takes an Idempotency-Key may answer besides what it makes.
KEYED_ANSWERS = {
    **idempotency.keyed_answers(DatasetOut, "dataset", "form"),
    503: {"model": ErrorOut, "description": "an Idempotency-Key was sent and Redis, which "
          "keeps them, is not reachable: nothing is made"},
}


def form_digest(path: Path, *fields: object) -> str:
    """A digest of a received form: its file's bytes and its other fields (a retry with the
    same Idempotency-Key must send the same)."""
    digest = hashlib.sha256(repr(fields).encode())
    with open(path, "rb") as received:
        while chunk := received.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def made_before(db: Session, live: redis.Redis, key: str | None, path: Path,
                      *fields: object) -> tuple[str, Dataset | None]:
    """The digest of a form received with `key` (`form_digest`: the file at `path`, the other
    `fields`), and the dataset an earlier request with that key made (`idempotency.
    made_before`), or None once this request holds the key; without a key, ("", None)."""
    if key is None:
        return "", None
    digest = await run_in_threadpool(form_digest, path, *fields)
    try:
        return digest, await run_in_threadpool(
            idempotency.made_before, live, key, digest, "dataset",
            lambda made: db.get(Dataset, made))
    except idempotency.KeyRefused as exc:
        raise HTTPException(exc.status_code, exc.message, headers=exc.headers) from None


async def replayed(db: Session, response: Response, dataset: Dataset) -> DatasetOut:
    idempotency.replayed(response, f"/api/datasets/{dataset.id}")
    return await run_in_threadpool(summary, db, dataset)


async def making(live: redis.Redis, key: str | None, digest: str, make) -> Dataset:
    """`await make()`, the dataset a request holding `key` makes (if it sent one): the key is
    held while it takes (minutes for a large upload), remembered once it is made, and freed
    when nothing is."""
    if key is None:
        return await make()
    stop = asyncio.Event()
    keeping = asyncio.create_task(idempotency.keep_claim(live, key, "dataset", stop))
    try:
        dataset = await make()
    except BaseException:
        stop.set()  # an EXPIRE still on its way finds the key gone: no need to wait for it
        with anyio.CancelScope(shield=True):  # also when the server's shutdown cut it
            await run_in_threadpool(idempotency.release, live, key, "dataset")
        raise
    stop.set()
    await keeping  # its last EXPIRE lands before the key is remembered for a day
    try:
        await run_in_threadpool(idempotency.remember, live, key, digest, dataset, "dataset")
    except (redis.RedisError, OSError) as exc:
        # Made and kept: a retry with this key is refused (409) until the claim expires.
        log.warning("dataset %s: Idempotency-Key not remembered: %s", dataset.id, exc)
    return dataset


def multipart_body(form: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its multipart form as a stream, which
    FastAPI cannot see: `form` documents it."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form.model_json_schema()}}}}


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        **MULTIPART_ANSWERS, **KEYED_ANSWERS,
        413: {"model": ErrorOut, "description": "over a size, expansion or file-count limit"},
        415: {"model": ErrorOut, "description": "not multipart, or not a zip or tar archive"},
        422: {"model": ErrorOut, "description": "unsafe or unusable content, or a form field "
              "other than `file` and `name`; says what to fix"},
    },
    openapi_extra=multipart_body(UploadForm),
)
async def upload_dataset(request: Request, response: Response, settings: SettingsDep,
                         db: DbDep, live: RedisDep,
                         idempotency_key: idempotency.IdempotencyKey = None) -> DatasetOut:
    """Upload an archive; it is streamed to disk, verified, and stored all-or-nothing."""
    work_dir = await run_in_threadpool(ingest.new_work_dir, settings)
    try:
        upload = await ingest.receive_upload(
            request.headers, request.stream(), work_dir / "upload.archive",
            settings.max_upload_bytes,
        )
        name = ingest.dataset_name(upload.name, upload.filename)
        digest, earlier = await made_before(db, live, idempotency_key, upload.path,
                                            upload.filename, name)
        if earlier is not None:
            return await replayed(db, response, earlier)

        async def ingest_upload() -> Dataset:
            abandoned = threading.Event()
            watching = asyncio.create_task(_note_disconnect(request, abandoned))
            try:
                return await run_in_threadpool(
                    ingest.ingest_archive, db, settings, upload.path, work_dir, name, abandoned)
            finally:
                watching.cancel()

        dataset = await making(live, idempotency_key, digest, ingest_upload)
    except ingest.IngestError as exc:
        raise HTTPException(exc.status_code, exc.detail) from None
    except (ClientDisconnect, ingest.UploadAbandoned):
        # The user cancelled the upload (or closed the page) before it was stored: nothing
        # is kept, and nobody reads the answer.
        raise HTTPException(400, "the connection closed before the upload was stored"
                            ) from None
    except anyio.get_cancelled_exc_class():
        # Cut by the server's shutdown (its graceful time ran out): uvicorn exits without
        # waiting for a thread, which left the partial upload in tmp/ (kept 10 minutes by
        # the next start), so it goes now, on the event loop.
        ingest.remove_work_dir(work_dir)
        raise
    finally:
        if work_dir.exists():
            await run_in_threadpool(ingest.remove_work_dir, work_dir)
    response.headers["Location"] = f"/api/datasets/{dataset.id}"
    return await run_in_threadpool(summary, db, dataset)


class LabelsForm(BaseModel):
    """The multipart form of `POST /api/datasets/{id}/labels` (read as a stream)."""

    file: bytes = Field(
        json_schema_extra={"format": "binary"},
        description="a CSV of 'path,label' lines (a 'path,label' header is optional): the "
        "path of an unlabeled image as the dataset names it (the path column of "
        "predictions.csv and label-next.csv) and one of the dataset's classes; lines with an "
        "empty label are left out")
    name: str | None = Field(None, max_length=200,
                             description='Defaults to "<dataset name> + <N> labels"')


@router.post(
    "/{dataset_id}/labels",
    status_code=201,
    response_model=DatasetOut,
    responses={
        **MULTIPART_ANSWERS, **KEYED_ANSWERS,
        404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "an image file of the dataset is missing, or "
              "the first request with this Idempotency-Key is still being handled"},
        413: {"model": ErrorOut, "description": "the CSV is over "
              f"{human_bytes(ingest.MAX_LABELS_CSV_BYTES)}"},
        415: {"model": ErrorOut, "description": "not multipart"},
        422: {"model": ErrorOut, "description": "a line the dataset cannot take (a path it "
              "does not have, a class it does not have, an image labeled otherwise), or a "
              "form field other than `file` and `name`; says which"},
    },
    openapi_extra=multipart_body(LabelsForm),
)
async def add_labels_to_dataset(dataset_id: DatasetId, request: Request, response: Response,
                                settings: SettingsDep, db: DbDep, live: RedisDep,
                                idempotency_key: idempotency.IdempotencyKey = None
                                ) -> DatasetOut:
    """Give some of the dataset's unlabeled images a class (the images "Label next" lists,
    say): the answer is a new dataset with those images among the training images of their
    class and everything else the same, its test split included, so that experiments on it
    compare with the earlier dataset's. The earlier dataset stays as it was."""
    source = await run_in_threadpool(get_dataset_or_404, db, dataset_id)
    work_dir = await run_in_threadpool(ingest.new_work_dir, settings)
    try:
        upload = await ingest.receive_upload(
            request.headers, request.stream(), work_dir / "labels.csv",
            ingest.MAX_LABELS_CSV_BYTES, add_labels.UPLOAD)
        digest, earlier = await made_before(db, live, idempotency_key, upload.path,
                                            source.id, upload.name)
        if earlier is not None:
            return await replayed(db, response, earlier)
        dataset = await making(live, idempotency_key, digest, lambda: run_in_threadpool(
            add_labels.add_labels, db, settings, source, upload.path, work_dir, upload.name))
    except ingest.IngestError as exc:
        raise HTTPException(exc.status_code, exc.detail) from None
    except ClientDisconnect:
        raise HTTPException(400, "the connection closed before the labels were received"
                            ) from None
    finally:
        await run_in_threadpool(ingest.remove_work_dir, work_dir)
    response.headers["Location"] = f"/api/datasets/{dataset.id}"
    return await run_in_threadpool(summary, db, dataset)


async def _note_disconnect(request: Request, abandoned: threading.Event) -> None:
    """Sets `abandoned` when the client goes away once its body has been read (verifying a
    large upload takes minutes, and a dataset nobody waits for used to be stored anyway)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    abandoned.set()


@router.get("", response_model=list[DatasetListItem])
def list_datasets(request: Request, response: Response, db: DbDep, limit: PageLimit = None,
                  offset: PageOffset = 0) -> list[DatasetListItem]:
    """Every dataset, newest first (without the skipped-file lists); a page of them with
    `limit` and `offset`."""
    total, datasets = newest_datasets(db, limit, offset)
    page_headers(request, response, total, limit, offset)
    return [list_item(dataset) for dataset in datasets]


def dataset_names(db: Session, ids: set[int]) -> dict[int, str]:
    """The names of the datasets of `ids` that exist, by id (as lists of experiments name
    the datasets they ran on)."""
    return dict(db.execute(select(Dataset.id, Dataset.name)
                           .where(Dataset.id.in_(ids))).tuples().all())


def newest_datasets(db: Session, limit: int | None, offset: int) -> tuple[int, list[Dataset]]:
    """How many datasets there are, and one page of them, newest first (their skipped-file
    lists, up to 1,000 entries each, left unread)."""
    total = db.scalar(select(func.count()).select_from(Dataset)) or 0
    datasets = db.scalars(
        select(Dataset).options(defer(Dataset.skipped))
        .order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit).offset(offset))
    return total, list(datasets)


@router.get("/{dataset_id}", response_model=DatasetOut, responses={404: {"model": ErrorOut}})
def get_dataset(dataset_id: DatasetId, db: DbDep) -> DatasetOut:
    return summary(db, get_dataset_or_404(db, dataset_id))


@router.patch("/{dataset_id}", response_model=DatasetOut, responses={
    404: {"model": ErrorOut}, 422: {"model": FieldErrorsOut}, **UNREADABLE_BODY_OUT})
def rename_dataset(dataset_id: DatasetId, change: RenameIn, db: DbDep) -> DatasetOut:
    """Give the dataset another name (its images, experiments and runs stay as they are)."""
    dataset = get_dataset_or_404(db, dataset_id)
    dataset.name = change.name
    db.commit()
    return summary(db, dataset)


@router.get(
    "/{dataset_id}/images", response_model=ImagePage, responses={404: {"model": ErrorOut}}
)
def list_images(
    dataset_id: DatasetId,
    request: Request,
    response: Response,
    db: DbDep,
    split: Annotated[Split | None, Query()] = None,
    label: Annotated[int | None, Query(ge=0, le=MAX_ID, description="class index")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> ImagePage:
    """A page of a dataset's images in storage order, optionally of one split or class
    (`total` counts them all; X-Total-Count and Link headers as on the other lists)."""
    dataset = get_dataset_or_404(db, dataset_id)
    if label is not None and label >= len(dataset.class_names):  # not an empty page
        raise unprocessable("label", f"dataset {dataset_id} has {len(dataset.class_names)} "
                            f"classes: a class index is 0 to {len(dataset.class_names) - 1}, "
                            f"not {label}", "query")
    conditions = [DatasetImage.dataset_id == dataset_id]
    if split is not None:
        conditions.append(DatasetImage.split == split)
    if label is not None:
        conditions.append(DatasetImage.label == label)
    total = db.scalar(select(func.count()).select_from(DatasetImage).where(*conditions)) or 0
    page_headers(request, response, total, limit, offset)
    images = db.scalars(
        select(DatasetImage).where(*conditions).order_by(DatasetImage.id)
        .limit(limit).offset(offset)
    )
    return ImagePage(total=total, items=[
        ImageOut(id=image.id, split=image.split, label=image.label,
                 original_path=image.original_path, width=image.width, height=image.height)
        for image in images
    ])


@router.get(
    "/{dataset_id}/images/{image_id}/thumbnail",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut},
               206: {"description": "the part a `Range: bytes=...` asked for"},
               304: {"description": "not modified: `If-None-Match` holds this thumbnail's ETag"},
               416: {"description": "the byte range asked for lies outside the thumbnail"}},
)
def image_thumbnail(
    request: Request, dataset_id: DatasetId, image_id: ImageId, db: DbDep,
    settings: SettingsDep,
    size: Annotated[int, Query(
        description="px a side at most: 128, or 512 to see what the image shows",
        json_schema_extra={"enum": [ingest.THUMBNAIL_SIZE, ingest.PREVIEW_SIZE]})] = 128,
) -> Response:
    """A JPEG of at most `size` px a side (never enlarged), made on first request and
    cached."""
    if size not in (ingest.THUMBNAIL_SIZE, ingest.PREVIEW_SIZE):  # each size is cached
        raise unprocessable("size", f"must be {ingest.THUMBNAIL_SIZE} or "
                            f"{ingest.PREVIEW_SIZE}, not {size}", "query")
    dataset = get_dataset_or_404(db, dataset_id)
    image = db.get(DatasetImage, image_id)
    if image is None or image.dataset_id != dataset.id:
        raise HTTPException(404, f"dataset {dataset_id} has no image {image_id}")
    # Ids can be reused after a delete, so browsers revalidate against the image's content
    # and how its thumbnail is made.
    level = ingest.dataset_white_level(settings, dataset)
    version = f"{image.sha256[:32]}-{ingest.thumbnail_version(level, size)}"
    headers = {"Cache-Control": "private, no-cache", "ETag": f'"{version}"'}
    if client_holds(request, headers["ETag"]):  # before making the thumbnail
        return Response(status_code=304, headers=headers)
    try:
        path = ingest.thumbnail(settings, dataset, image, level, size)
    except FileNotFoundError:
        raise HTTPException(404, f"the file of image {image_id} is missing or was replaced"
                            ) from None
    return send_file(request, path, media_type="image/jpeg", headers=headers)


def _export_or_404(db: Session, settings: Settings, dataset_id: int, *, sizes: bool = True
                   ) -> tuple[Dataset, dataset_export.Export]:
    dataset = get_dataset_or_404(db, dataset_id)
    try:
        return dataset, dataset_export.plan(db, settings, dataset, sizes=sizes)
    except FileNotFoundError:
        raise HTTPException(404, detail=FILE_DELETED) from None


@router.get("/{dataset_id}/labels.csv", response_class=Response, responses={
    200: {"content": {"text/csv": {}}}, 404: {"model": ErrorOut},
    304: CSV_NOT_MODIFIED})
def download_labels(request: Request, dataset_id: DatasetId, db: DbDep,
                    settings: SettingsDep) -> Response:
    """Every image's `path,label,split` as an upload reads them: the labels given in the app
    and the test split included (an unlabeled image's label and split are empty). The paths
    are the uploaded ones, within the upload's one top folder where it had one (put the file
    in that folder); the same as in `/archive`."""
    # Its rows alone: the images' files are not looked at (60,000 took 1.4 s).
    dataset, export = _export_or_404(db, settings, dataset_id, sizes=False)
    return csv_body_download(request, export.labels_csv, f"dataset-{dataset.id}-labels.csv")


@router.get("/{dataset_id}/archive", response_class=StreamingResponse, responses={
    200: {"content": {"application/x-tar": {}}},
    206: {"description": "the part a `Range: bytes=...` asked for (one range; `If-Range` "
          "with the ETag resumes a download only if the archive is still the same)"},
    304: {"description": "not modified: `If-None-Match` holds this archive's ETag"},
    404: {"model": ErrorOut}, 416: {"model": ErrorOut, "description": "a range past the end"}})
@router.head("/{dataset_id}/archive", include_in_schema=False)
def download_archive(request: Request, dataset_id: DatasetId, db: DbDep,
                     settings: SettingsDep) -> Response:
    """The dataset as a tar archive to upload again, here or elsewhere: one folder holding
    its images as they were uploaded, at their uploaded paths, and a `labels.csv`
    (`/labels.csv`) that gives the same classes, labels and test split. Streamed from disk
    with its Content-Length; a download that breaks off is short of it, and resumes from
    where it stopped (`curl -C -`, a browser's resume)."""
    dataset, export = _export_or_404(db, settings, dataset_id)
    mtime = int(in_utc(dataset.created_at).timestamp())
    etag = dataset_export.tag(export, mtime)
    name = f"{export.folder}.tar"
    headers = {"Content-Disposition": attachment(name), "Cache-Control": "no-store",
               "Accept-Ranges": "bytes", "ETag": etag}
    if client_holds(request, etag):  # as every download answers one who has it already
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-store"})
    length = dataset_export.size(export, mtime)
    part = one_range(request, length, etag) if request.method == "GET" else None
    if part is not None:
        start, end = part
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
        length = end - start
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":  # its length without reading the images
        return Response(media_type="application/x-tar", headers=headers)
    return StreamingResponse(dataset_export.archive(export, mtime, *(part or ())),
                             status_code=200 if part is None else 206,
                             media_type="application/x-tar",
                             headers=headers)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"model": ErrorOut},
               409: {"model": ErrorOut, "description": "a run of it is queued or running, or "
                    "queued or running runs start from one of its runs' models"}},
)
def delete_dataset(dataset_id: DatasetId, db: DbDep, settings: SettingsDep,
                   live: RedisDep) -> Response:
    """Delete the dataset, its files, and its experiments and runs (with their files)."""
    dataset = get_dataset_or_404(db, dataset_id)
    try:
        experiment_ids, run_ids, aside = ingest.delete_dataset(db, settings, dataset)
    except ingest.IngestError as exc:
        raise HTTPException(exc.status_code, exc.detail) from None
    forget_feeds(live, experiment_ids, run_ids)
    # Its image and run folders were moved aside: they are removed once the answer has gone,
    # and the database's pages of its images' rows and runs' metric points are given back.
    return deleted_answer(settings, aside)
