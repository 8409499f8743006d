"""A run's confusion matrix in the form a client asks for (`GET /api/runs/{id}?confusion=`):
dense, as it always came (classes² numbers: 50 MB of JSON at 5,000 classes, which the run page
read to show 25 cells), sparse (diagonal, row totals and the cells off the diagonal that are
not 0) or none. Real uvicorn and Redis, SQLite and PostgreSQL; the runs are recorded as the
worker records them, without training."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.confusion import dense_confusion, sparse_confusion
from app.db import session_scope
from app.models import Run, split_metrics
from tests.support import LiveServer, add_dataset_row
from tests.test_datasets_support import dataset_server
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep

# 4 classes: class 1 taken for 0 and 3, class 3 for 0; class 2 has no test image.
MATRIX = [[5, 0, 0, 0],
          [2, 3, 0, 1],
          [0, 0, 0, 0],
          [4, 0, 0, 0]]
METRICS = {"test_top1": 8 / 15, "test_mean_class_acc": 0.4, "confusion_matrix": MATRIX,
           "per_class_acc": [1.0, 0.5, None, 0.0],
           "pseudo_label_quality": {"predicted_distribution": [0.4, 0.2, 0.2, 0.2]}}


@pytest.fixture
def server(database_url: str, tmp_path: Path, redis_url: str) -> Iterator[LiveServer]:
    """uvicorn on SQLite, then on PostgreSQL (their JSON columns read back differently)."""
    with dataset_server(tmp_path, redis_url, database_url=database_url) as live:
        yield live


# How a run may keep its matrix: sparse in `details`, as the worker records it since 0010;
# dense in `details`, as an older worker recorded it (before 0010, or during an upgrade);
# dense in `metrics`, as a run recorded before migration 0008 was left.
STORED = {"sparse": split_metrics(METRICS),
          "dense": ({k: v for k, v in METRICS.items() if k != "confusion_matrix"},
                    {"confusion_matrix": MATRIX}),
          "in-metrics": (METRICS, {})}


def finished_run(server: LiveServer, client: httpx.Client, *, stored: str = "sparse") -> int:
    """A succeeded run with METRICS, kept as STORED[stored] says."""
    _, (run_id,) = start_sweep(client, add_dataset_row(server.database_url), seeds=[0],
                               methods=["fine-tune"])
    with session_scope(server.database_url) as session:
        run = session.get(Run, run_id)
        run.metrics, run.details = STORED[stored]
        run.step = run.total_steps
    end_as_worker(server.database_url, redis.Redis.from_url(server.redis_url), run_id,
                  "succeeded")
    return run_id


def expanded(sparse: dict) -> list[list[int]]:
    """The dense matrix a sparse one stands for."""
    size = sparse["size"]
    matrix = [[sparse["diagonal"][i] if i == j else 0 for j in range(size)] for i in range(size)]
    for true, predicted, count in sparse["cells"]:
        matrix[true][predicted] = count
    return matrix


@pytest.mark.parametrize("stored", STORED)
def test_each_form_of_the_matrix_says_the_same(server, stored):
    with server.client() as client:
        run_id = finished_run(server, client, stored=stored)
        read = f"/api/runs/{run_id}"
        plain = client.get(read)
        asked = {form: client.get(read, params={"confusion": form})
                 for form in ("dense", "sparse", "none")}
    assert plain.status_code == 200 and all(r.status_code == 200 for r in asked.values())
    # Without the parameter, the answer is what it always was: the whole matrix.
    assert plain.json()["metrics"] == METRICS
    assert asked["dense"].content == plain.content

    sparse = asked["sparse"].json()["metrics"]
    assert "confusion_matrix" not in sparse
    assert sparse.pop("confusion_sparse") == {
        "size": 4, "diagonal": [5, 3, 0, 0], "row_totals": [5, 6, 0, 4],
        "cells": [[1, 0, 2], [1, 3, 1], [3, 0, 4]]}  # off the diagonal, not 0, in order
    assert expanded(asked["sparse"].json()["metrics"]["confusion_sparse"]) == MATRIX
    none = asked["none"].json()["metrics"]
    rest = {key: value for key, value in METRICS.items() if key != "confusion_matrix"}
    assert sparse == none == rest  # every other metric as it was
    # The rest of the record does not depend on the form.
    bodies = [response.json() for response in (plain, *asked.values())]
    for body in bodies:
        del body["metrics"]
    assert all(body == bodies[0] for body in bodies)


def test_a_run_kept_sparse_answers_each_form_as_a_run_kept_dense(server):
    """Byte for byte: the metrics of a run recorded since 0010 and of one recorded before it
    (or not yet migrated) read the same in every form; a run recorded before 0008 the same
    values, its matrix where it always was among them."""
    with server.client() as client:
        runs = {stored: finished_run(server, client, stored=stored) for stored in STORED}
        answers = {(stored, form): client.get(f"/api/runs/{run_id}", params=params).json()
                   for stored, run_id in runs.items()
                   for form, params in (("plain", {}), ("dense", {"confusion": "dense"}),
                                        ("sparse", {"confusion": "sparse"}),
                                        ("none", {"confusion": "none"}))}
    for form in ("plain", "dense", "sparse", "none"):
        sparse, dense, old = (answers[stored, form]["metrics"] for stored in STORED)
        assert json.dumps(sparse) == json.dumps(dense), form  # same keys, order and numbers
        assert old == dense, form
    assert answers["sparse", "plain"]["metrics"]["confusion_matrix"] == MATRIX


@pytest.mark.parametrize("matrix", [
    [], [[0]], [[7]], [[0, 0], [0, 0]], [[0, 3], [4, 0]],
    [[(true * 7 + predicted * 3) % 5 for predicted in range(9)] for true in range(9)]])
def test_the_sparse_form_makes_the_same_dense_matrix_again(matrix):
    assert dense_confusion(sparse_confusion(matrix)) == matrix


def test_a_run_without_a_matrix_has_none_in_any_form(server):
    with server.client() as client:
        _, (run_id,) = start_sweep(client, add_dataset_row(server.database_url), seeds=[0],
                                   methods=["fine-tune"])
        forms = [client.get(f"/api/runs/{run_id}", params=params).json()["metrics"]
                 for params in ({}, {"confusion": "sparse"}, {"confusion": "none"})]
    assert forms == [{}, {}, {}]  # queued: no metrics yet


def test_a_form_it_does_not_know_is_a_422_that_names_the_forms(live_server):
    with live_server.client() as client:
        _, (run_id,) = start_sweep(client, add_dataset_row(live_server.database_url),
                                   seeds=[0], methods=["fine-tune"])
        answers = {value: client.get(f"/api/runs/{run_id}", params={"confusion": value})
                   for value in ("Sparse", "", "full", "sparse,none", "sparse ", "0")}
        missing = client.get("/api/runs/424242", params={"confusion": "sparse"})
    for value, response in answers.items():
        assert response.status_code == 422, (value, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == ["query", "confusion"], value
        assert error["msg"] == "Input should be 'dense', 'sparse' or 'none'", value
    assert missing.status_code == 404


def test_the_openapi_description_documents_the_forms(live_server):
    with live_server.client() as client:
        schema = client.get("/openapi.json").json()
    [parameter] = [p for p in schema["paths"]["/api/runs/{run_id}"]["get"]["parameters"]
                   if p["name"] == "confusion"]
    assert parameter["in"] == "query" and not parameter.get("required")
    assert parameter["schema"]["enum"] == ["dense", "sparse", "none"]
    assert parameter["schema"]["default"] == "dense"
    for words in ("`confusion_sparse`", "`row_totals`", "[[true, predicted, count], ...]"):
        assert words in parameter["description"], words
    metrics = schema["components"]["schemas"]["RunOut"]["properties"]["metrics"]
    assert "confusion=sparse" in metrics["description"]
