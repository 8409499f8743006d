"""The API answers as /openapi.json says, as a client generated from it reads it: real uvicorn,
SQLite and Redis, a request of each kind to every operation (good ones, refused ones, cached
and ranged ones), each answer checked against the description: its status is one the
operation lists, its JSON body validates against that status's schema, the headers the
description requires are there, and the headers clients page, cache and resume by that it
sends are described. A 422 for `?top=0` was a list where the description said a message; a
JSON body over 1 MiB was a 413 it did not list; Location, X-Total-Count, ETag and the range
headers were described nowhere."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import pytest
import redis

from app.db import session_scope
from app.models import Artifact
from tests.support import LiveServer
from tests.test_datasets_support import class_entries, image_bytes, upload, zip_bytes
from tests.test_experiments_cancel_delete import SWEEP, add_run_files, end_as_worker, start_sweep

TOKEN = "contract-token"
SERVER_ENV = {"SELFTUNE_API_TOKEN": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Headers a client acts on: sent, they must be described for that answer.
WATCHED = ("location", "x-total-count", "link", "etag", "accept-ranges", "content-range",
           "retry-after", "idempotent-replayed", "www-authenticate")


@dataclass
class Call:
    method: str
    template: str  # the description's path
    path: str
    options: dict[str, Any]


def operation_of(schema: dict, call: Call) -> dict:
    return schema["paths"][call.template][call.method.lower()]


def check(schema: dict, call: Call, response: httpx.Response) -> list[str]:
    """What in the answer the description does not say (empty: it conforms)."""
    operation = operation_of(schema, call)
    where = f"{call.method} {call.path} -> {response.status_code}"
    documented = operation["responses"].get(str(response.status_code))
    if documented is None:
        return [f"{where}: status not described ({sorted(operation['responses'])})"]
    problems = []
    content_type = response.headers.get("content-type", "").split(";")[0]
    described = documented.get("content", {})
    if described and content_type and call.method != "HEAD" and response.status_code != 304:
        if content_type not in described and not (
                content_type == "application/json" and "application/json" in described):
            problems.append(f"{where}: content type {content_type} not in {sorted(described)}")
        body_schema = described.get("application/json", {}).get("schema")
        if content_type == "application/json" and body_schema is not None:
            try:
                jsonschema.Draft202012Validator(
                    {**body_schema, "components": schema["components"]}).validate(
                    response.json())
            except jsonschema.ValidationError as exc:
                problems.append(f"{where}: body {response.text[:200]!r} does not validate: "
                                f"{exc.message[:200]}")
    headers = {name.lower(): value for name, value in documented.get("headers", {}).items()}
    for name, header in headers.items():
        if header.get("required") and name not in response.headers:
            problems.append(f"{where}: required header {name} missing")
    for name in WATCHED:
        if name in response.headers and name not in headers:
            problems.append(f"{where}: sends {name} without describing it")
    return problems


@pytest.fixture(scope="module")
def installation(server: LiveServer) -> dict[str, Any]:
    """A dataset, an experiment whose first run succeeded with its files, and another's
    run still queued."""
    live = redis.Redis.from_url(server.redis_url, decode_responses=True)
    with server.client(headers=AUTH) as client:
        made = upload(client, zip_bytes({
            **class_entries(("cat", "dog"), per_class=4),
            **{f"unlabeled/u{n}.png": image_bytes(4_000 + n) for n in range(3)}}))
        assert made.status_code == 201, made.text
        dataset = made.json()
        experiment_id, (run_id, queued_id, *_) = start_sweep(client, dataset["id"])
        image_id = client.get(f"/api/datasets/{dataset['id']}/images").json()["items"][0]["id"]
    folder = add_run_files(server.data_dir, server.database_url, run_id)
    with session_scope(server.database_url) as session:
        for name, data in {"config.json": json.dumps({
                "architecture": "test_efficientnet", "num_classes": 2,
                "label_names": ["cat", "dog"],
                "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3,
                                   "std": [0.5] * 3, "interpolation": "bilinear",
                                   "crop_pct": 1.0}}).encode(),
                "predictions.csv": b"path,label,confidence,margin\nunlabeled/u0.png,cat,0.6,0.2\n",
                "training.json": b'{"metrics": {"test_top1": 0.5}}'}.items():
            (folder / name).write_bytes(data)
            session.add(Artifact(run_id=run_id, name=name, path=f"runs/{run_id}/{name}",
                                 size_bytes=len(data), sha256="0" * 64))
    end_as_worker(server.database_url, live, run_id, "succeeded")
    return {"dataset": dataset["id"], "experiment": experiment_id, "run": run_id,
            "queued": queued_id, "image": image_id}


def calls(ids: dict[str, Any], etags: dict[str, str]) -> list[Call]:
    d, e, r, q, i = ids["dataset"], ids["experiment"], ids["run"], ids["queued"], ids["image"]
    png = ("a.png", image_bytes(77))
    big = {**SWEEP, "dataset_id": d, "name": "x" * (1 << 20)}
    return [
        Call("GET", "/api/health", "/api/health", {}),
        Call("GET", "/api/datasets", "/api/datasets", {"params": {"limit": 1}}),
        Call("GET", "/api/datasets", "/api/datasets", {"params": {"limit": 0}}),
        Call("POST", "/api/datasets", "/api/datasets", {
            "files": {"file": ("b.zip", zip_bytes(class_entries(("ant", "bee"), seed=9)))},
            "headers": {"Idempotency-Key": "contract-1"}}),
        Call("POST", "/api/datasets", "/api/datasets", {
            "files": {"file": ("b.zip", zip_bytes(class_entries(("ant", "bee"), seed=9)))},
            "headers": {"Idempotency-Key": "contract-1"}}),  # replayed
        Call("POST", "/api/datasets", "/api/datasets", {
            "files": {"file": ("b.zip", b"PK")}, "headers": {"Idempotency-Key": "bad key"}}),
        Call("POST", "/api/datasets/{dataset_id}/labels", f"/api/datasets/{d}/labels",
             {"files": {"file": ("labels.csv", b"unlabeled/u0.png,cat\n")}}),
        Call("POST", "/api/datasets/{dataset_id}/labels", "/api/datasets/0/labels",
             {"files": {"file": ("labels.csv", b"unlabeled/u0.png,cat\n")}}),
        Call("GET", "/api/datasets/{dataset_id}", f"/api/datasets/{d}", {}),
        Call("GET", "/api/datasets/{dataset_id}", "/api/datasets/999999", {}),
        Call("PATCH", "/api/datasets/{dataset_id}", f"/api/datasets/{d}",
             {"json": {"name": "renamed"}}),
        Call("PATCH", "/api/datasets/{dataset_id}", f"/api/datasets/{d}", {"json": {"name": ""}}),
        Call("PATCH", "/api/datasets/{dataset_id}", f"/api/datasets/{d}",
             {"json": {"name": "x" * (1 << 20)}}),
        Call("GET", "/api/datasets/{dataset_id}/images", f"/api/datasets/{d}/images",
             {"params": {"limit": 2}}),
        Call("GET", "/api/datasets/{dataset_id}/images/{image_id}/thumbnail",
             f"/api/datasets/{d}/images/{i}/thumbnail", {}),
        Call("GET", "/api/datasets/{dataset_id}/images/{image_id}/thumbnail",
             f"/api/datasets/{d}/images/{i}/thumbnail",
             {"headers": {"If-None-Match": etags.get("thumbnail", '"x"')}}),
        Call("GET", "/api/datasets/{dataset_id}/images/{image_id}/thumbnail",
             f"/api/datasets/{d}/images/{i}/thumbnail", {"headers": {"Range": "bytes=0-9"}}),
        Call("GET", "/api/datasets/{dataset_id}/images/{image_id}/thumbnail",
             f"/api/datasets/{d}/images/{i}/thumbnail",
             {"headers": {"Range": "bytes=99999999-"}}),
        Call("GET", "/api/datasets/{dataset_id}/labels.csv", f"/api/datasets/{d}/labels.csv", {}),
        Call("GET", "/api/datasets/{dataset_id}/archive", f"/api/datasets/{d}/archive",
             {"headers": {"Range": "bytes=0-99"}}),
        Call("GET", "/api/datasets/{dataset_id}/archive", f"/api/datasets/{d}/archive",
             {"headers": {"Range": "bytes=999999999-"}}),
        Call("GET", "/api/experiments", "/api/experiments", {}),
        Call("POST", "/api/experiments", "/api/experiments",
             {"json": {**SWEEP, "dataset_id": d, "seeds": [0], "methods": ["fine-tune"]}}),
        Call("POST", "/api/experiments", "/api/experiments", {"json": big}),
        Call("POST", "/api/experiments/check", "/api/experiments/check",
             {"json": {**SWEEP, "dataset_id": d}}),
        Call("POST", "/api/experiments/check", "/api/experiments/check", {"json": big}),
        Call("GET", "/api/experiments/compare.csv", "/api/experiments/compare.csv",
             {"params": [("ids", e), ("ids", "x")]}),
        Call("GET", "/api/experiments/compare.csv", "/api/experiments/compare.csv",
             {"params": [("ids", e)]}),
        Call("GET", "/api/experiments/{experiment_id}", f"/api/experiments/{e}", {}),
        Call("PATCH", "/api/experiments/{experiment_id}", f"/api/experiments/{e}",
             {"json": {"name": "  "}}),
        Call("GET", "/api/experiments/{experiment_id}/runs.csv",
             f"/api/experiments/{e}/runs.csv", {}),
        Call("GET", "/api/experiments/{experiment_id}/summary.csv",
             f"/api/experiments/{e}/summary.csv", {}),
        Call("GET", "/api/runs/{run_id}", f"/api/runs/{r}", {}),
        Call("GET", "/api/runs/{run_id}/metrics", f"/api/runs/{r}/metrics", {}),
        Call("POST", "/api/runs/{run_id}/cancel", f"/api/runs/{r}/cancel", {}),
        Call("POST", "/api/runs/{run_id}/requeue", f"/api/runs/{q}/requeue", {}),
        Call("GET", "/api/runs/{run_id}/files/{name}", f"/api/runs/{r}/files/model.safetensors",
             {"headers": {"Range": "bytes=0-9"}}),
        Call("GET", "/api/runs/{run_id}/files/{name}", f"/api/runs/{r}/files/training.json",
             {}),
        Call("GET", "/api/runs/{run_id}/files/{name}", f"/api/runs/{q}/files/model.safetensors",
             {}),
        Call("GET", "/api/runs/{run_id}/checkpoint", f"/api/runs/{r}/checkpoint",
             {"headers": {"If-None-Match": etags.get("checkpoint", '"x"')}}),
        Call("GET", "/api/runs/{run_id}/predictions.csv", f"/api/runs/{r}/predictions.csv", {}),
        Call("GET", "/api/runs/{run_id}/label-next.csv", f"/api/runs/{r}/label-next.csv", {}),
        Call("GET", "/api/runs/{run_id}/model.onnx", f"/api/runs/{q}/model.onnx", {}),
        Call("POST", "/api/runs/{run_id}/predict", f"/api/runs/{r}/predict",
             {"files": [("file", png)]}),
        Call("POST", "/api/runs/{run_id}/predict", f"/api/runs/{r}/predict",
             {"files": [("file", png)], "params": {"top": 0}}),
        Call("POST", "/api/runs/{run_id}/predict", f"/api/runs/{q}/predict",
             {"files": [("file", png)]}),
        Call("GET", "/api/runs/{run_id}/events", f"/api/runs/{r}/events",
             {"headers": {"Last-Event-ID": "99999999999999-0"}}),
        Call("DELETE", "/api/experiments/{experiment_id}", "/api/experiments/999999", {}),
    ]


def test_every_answer_is_as_the_description_says(server: LiveServer, installation) -> None:
    with server.client(headers=AUTH) as client:
        schema = client.get("/openapi.json").json()
        etags = {
            "thumbnail": client.get(f"/api/datasets/{installation['dataset']}/images/"
                                    f"{installation['image']}/thumbnail").headers["etag"],
            "checkpoint": client.get(f"/api/runs/{installation['run']}/checkpoint"
                                     ).headers["etag"]}
        problems, seen = [], set()
        for call in calls(installation, etags):
            response = client.request(call.method, call.path, **call.options)
            problems += check(schema, call, response)
            seen.add((call.template, response.status_code))
        # Without the token, with the cookie the login page sets instead.
        refused = Call("GET", "/api/datasets", "/api/datasets", {})
    with httpx.Client(base_url=server.url, timeout=30) as stranger:
        problems += check(schema, refused, stranger.get("/api/datasets"))
    with httpx.Client(base_url=server.url, timeout=30,
                      cookies={"selftune_token": TOKEN}) as browser:
        assert browser.get("/api/datasets").status_code == 200
    assert problems == [], "\n".join(problems)
    # The answers the calls were meant to draw (a call drawing another says nothing of it).
    assert {("/api/experiments/compare.csv", 422), ("/api/experiments/check", 413),
            ("/api/datasets/{dataset_id}/images/{image_id}/thumbnail", 304),
            ("/api/datasets/{dataset_id}/images/{image_id}/thumbnail", 206),
            ("/api/datasets/{dataset_id}/images/{image_id}/thumbnail", 416),
            ("/api/runs/{run_id}/predict", 422), ("/api/datasets", 200),
            ("/api/datasets", 201), ("/api/runs/{run_id}/files/{name}", 206),
            ("/api/runs/{run_id}/checkpoint", 304)} <= seen
    assert schema["components"]["securitySchemes"]["TokenCookie"]["name"] == "selftune_token"
    # A run's feed is not said to send an experiment's end; an experiment's is.
    feeds = {path: schema["paths"][path]["get"]["responses"]["200"]["description"]
             for path in ("/api/runs/{run_id}/events", "/api/experiments/{experiment_id}/events")}
    assert "experiment_end" not in feeds["/api/runs/{run_id}/events"]
    assert "`experiment_end`: Every run" in feeds["/api/experiments/{experiment_id}/events"]
    assert all("`retry: 2000`" in text for text in feeds.values())
    rename = schema["components"]["schemas"]["RenameIn"]["properties"]["name"]
    assert rename["minLength"] == 1 and re.compile(rename["pattern"]).search("   ") is None


def test_every_operation_is_described_with_what_any_route_can_answer(server: LiveServer) -> None:
    with server.client(headers=AUTH) as client:
        schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/api/") and path != "/api/health":
                assert "503" in responses, (method, path)
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                assert "413" in responses, (method, path)
            if "206" in responses:
                names = {p["name"] for p in operation["parameters"]}
                assert {"Range", "If-Range"} <= names, (method, path)
