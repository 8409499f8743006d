"""POST /api/experiments: what a user can get wrong gets a 4xx that says what to fix."""

from __future__ import annotations

import html
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
import timm
from safetensors.torch import save_file
from sqlalchemy import func, select, text

from app import idempotency
from app.config import Settings
from app.db import session_scope, upgrade_to_head
from app.experiments import decoded_bytes
from app.live import WORKER_KEY_PREFIX
from app.models import Dataset, Experiment, Run
from app.schemas import ErrorOut, ExperimentIn, FieldErrorsOut
from tests.conftest import reset_redis
from tests.support import LiveServer, add_dataset_row, app_env, start_server


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, redis_url):
    """One server for the module: validation never changes what the next test sees."""
    root = tmp_path_factory.mktemp("validation")
    reset_redis(redis_url)
    settings = Settings(data_dir=root / "data", redis_url=redis_url)
    upgrade_to_head(settings.sqlalchemy_url)
    # A model hub that does not answer (whatever this machine's network), and a Hugging Face
    # cache of the module's own.
    env = {**app_env(settings.data_dir, settings.sqlalchemy_url, redis_url),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(root / "hub"),
           "HF_HUB_OFFLINE": "0"}
    url, process = start_server(env, root / "uvicorn.log")
    yield LiveServer(url, settings.data_dir, settings.sqlalchemy_url, redis_url, process, env)
    process.stop()


@pytest.fixture
def settings(live_server):
    return Settings(data_dir=live_server.data_dir, redis_url=live_server.redis_url)


def counts(url: str) -> tuple[int, int]:
    with session_scope(url) as session:
        return (session.scalar(select(func.count()).select_from(Experiment)),
                session.scalar(select(func.count()).select_from(Run)))


@pytest.fixture
def dataset_id(settings) -> int:
    return add_dataset_row(settings.sqlalchemy_url)


def body(default_dataset_id: int, **changes) -> dict:
    base = {"dataset_id": default_dataset_id, "backbone": "test_efficientnet",
            "methods": ["self-tuning"], "budgets": [0.1], "seeds": [0], "preset": "quick",
            "overrides": {"pretrained": False}}
    base.update(changes)
    return base


def messages(response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " | ".join(
        f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)


@pytest.mark.parametrize("changes,status,expected", [
    ({"dataset_id": 999}, 422, "dataset 999 does not exist"),
    ({"dataset_id": 2**31}, 422, "dataset_id: Input should be less than or equal to 2147483647"),
    ({"dataset_id": 10**20}, 422, "dataset_id: Input should be less than or equal to"),
    ({"dataset_id": 0}, 422, "dataset_id: Input should be greater than or equal to 1"),
    ({"name": "nul\u0000name"}, 422, "name: Value error, must not contain control characters"),
    ({"name": "two\nlines"}, 422, "must not contain control characters"),
    ({"backbone": "a\u0000.safetensors"}, 422, "backbone: Value error, must not contain"),
    ({"backbone": "vit_tiny_patch16_224"}, 422, "takes 224 px images only: set image_size"),
    ({"backbone": "deit_tiny_distilled_patch16_224"}, 422, "has two classifier heads"),
    ({"backbone": "no_such_net"}, 422, "unknown backbone 'no_such_net'"),
    ({"backbone": "../../etc/passwd.safetensors"}, 422, "inside the data directory"),
    ({"methods": ["magic"]}, 422, "methods.0"),
    ({"methods": []}, 422, "methods: choose at least one method"),
    ({"budgets": []}, 422, "budgets: give at least one label budget (15%, 0.15, 4/class or all)"),
    ({"seeds": []}, 422, "seeds: give at least one seed"),
    ({"budgets": [1.5]}, 422, "must be in (0, 1]"),
    ({"budgets": [0]}, 422, "must be in (0, 1]"),
    ({"budgets": [{"per_class": 0}]}, 422, "per_class"),
    ({"budgets": ["most"]}, 422, "budgets[0]: budget 'most': use a fraction such as 0.05, "
     '"5%", {"per_class": 4}, "4/class" or "all"'),
    # JSON has numbers; the message said "use a fraction such as 0.05" of "0.05".
    ({"budgets": ["0.05"]}, 422,
     "budgets[0]: budget '0.05': a fraction is a JSON number, 0.05 without quotes (or \"5%\")"),
    ({"budgets": [" .5 "]}, 422, "a fraction is a JSON number, 0.5 without quotes (or \"50%\")"),
    ({"budgets": ["5"]}, 422, "budgets[0]: budget '5': use a fraction such as 0.05, "),
    ({"budgets": ["150%"]}, 422, "budget fraction 1.5 must be in (0, 1]"),
    ({"budgets": ["0/class"]}, 422, "per_class 0 must be an integer >= 1"),
    ({"budgets": [0.1, 0.1]}, 422, "listed twice"),
    # Not "all is listed twice": nobody typed it twice.
    ({"budgets": [1.0, "all"]}, 422, "budgets[1]: the same budget as budgets[0] (all)"),
    ({"budgets": [0.05, "5%"]}, 422, "budgets[1]: the same budget as budgets[0] (5%)"),
    ({"budgets": [0.1, 0.1000001]}, 422, "0.1000001 and 0.1 both read 10%"),
    # Two classes of 10 labeled images: both keep one image of each, or every image.
    ({"budgets": [0.01, 0.02]}, 422, "budgets[1]: 2% keeps the same 2 labeled images as 1%"),
    ({"budgets": ["all", {"per_class": 10}]}, 422, "keeps the same 20 labeled images as all"),
    ({"budgets": [True]}, 422, "budgets.0.float: must be a number, not true"),
    ({"seeds": [True]}, 422, "seeds.0: must be a whole number, not true"),
    ({"seeds": ["3"]}, 422, 'seeds.0: must be a whole number, not "3"'),
    # Not pydantic's "Input should be a valid integer, got a number with a fractional part"
    # beside the form's field; and a list typed without commas is told so.
    ({"overrides": {"iterations": 2.5}}, 422,
     "overrides.iterations: must be a whole number, not 2.5"),
    ({"overrides": {"lr_milestones": ["0.5 0.8"]}}, 422,
     'overrides.lr_milestones.0: must be a number, not "0.5 0.8": separate the values with '
     "commas"),
    ({"backbone": "   "}, 422, "backbone: name a backbone: a timm architecture "
     "(tf_efficientnet_lite0 has its weights offline) or an earlier run's model, "
     "runs/<run id>/model.safetensors"),
    # Not pydantic's "String should have at least 1 character": the form shows it.
    ({"backbone": ""}, 422, "backbone: name a backbone: a timm architecture"),
    ({"overrides": {"iterations": "400"}}, 422, "overrides.iterations"),
    ({"overrides": {"pretrained": "no"}}, 422, "overrides.pretrained"),
    ({"seeds": [0, 0]}, 422, "seed 0 is listed twice"),
    ({"seeds": [3, 1, 3, 1, 2]}, 422, "seeds 1 and 3 are listed twice"),
    ({"methods": ["fine-tune", "fine-tune"]}, 422, "method fine-tune is listed twice"),
    ({"seeds": [-1]}, 422, "seeds must be between"),
    ({"preset": "huge"}, 422, "preset"),
    ({"overrides": {"iterations": 0}}, 422, "iterations"),
    ({"overrides": {"lr": -1}}, 422, "lr"),
    ({"overrides": {"dropout": 0.5}}, 422, "dropout"),
    ({"overrides": {"lr_milestones": [0.8, 0.4], "pretrained": False}}, 422,
     "must be increasing fractions"),
    ({"overrides": {"lr_milestones": ["soon"]}}, 422, "lr_milestones"),
    ({"overrides": {"cpu_threads": -1}}, 422, "cpu_threads"),
    ({"overrides": {"num_workers": -2}}, 422, "num_workers"),
    ({"overrides": {"ema_momentum": 1.5}}, 422, "ema_momentum"),
    ({"overrides": {"momentum": 1.0}}, 422, "momentum"),
    ({"overrides": {"unlabeled_batch_size": -1}}, 422, "unlabeled_batch_size"),
    ({"overrides": {"labeled_query_view": "blurry"}}, 422, "labeled_query_view"),
    # A 1x1 last feature map of one image: batch norm fails at the first step of every run.
    ({"overrides": {"batch_size": 1, "image_size": 32, "pretrained": False}}, 422,
     "overrides.batch_size: batch_size 1 at 32 px cannot train test_efficientnet"),
    ({"methods": ["self-tuning", "fine-tune", "fixmatch"],
      "budgets": [0.1, 0.2, 0.3, 0.4, 0.5], "seeds": [0, 1, 2, 3, 4]}, 422, "75 runs"),
])
def test_bad_experiment_is_rejected_with_a_message_and_stores_nothing(
    live_server, dataset_id, changes, status, expected
):
    before = counts(live_server.database_url)
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(dataset_id, **changes))
        checked = client.post("/api/experiments/check", json=body(dataset_id, **changes))
    assert response.status_code == status, response.text
    assert expected in messages(response)
    assert counts(live_server.database_url) == before
    # The start form's check refuses it in the same words.
    assert (checked.status_code, checked.json()) == (status, response.json())


def test_hub_weights_the_server_cannot_get_are_refused_and_cached_ones_accepted(
    live_server, dataset_id
):
    """Every run of such a model failed, each after a minute of download retries."""
    hub_model = body(dataset_id, backbone="resnet18", methods=["fine-tune"],
                     overrides={"pretrained": True, "image_size": 64})
    before = counts(live_server.database_url)
    with live_server.client() as client:
        refused = client.post("/api/experiments", json=hub_model)
        assert refused.status_code == 422, refused.text
        assert counts(live_server.database_url) == before
        text = messages(refused)
        assert "cannot get the pre-trained weights of 'resnet18': the model hub " in text
        assert "(http://127.0.0.1:9) cannot be reached from this server" in text
        assert "Backbones that work offline here: tf_efficientnet_lite0" in text
        # The form's control by its name on the form, not only the API's field.
        assert text.endswith("or set pretrained to false (on the form, untick “Start from "
                             "pre-trained weights”) to train from scratch")

        # Weights in the server's Hugging Face cache (as a download once left them) do.
        snapshot = live_server.data_dir.parent / "hub" / "models--timm--resnet18.a1_in1k"
        (snapshot / "refs").mkdir(parents=True)
        (snapshot / "refs" / "main").write_text("0" * 40)
        (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (snapshot / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"{}")
        created = client.post("/api/experiments", json=hub_model)
        assert created.status_code == 201, created.text
        experiment = created.json()["id"]
        assert client.post(f"/api/experiments/{experiment}/cancel").status_code == 200
        assert client.delete(f"/api/experiments/{experiment}").status_code == 204


def test_a_class_without_labeled_images_cannot_get_a_budget(live_server, settings):
    dataset_id = add_dataset_row(settings.sqlalchemy_url, {"a": {"train": 3, "test": 1},
                                                           "b": {"train": 0, "test": 2}})
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(dataset_id))
    assert response.status_code == 422
    assert "['b'] have no labeled training image" in messages(response)


def test_a_count_per_class_no_class_has_and_a_vanishing_fraction_are_refused(
    live_server, settings
):
    """{"per_class": 30} on classes of 20 and 12 kept every label while every page called it
    "30/class"; 1e-300 kept one per class under the name "1e-298%"."""
    dataset_id = add_dataset_row(settings.sqlalchemy_url, {"a": {"train": 20, "test": 2},
                                                           "b": {"train": 12, "test": 2}})
    with live_server.client() as client:
        too_many = client.post("/api/experiments", json=body(
            dataset_id, budgets=[0.5, {"per_class": 30}]))
        vanishing = client.post("/api/experiments", json=body(dataset_id, budgets=[1e-300]))
        assert (too_many.status_code, vanishing.status_code) == (422, 422)
        assert messages(too_many) == (
            "body.budgets: budgets[1]: 30/class is more than any class holds (the largest has "
            "20 labeled training images), so it keeps every label: use \"all\", or at most 20 "
            "per class")
        assert messages(vanishing) == (
            "body.budgets: budgets[0]: budget fraction 1e-300 is below 0.0001 %: for the fewest "
            "labels use {'per_class': 1}")
        # A count more than some classes hold keeps all of those, and is as asked elsewhere.
        capped = client.post("/api/experiments", json=body(
            dataset_id, budgets=[{"per_class": 15}, {"per_class": 20}, 0.000001]))
        assert capped.status_code == 201, capped.text
        # The module's server is shared: leave no experiment behind.
        experiment = capped.json()["id"]
        assert client.post(f"/api/experiments/{experiment}/cancel").status_code == 200
        assert client.delete(f"/api/experiments/{experiment}").status_code == 204


def test_every_mistake_of_a_form_comes_back_at_once(live_server, dataset_id):
    """A budget out of range used to be reported only once the other fields were right, so
    a form learnt of its mistakes in rounds."""
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(
            dataset_id, budgets=[0.15, 2.0], seeds=[0, "x"], overrides={"iterations": -5}))
    assert response.status_code == 422
    found = {".".join(map(str, error["loc"])): error["msg"] for error in response.json()["detail"]}
    assert found["body.budgets"] == "budgets[1]: budget fraction 2.0 must be in (0, 1]"
    assert "body.seeds.1" in found and "body.overrides.iterations" in found


def test_the_experiment_list_filters_by_dataset(live_server, dataset_id, settings):
    other = add_dataset_row(settings.sqlalchemy_url)
    with live_server.client() as client:
        ids = {}
        for dataset in (dataset_id, other, dataset_id):
            created = client.post("/api/experiments", json=body(dataset))
            assert created.status_code == 201, created.text
            ids.setdefault(dataset, []).append(created.json()["id"])
        mine = client.get("/api/experiments", params={"dataset_id": dataset_id}).json()
        theirs = client.get("/api/experiments", params={"dataset_id": other}).json()
        everything = client.get("/api/experiments").json()
        bad = client.get("/api/experiments", params={"dataset_id": "abc"})
    assert [e["id"] for e in mine] == ids[dataset_id][::-1]  # newest first
    assert [e["id"] for e in theirs] == ids[other]
    assert len(everything) == 3
    assert bad.status_code == 422 and "dataset_id" in bad.text


def test_budgets_take_the_spellings_of_the_form_and_the_command_line(live_server,
                                                                     dataset_id):
    """"5%" got three type errors from the API while the form and the CLI take it."""
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(
            dataset_id, methods=["fine-tune"],
            budgets=["5%", " 2 / class", "3 per Class", "ALL"]))
        assert response.status_code == 201, response.text
        created = response.json()
    assert created["budgets"] == [0.05, {"per_class": 2}, {"per_class": 3}, "all"]
    assert sorted(run["budget_label"] for run in created["runs"]) == [
        "2/class", "3/class", "5%", "all"]


def test_sweep_expands_into_methods_x_budgets_x_seeds_runs(live_server, dataset_id):
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(
            dataset_id, methods=["fine-tune", "fixmatch"],
            budgets=[0.05, {"per_class": 4}, "all"], seeds=[0, 1],
            overrides={"pretrained": False, "iterations": 50, "image_size": 48},
        ))
        assert response.status_code == 201, response.text
        experiment = response.json()
        assert response.headers["location"] == f"/api/experiments/{experiment['id']}"
        listed = client.get("/api/experiments").json()
        run = client.get(f"/api/runs/{experiment['runs'][0]['id']}").json()
    assert len(experiment["runs"]) == 12
    assert {(r["method"], str(r["budget"]), r["seed"]) for r in experiment["runs"]} == {
        (m, str(b), s) for m in ("fine-tune", "fixmatch")
        for b in (0.05, {"per_class": 4}, "all") for s in (0, 1)}
    assert {r["status"] for r in experiment["runs"]} == {"queued"}
    assert listed[0]["id"] == experiment["id"]  # newest first
    assert run["config"]["iterations"] == 50 and run["config"]["image_size"] == 48
    assert run["config"]["backbone"] == "test_efficientnet" and run["total_steps"] == 50
    assert run["queue_position"] >= 1


# Set by the experiment itself or by the worker.
NOT_OVERRIDES = {"method", "backbone", "seed", "device"}


def test_every_run_setting_of_a_preset_is_editable():
    """product.md: "a preset ... with every value editable"."""
    from dataclasses import fields

    from app.schemas import Overrides
    from worker.selftuning.config import RunConfig

    assert set(Overrides.model_fields) == {f.name for f in fields(RunConfig)} - NOT_OVERRIDES


def test_the_ablations_in_the_readme_can_be_started(live_server, dataset_id):
    """Self-Tuning without unlabeled images (`unlabeled_batch_size: 0`) and another SGD
    momentum reach the stored run config."""
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(
            dataset_id, overrides={"pretrained": False, "unlabeled_batch_size": 0,
                                   "momentum": 0.5}))
        assert response.status_code == 201, response.text
        run = client.get(f"/api/runs/{response.json()['runs'][0]['id']}").json()
    assert run["config"]["unlabeled_batch_size"] == 0 and run["config"]["momentum"] == 0.5


def test_semi_supervised_runs_with_no_unlabeled_image_start_with_a_warning(live_server,
                                                                          dataset_id):
    """On a dataset without unlabeled images, 'all' leaves Self-Tuning and FixMatch nothing
    unlabeled: they run (a baseline may want that) but the experiment says what they are."""
    methods = ["fine-tune", "self-tuning", "fixmatch"]
    with live_server.client() as client:
        created = client.post("/api/experiments", json=body(
            dataset_id, methods=methods, budgets=["50%", "all"])).json()
        page = client.get(f"/experiments/{created['id']}").text
        left_out = client.post("/api/experiments", json=body(dataset_id, overrides={
            "pretrained": False, "unlabeled_batch_size": 0})).json()
        baseline = client.post("/api/experiments", json=body(
            dataset_id, methods=["fine-tune"], budgets=["all"])).json()
        below_all = client.post("/api/experiments", json=body(
            dataset_id, methods=methods, budgets=["50%"])).json()
    assert created["warnings"] == [
        "at budget 'all' no image is unlabeled (the budget keeps every label and the dataset "
        "has no unlabeled images): Self-Tuning trains on the labeled images alone; FixMatch "
        "trains as fine-tuning does"]
    assert "At budget &#39;all&#39; no image is unlabeled" in page
    assert left_out["warnings"] == [
        "unlabeled_batch_size 0 leaves every unlabeled image out: Self-Tuning trains on the "
        "labeled images alone"]
    assert baseline["warnings"] == below_all["warnings"] == []


def test_a_check_says_what_a_start_would_make_and_stores_and_queues_nothing(live_server,
                                                                           dataset_id):
    """POST /api/experiments/check (the start form asks it as it is filled in): the runs
    and warnings the same body would start with, and nothing made."""
    queue = redis.Redis.from_url(live_server.redis_url)
    sweep = body(dataset_id, methods=["fine-tune", "self-tuning"], budgets=["50%", "all"],
                 seeds=[0, 1])
    before, queued = counts(live_server.database_url), queue.llen("celery")
    with live_server.client() as client:
        checked = [client.post("/api/experiments/check", json=sweep) for _ in range(2)]
        plain = client.post("/api/experiments/check", json=body(dataset_id))
        assert counts(live_server.database_url) == before and queue.llen("celery") == queued
        created = client.post("/api/experiments", json=sweep).json()
    assert queue.llen("celery") == queued + 8  # where a start puts its runs (no worker here)
    assert [c.status_code for c in checked] == [200, 200]
    assert checked[0].json() == checked[1].json() == {
        "runs": 8, "backbone": "test_efficientnet", "warnings": created["warnings"]}
    assert len(created["runs"]) == 8 and created["warnings"] == [
        "at budget 'all' no image is unlabeled (the budget keeps every label and the dataset "
        "has no unlabeled images): Self-Tuning trains on the labeled images alone"]
    assert plain.json() == {"runs": 1, "backbone": "test_efficientnet", "warnings": []}


def test_refusals_come_with_a_status_and_body_shape_the_api_documents(live_server, dataset_id):
    """/docs promised an ErrorOut (a string) for the check's 422s, which are lists of fields;
    the start's Idempotency-Key refusal was a string where lists were documented; a body
    that is not UTF-8 got an undocumented 400."""
    with live_server.client() as client:
        schema = client.get("/openapi.json").json()
        answers = {
            ("/api/experiments/check", "no body"): client.post("/api/experiments/check"),
            ("/api/experiments/check", "no such dataset"): client.post(
                "/api/experiments/check", json=body(10**9)),
            ("/api/experiments/check", "not UTF-8"): client.post(
                "/api/experiments/check", content=b"\xff\x01",
                headers={"Content-Type": "application/json"}),
            ("/api/experiments", "not UTF-8"): client.post(
                "/api/experiments", content=b"\xff\x01",
                headers={"Content-Type": "application/json"}),
        }
        key = {"Idempotency-Key": f"shape-{dataset_id}"}
        assert client.post("/api/experiments", json=body(dataset_id), headers=key).is_success
        answers[("/api/experiments", "key with another body")] = client.post(
            "/api/experiments", json=body(dataset_id, seeds=[1]), headers=key)
    models = {"ErrorOut": ErrorOut, "FieldErrorsOut": FieldErrorsOut}
    for (path, case), response in answers.items():
        documented = schema["paths"][path]["post"]["responses"]
        assert str(response.status_code) in documented, (case, response.status_code)
        reference = documented[str(response.status_code)]["content"]["application/json"][
            "schema"]["$ref"]
        models[reference.rsplit("/", 1)[1]].model_validate(response.json())
    assert [response.status_code for response in answers.values()] == [422, 422, 400, 400, 422]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/api/datasets/1", "DELETE, GET, HEAD, PATCH"),
    ("POST", "/api/runs/1/checkpoint", "GET, HEAD"),
    ("OPTIONS", "/api/datasets", "GET, HEAD, POST"),
    ("HEAD", "/api/runs/1/events", "GET"),  # a live feed has no HEAD
])
def test_a_method_a_path_does_not_take_is_a_405_naming_every_one_it_does(
        live_server, method, path, allowed):
    """The 405's Allow header named the first route's methods only: GET and HEAD are two
    routes for a download, so a client was told to use HEAD alone."""
    with live_server.client() as client:
        response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed


def test_runs_sized_for_a_gpu_are_flagged_when_every_worker_trains_on_its_cpu(live_server,
                                                                             dataset_id):
    """The paper preset (27,000 iterations at 224 px) was accepted without a word by CPU-only
    workers, at days a run. Workers are known by the presence keys they refresh in Redis
    (worker/celery_app.py), written here as they write them."""
    live = redis.Redis.from_url(live_server.redis_url)
    paper = body(dataset_id, preset="paper")

    def warnings(request: dict, *workers: str) -> list[str]:
        live.delete(*live.keys(f"{WORKER_KEY_PREFIX}*") or ["-"])
        for index, device in enumerate(workers):
            live.set(f"{WORKER_KEY_PREFIX}w{index}", json.dumps(
                {"name": f"w{index}", "device": device, "torch_device": device}), ex=60)
        with live_server.client() as client:
            response = client.post("/api/experiments/check", json=request)
        assert response.status_code == 200, response.text
        return response.json()["warnings"]

    try:
        assert warnings(paper, "cpu", "cpu") == [
            "every worker that answers trains on its CPU, and these runs are sized for a GPU "
            "(27,000 iterations of 24 + 24 images at 224 px, 1,240 times the quick preset's "
            "work): expect days a run; the quick preset is sized for a CPU"]
        assert warnings(paper, "cpu", "cuda:0") == []  # a GPU worker takes its share
        assert warnings(paper) == []  # no worker yet: nothing known about them
        assert warnings(body(dataset_id), "cpu") == []  # the quick preset
        with live_server.client() as client:  # a start says it too
            started = client.post("/api/experiments", json=paper).json()
        assert started["warnings"][-1].startswith("every worker that answers trains on its CPU")
    finally:
        live.delete(*live.keys(f"{WORKER_KEY_PREFIX}*") or ["-"])


@pytest.mark.parametrize("path", [
    "/api/runs/{id}", "/api/runs/{id}/metrics", "/api/runs/{id}/events",
    "/api/runs/{id}/files/model.safetensors", "/api/runs/{id}/checkpoint",
    "/api/experiments/{id}", "/api/experiments/{id}/events", "/api/datasets/{id}",
    "/api/datasets/{id}/images", "/api/datasets/1/images/{id}/thumbnail",
    "/runs/{id}", "/experiments/{id}", "/datasets/{id}", "/experiments/new?dataset_id={id}",
    "/api/datasets/1/images?offset={id}",
])
@pytest.mark.parametrize("too_big", [2**31, 2**63, 10**20])
def test_ids_no_row_can_have_are_a_422_not_a_500(live_server, path, too_big):
    """PostgreSQL's ids stop at 2**31 - 1 and SQLite's at 2**63 - 1: larger ones used to
    fail inside the driver (a 500)."""
    with live_server.client() as client:
        response = client.get(path.format(id=too_big))
    assert response.status_code == 422, (path, response.status_code, response.text[:300])
    assert "2147483647" in response.text


def test_the_default_name_of_an_experiment_fits_the_200_characters_a_name_has(
    live_server, settings
):
    """A 200-character dataset name plus ": self-tuning, fine-tune" is too long for the
    column (PostgreSQL refused it with a 500): the default name is shortened."""
    dataset_id = add_dataset_row(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Dataset, dataset_id).name = "d" * 200
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(
            dataset_id, methods=["self-tuning", "fine-tune"]))
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "d" * 199 + "…"


@pytest.mark.parametrize("raw,field", [
    ('"overrides": {"lr": Infinity}', "overrides.lr"),
    ('"seeds": [NaN]', "seeds.0"),
    ('"budgets": [{"per_class": -Infinity}]', "budgets.0.PerClassBudget.per_class"),
])
def test_nan_and_infinity_sent_as_json_are_a_422_that_names_them(live_server, dataset_id,
                                                                  raw, field):
    """Python's json (and so `requests`) writes NaN and Infinity for float('nan'/'inf')."""
    named = raw.split('"')[1]
    rest = {key: value for key, value in body(dataset_id).items() if key != named}
    sent = json.dumps(rest)[:-1] + f", {raw}}}"  # json.dumps writes NaN as NaN too, not "NaN"
    before = counts(live_server.database_url)
    with live_server.client() as client:
        response = client.post("/api/experiments", content=sent,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    problems = {".".join(map(str, d["loc"][1:])): d["input"] for d in response.json()["detail"]}
    assert field in problems and problems[field] in ("NaN", "Infinity", "-Infinity")
    assert counts(live_server.database_url) == before


@pytest.mark.parametrize("changes,field", [
    ({"name": "caf\ud800"}, "name"),
    ({"backbone": "\udc80net"}, "backbone"),
    ({"methods": ["\ud800"]}, "methods.0"),
    ({"budgets": ["\udfff"]}, "budgets"),
    ({"overrides": {"labeled_query_view": "\ud800"}}, "overrides.labeled_query_view"),
    ({"overrides": {"\ud800": 1}}, "overrides"),
])
def test_half_a_surrogate_pair_in_a_string_is_a_422_not_a_500(live_server, dataset_id,
                                                              changes, field):
    """JSON may escape half of a UTF-16 pair ("\\ud800"); Python decodes it into a string
    UTF-8 cannot encode, and echoing it back in the 422 made a 500."""
    sent = json.dumps(body(dataset_id, **changes))  # ensure_ascii: sent as \ud800 escapes
    before = counts(live_server.database_url)
    with live_server.client() as client:
        response = client.post("/api/experiments", content=sent,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    locs = {".".join(map(str, d["loc"][1:])) for d in response.json()["detail"]}
    assert any(loc.startswith(field) for loc in locs), locs
    assert counts(live_server.database_url) == before


def test_a_weight_file_made_for_another_architecture_is_refused_at_creation(
    live_server, dataset_id
):
    """`resnet18:runs/1/model.safetensors` holding an EfficientNet used to queue runs that
    all failed when the worker loaded it; the file's header already tells."""
    folder = live_server.data_dir / "runs" / "weights-check"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model("test_efficientnet", num_classes=3).state_dict(),
              folder / "model.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    before = counts(live_server.database_url)
    with live_server.client() as client:
        for backbone, expected in [
            ("resnet18:runs/weights-check/model.safetensors",
             "holds 88 tensors but resnet18 has 122: it was made for another architecture"),
            ("test_efficientnet:runs/weights-check/broken.safetensors",
             "is not a readable .safetensors file"),
        ]:
            response = client.post("/api/experiments", json=body(dataset_id, backbone=backbone))
            assert response.status_code == 422, response.text
            assert expected in messages(response), messages(response)
        assert counts(live_server.database_url) == before
        fits = body(dataset_id, backbone="test_efficientnet:runs/weights-check/model.safetensors")
        assert client.post("/api/experiments", json=fits).status_code == 201


def test_a_name_typed_in_decomposed_unicode_is_kept_composed(live_server, dataset_id):
    """"e" + combining accent, 150 times: 300 code points, refused as over 200 characters."""
    with live_server.client() as client:
        created = client.post("/api/experiments",
                              json=body(dataset_id, name="e\u0301" * 150))
        assert created.status_code == 201, created.text
        assert created.json()["name"] == "\u00e9" * 150
        experiment = created.json()["id"]
        assert client.post(f"/api/experiments/{experiment}/cancel").status_code == 200
        assert client.delete(f"/api/experiments/{experiment}").status_code == 204
        too_long = client.post("/api/experiments", json=body(dataset_id, name="e\u0301" * 201))
        assert too_long.status_code == 422


def test_a_name_of_spaces_gets_the_default_name(live_server, dataset_id):
    with live_server.client() as client:
        response = client.post("/api/experiments", json=body(dataset_id, name="   "))
    assert response.status_code == 201, response.text
    assert response.json()["name"].startswith("shapes")


@pytest.mark.parametrize("too_big", [2**63, 10**20])
def test_a_class_index_no_row_can_have_is_a_422_not_a_500(live_server, dataset_id, too_big):
    with live_server.client() as client:
        response = client.get(f"/api/datasets/{dataset_id}/images", params={"label": too_big})
    assert response.status_code == 422, response.text[:300]


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(live_server, dataset_id):
    """A 40 MB experiment body held the whole server for 20 s while it was parsed."""
    big = json.dumps(body(dataset_id, budgets=[0.1] * 300_000)).encode()
    assert len(big) > 1 << 20
    with live_server.client() as client:
        declared = client.post("/api/experiments", content=big,
                               headers={"Content-Type": "application/json"})
        chunked = client.post("/api/experiments", content=iter([big[:4096], big[4096:]]),
                              headers={"Content-Type": "application/json"})
        # Uploads have their own, larger limit: 1.5 MiB that is no archive is a 415.
        upload = client.post("/api/datasets", files={"file": ("a.zip", b"x" * (3 << 19))})
        assert client.get("/api/experiments").status_code == 200  # nothing was stored
    for refused in (declared, chunked):
        assert refused.status_code == 413, refused.text
        assert refused.json()["detail"].startswith("the request body is over 1024 KiB")
    assert "content-length" not in chunked.request.headers
    assert upload.status_code == 415, upload.text


def test_a_body_that_cannot_be_decoded_says_why(live_server, dataset_id):
    """These were a 400 "There was an error parsing the body", which says nothing to fix."""
    sent = json.dumps(body(dataset_id, name="caf\u00e9"), ensure_ascii=False)
    cases = {
        sent.encode("latin-1"): "it is not UTF-8 text, which JSON must be",
        b"[" * 5000 + b"]" * 5000: "its JSON is nested too deeply",
        sent.replace('"seeds": [0]', f'"seeds": [{"9" * 5000}]').encode():
            "Exceeds the limit (4300 digits) for integer string conversion",
    }
    with live_server.client() as client:
        for content, reason in cases.items():
            response = client.post("/api/experiments/check", content=content,
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text[:300]
            assert response.json()["detail"].startswith(
                f"the request body could not be read: {reason}"), response.text[:300]


def test_a_refused_long_input_is_echoed_cut(live_server, dataset_id):
    """A 422 echoed each refused input whole: a 100 MB name came back as 100 MB."""
    with live_server.client() as client:
        refused = client.post("/api/experiments",
                              json=body(dataset_id, name="x" * 300_000, seeds=["a"] * 50))
    assert refused.status_code == 422
    assert len(refused.content) < 5000
    inputs = {error["loc"][-1]: error["input"] for error in refused.json()["detail"]}
    assert inputs["name"] == "x" * 200 + "… (300,000 characters)"
    assert inputs["seeds"] == ["a"] * 20 + ["… (50 items)"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None])
def test_json_sent_without_its_content_type_says_which_header_to_add(live_server, dataset_id,
                                                                    content_type):
    """`curl -d '{...}'` (a form's Content-Type) got "Input should be a valid dictionary or
    object to extract fields from"."""
    headers = {"Content-Type": content_type} if content_type else {}
    with live_server.client() as client:
        refused = client.post("/api/experiments", content=json.dumps(body(dataset_id)),
                              headers=headers)
    assert refused.status_code == 422
    said = f"Content-Type {content_type}" if content_type else "no Content-Type"
    assert messages(refused) == ("body: send the body as JSON with the header Content-Type: "
                                 f"application/json (it came with {said})")


def test_an_image_size_whose_decoded_images_take_tens_of_gigabytes_starts_with_a_warning(
    live_server, settings,
):
    """12,000 images at 1024 px decode to 73 GiB on the worker's disk (the 10,000 training
    images at 1024 / 0.875 = 1170 px a side, and as 1024 px centre crops with the 2,000 test
    images): said when the experiment starts, not found on the disk."""
    dataset_id = add_dataset_row(settings.sqlalchemy_url, {
        name: {"train": 5000, "test": 1000} for name in ("a", "b")})
    sizes = {}
    with live_server.client() as client:
        for image_size in (1024, 224):
            created = client.post("/api/experiments", json=body(
                dataset_id, methods=["fine-tune"], overrides={"pretrained": False,
                                                              "image_size": image_size}))
            assert created.status_code == 201, created.text
            sizes[image_size] = created.json()["warnings"]
    assert sizes[1024] == [
        "at image_size 1024 the decoded images take about 73.4 GiB of the worker's disk (kept "
        "for every run of this dataset at this size), and decoding them comes before the "
        "first step: a smaller image_size takes a fraction of that"]
    assert sizes[224] == []  # 3.5 GiB


def test_the_estimate_of_the_decoded_images_is_what_a_run_leaves_in_the_cache(tmp_path):
    """The estimate left out the centre crops of the training images that the end of a run
    decodes to predict the unlabeled ones (it said 1.8 GB of animal-mnist at 224 px, which
    keeps 3.0 GB). Here a run of the command line fills a cache folder, and the estimate for
    the same images (numpy's file headers aside) is what it holds, on the default backbone
    (the estimate takes timm's usual crop_pct, 0.875, and its 0.882 gives the same sizes)."""
    from tests.engine.helpers import write_shapes_dataset
    from worker.selftuning.cli import main

    data = write_shapes_dataset(tmp_path / "data", train_per_class=8, test_per_class=2)
    counts = {folder.name: {"train": len(list(folder.glob("*.png"))),
                            "test": len(list((data / "test" / folder.name).glob("*.png")))}
              for folder in (data / "train").iterdir()}
    dataset = Dataset(class_counts=counts,
                      unlabeled_count=len(list((data / "unlabeled").glob("*.png"))))
    cache = tmp_path / "cache"
    assert main(["train", "--data", str(data), "--method", "fine-tune", "--budget", "0.5",
                 "--iterations", "1", "--image-size", "32", "--backbone", "tf_efficientnet_lite0",
                 "--no-pretrained", "--device", "cpu", "--cpu-threads", "1",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "out")]) == 0
    files = list(cache.glob("*.npy"))
    assert len(files) == 3  # training images, their centre crops, test images
    held = sum(file.stat().st_size - 128 for file in files)  # a .npy header is 128 bytes
    assert decoded_bytes(dataset, 32) == held


def test_lists_come_a_page_at_a_time_when_asked(live_server, settings):
    """The API lists everything unless given `limit` (X-Total-Count and Link headers say
    what is left); the pages show 100 rows at a time, with links to the others."""
    dataset_id = add_dataset_row(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        session.add_all(Experiment(name=f"sweep {number}", dataset_id=dataset_id, backbone="b",
                                   methods=["fine-tune"], budgets=[0.5], seeds=[0],
                                   preset="quick") for number in range(105))
        datasets = session.scalar(select(func.count()).select_from(Dataset))
    mine = f"/api/experiments?dataset_id={dataset_id}"
    with live_server.client() as client:
        everything = client.get(mine)
        page = client.get(f"{mine}&limit=40&offset=40")
        last = client.get(f"{mine}&limit=40&offset=80")
        beyond = client.get(f"{mine}&limit=40&offset=300")
        refused = [client.get(f"{mine}&limit={limit}").status_code for limit in (0, 1001)]
        first_dataset = client.get("/api/datasets?limit=1")
        pages = [client.get(f"/experiments?dataset_id={dataset_id}&page={n}").text
                 for n in (1, 2, 3)]
    names = [item["name"] for item in everything.json()]
    assert names == [f"sweep {number}" for number in range(104, -1, -1)]  # newest first
    assert everything.headers["x-total-count"] == "105" and "link" not in everything.headers
    assert [item["name"] for item in page.json()] == names[40:80]
    assert page.headers["x-total-count"] == "105"
    assert page.headers["link"] == (
        f'</api/experiments?dataset_id={dataset_id}&limit=40&offset=80>; rel="next", '
        f'</api/experiments?dataset_id={dataset_id}&limit=40&offset=0>; rel="prev"')
    assert [item["name"] for item in last.json()] == names[80:]
    assert last.headers["link"] == (
        f'</api/experiments?dataset_id={dataset_id}&limit=40&offset=40>; rel="prev"')
    # Past the end, "prev" is the last page's items, not another empty page (offset 260).
    assert beyond.json() == [] and beyond.headers["link"] == (
        f'</api/experiments?dataset_id={dataset_id}&limit=40&offset=65>; rel="prev"')
    assert refused == [422, 422]
    assert len(first_dataset.json()) == 1 and first_dataset.json()[0]["id"] == dataset_id
    assert first_dataset.headers["x-total-count"] == str(datasets)

    shown = [re.findall(r'<a href="/experiments/\d+">(sweep \d+)</a>', text) for text in pages]
    assert shown == [names[:100], names[100:], []]
    assert "1–100 of 105, newest first" in pages[0] and "101–105 of 105" in pages[1]
    assert f'href="/experiments?dataset_id={dataset_id}&amp;page=2" rel="next"' in pages[0]
    assert f'href="/experiments?dataset_id={dataset_id}&amp;page=1" rel="prev"' in pages[1]
    assert 'rel="next"' not in pages[1]
    assert "Page 3 is past the end of the list (105)" in pages[2]
    assert f'href="/experiments?dataset_id={dataset_id}&amp;page=2" rel="prev"' in pages[2]


def test_a_retry_with_the_same_idempotency_key_gets_the_first_experiment(live_server,
                                                                         dataset_id, settings):
    """A script whose POST timed out after the sweep was made retries: with the same
    Idempotency-Key it gets that sweep back instead of queuing a second one."""
    sweep = body(dataset_id, methods=["fine-tune", "fixmatch"], budgets=[0.5, "all"])
    key = {"Idempotency-Key": f"retry-{dataset_id}"}
    with live_server.client() as client:
        first = client.post("/api/experiments", json=sweep, headers=key)
        experiments, runs = counts(settings.sqlalchemy_url)
        again = client.post("/api/experiments", json=sweep, headers=key)
        after_retry = counts(settings.sqlalchemy_url)
        other_body = client.post("/api/experiments", json={**sweep, "seeds": [1]}, headers=key)
        without_key = client.post("/api/experiments", json=sweep)
        refused = client.post("/api/experiments", json={**sweep, "budgets": []},
                              headers={"Idempotency-Key": f"refused-{dataset_id}"})
        after_refusal = client.post("/api/experiments", json=sweep,
                                    headers={"Idempotency-Key": f"refused-{dataset_id}"})
        bad_key = client.post("/api/experiments", json=sweep, headers={"Idempotency-Key": "a b"})
        # Another request with the key is still making its experiment.
        live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
        digest = idempotency.request_digest(ExperimentIn.model_validate(sweep).model_dump_json())
        assert idempotency.claim(live, f"held-{dataset_id}", digest) is None
        held = client.post("/api/experiments", json=sweep,
                           headers={"Idempotency-Key": f"held-{dataset_id}"})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/api/experiments/{first.json()['id']}"
    assert [run["id"] for run in again.json()["runs"]] == [r["id"] for r in first.json()["runs"]]
    assert after_retry == (experiments, runs)  # nothing new queued
    assert other_body.status_code == 422
    assert other_body.json()["detail"] == [{  # the shape of every 422 of this route
        "loc": ["header", "Idempotency-Key"], "type": "value_error",
        "msg": "this Idempotency-Key came with another request body: use a new key for a new "
               "experiment"}]
    assert without_key.status_code == 201 and without_key.json()["id"] != first.json()["id"]
    # A refused request keeps nothing under its key: the corrected retry is made.
    assert refused.status_code == 422 and after_refusal.status_code == 201
    assert bad_key.status_code == 422
    assert held.status_code == 409 and "still being handled" in held.json()["detail"]
    assert held.headers["retry-after"] == "2"


def test_a_retry_whose_experiment_was_deleted_is_a_410_and_starts_nothing(live_server,
                                                                          dataset_id, settings):
    """A key names its experiment for a day, deleted or not, and a retry after the delete
    made a new sweep: one that someone had cancelled and deleted started again behind their
    back, where a retry is never to make a second sweep. Every retry, those sent together
    too, is told that its experiment is gone; a new key starts the sweep again."""
    sweep = body(dataset_id)
    key = {"Idempotency-Key": f"deleted-{dataset_id}"}

    def retry(_) -> httpx.Response:
        with live_server.client() as client:
            return client.post("/api/experiments", json=sweep, headers=key)

    with live_server.client() as client:
        first = client.post("/api/experiments", json=sweep, headers=key)
        assert first.status_code == 201
        made = first.json()["id"]
        client.post(f"/api/experiments/{made}/cancel")
        assert client.delete(f"/api/experiments/{made}").status_code == 204
        before = counts(settings.sqlalchemy_url)
        with ThreadPoolExecutor(4) as pool:
            retries = list(pool.map(retry, range(4)))
        after = counts(settings.sqlalchemy_url)
        again = client.post("/api/experiments", json=sweep,
                            headers={"Idempotency-Key": f"again-{dataset_id}"})
    assert [response.status_code for response in retries] == [410] * 4, [
        (response.status_code, response.text[:200]) for response in retries]
    assert retries[0].json() == {"detail": (
        f"experiment {made}, which the first request with this Idempotency-Key made, was "
        "deleted since: to make it again, send it with a new key")}
    assert after == before  # nothing queued
    assert again.status_code == 201 and again.json()["id"] != made


def test_a_retry_is_not_answered_with_another_experiment_under_the_same_id(
        live_server, dataset_id, settings):
    """A database restored from a backup gives out again the ids made after the backup: a
    retry within the day of a key that named such an experiment was answered with the new
    experiment of that id, someone else's sweep. A key keeps when its experiment was made,
    and a retry whose experiment is not that one is told it is gone."""
    sweep = body(dataset_id)
    key = {"Idempotency-Key": f"restored-{dataset_id}"}
    with live_server.client() as client:
        first = client.post("/api/experiments", json=sweep, headers=key)
        assert first.status_code == 201
        made = first.json()["id"]
        client.post(f"/api/experiments/{made}/cancel")
        assert client.delete(f"/api/experiments/{made}").status_code == 204
        with session_scope(settings.sqlalchemy_url) as session:  # as the backup has it
            session.execute(text("UPDATE sqlite_sequence SET seq = :seq "
                                 "WHERE name = 'experiments'"), {"seq": made - 1})
        other = client.post("/api/experiments", json={**sweep, "name": "someone else's"})
        assert other.status_code == 201 and other.json()["id"] == made
        retry = client.post("/api/experiments", json=sweep, headers=key)
    assert retry.status_code == 410, retry.text
    assert retry.json()["detail"].startswith(f"experiment {made}, which the first request")


def test_self_tuning_too_short_to_fill_its_key_queue_starts_with_a_warning(live_server,
                                                                          settings):
    """Self-Tuning's queue starts as random vectors, queue_size a class, and every slot of a
    class is a positive in its loss. The quick preset's 400 steps of 16 + 16 keys fill at most
    12,800 of the 32,000 slots of 1,000 classes (25-40 % were ever written in the audit's
    runs), and nothing said so: its comparison with fine-tuning measured a handicapped
    method."""
    classes = {f"species{n}": {"train": 4, "test": 1} for n in range(1000)}
    many = add_dataset_row(settings.sqlalchemy_url, classes)
    sweep = body(many, methods=["fine-tune", "self-tuning"], budgets=["1/class"], seeds=[0, 1])
    with live_server.client() as client:
        checked = client.post("/api/experiments/check", json=sweep).json()
        filled = client.post("/api/experiments/check", json={
            **sweep, "overrides": {"pretrained": False, "iterations": 1000}}).json()
        baseline = client.post("/api/experiments/check", json={
            **sweep, "methods": ["fine-tune"]}).json()
    assert checked["warnings"] == [
        "Self-Tuning's queue has 32,000 slots (1,000 classes × 32 keys), and 400 iterations put "
        "at most 12,800 keys in it: at least 60% of it stays the random vectors it starts with, "
        "which the PGC loss counts as each class's positives; more iterations or a smaller "
        "queue_size fill it"]
    assert filled["warnings"] == baseline["warnings"] == []


def test_runs_that_would_spend_their_time_on_their_curves_start_with_a_warning(live_server,
                                                                             settings):
    """log_interval 1 on a long run recorded a point a step (minutes of writes a run, and a
    page that reads them all), and a small eval_interval on a large test split scored more
    test images than the steps trained on, with no word of either until the runs crawled."""
    classes = {name: {"train": 10, "test": 500} for name in ("a", "b")}  # 1,000 test images
    dataset = add_dataset_row(settings.sqlalchemy_url, classes)
    sweep = body(dataset, methods=["fine-tune"], budgets=[0.5])

    def warnings(**overrides) -> list[str]:
        with live_server.client() as client:
            answer = client.post("/api/experiments/check", json={
                **sweep, "overrides": {"pretrained": False, **overrides}})
        assert answer.status_code == 200, answer.text
        return answer.json()["warnings"]

    assert warnings() == []  # the quick preset: 3 evaluations of 1,000 for 6,400 drawn
    assert warnings(eval_interval=20) == []  # 19,000: under 3 times 6,400
    assert warnings(eval_interval=10) == [
        "an evaluation every 10 iterations scores the 1,000 test images 39 times, 39,000 "
        "images in all, over 3 times the 6,400 a fine-tune run's steps train on: evaluating "
        "takes longer than training; a larger eval_interval leaves more of each run to "
        "training"]
    assert warnings(iterations=200_000, log_interval=1, eval_interval=200_000) == [
        "each run records about 200,001 points of its curves (progress every 1 and an "
        "evaluation every 200,000 of 200,000 iterations): writing them takes minutes a run, "
        "and its page reads them all; a larger log_interval or eval_interval records fewer"]
    assert warnings(iterations=200_000, log_interval=4, eval_interval=200_000) == []


def test_a_fraction_that_keeps_far_more_labels_than_asked_starts_with_a_warning(live_server,
                                                                              settings):
    """Every class keeps at least one label: 1 % of 1,000 classes of 4 images kept 1,000 labels
    (25 %) with no word of it but the chart's label count."""
    classes = {f"species{n}": {"train": 4, "test": 1} for n in range(1000)}
    many = add_dataset_row(settings.sqlalchemy_url, classes)
    sweep = body(many, methods=["fine-tune"], budgets=["1%", "50%"])
    with live_server.client() as client:
        checked = client.post("/api/experiments/check", json=sweep).json()
    assert checked["warnings"] == [
        "budget '1%' keeps 1,000 of the 4,000 labeled images, 25.0% rather than 1.0%: every "
        "class keeps at least one (a count per class such as '1/class' says so plainly)"]


@pytest.mark.parametrize(("train_per_class", "suggested"), [
    ([10, 10], "15%, 30%, 50%, all"),
    ([40, 2], "15%, 30%, 50%, all"),
    ([4] * 1000, "30%, 50%, all"),  # 15 % and 30 % of 4 both keep one
    ([3, 3], "30%, 50%, all"),
    ([2, 2, 2], "1/class, all"),    # every share keeps one, or both
    ([1, 1], "all"),
])
def test_the_start_form_offers_budgets_its_dataset_takes_without_a_word(
        live_server, settings, train_per_class, suggested):
    """The form offered 15%, 30%, 50%, all on every dataset, so one of three labeled images a
    class opened with a refusal (15 % and 30 % keep the same one image). It now offers the
    budgets the chosen dataset tells apart, and a check of them is neither refused nor
    warned about."""
    classes = {f"c{n}": {"train": size, "test": 1} for n, size in enumerate(train_per_class)}
    dataset = add_dataset_row(settings.sqlalchemy_url, classes)
    with live_server.client() as client:
        page = client.get(f"/experiments/new?dataset_id={dataset}").text
        offered = html.unescape(re.search(r'id="f-budgets"[^>]* value="([^"]*)"', page)[1])
        checked = client.post("/api/experiments/check", json=body(
            dataset, methods=["fine-tune"], budgets=offered.split(", ")))
    assert offered == suggested
    assert checked.status_code == 200 and checked.json()["warnings"] == []
