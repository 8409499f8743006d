"""What more labels would buy: the log-linear fit on its own, the experiment API that serves
it, and the experiment page that shows it and keeps it live as runs finish."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from app.db import session_scope
from app.estimates import estimate_label_gains
from app.experiments import label_estimates
from app.models import Experiment, Run
from tests.browser import open_browser
from tests.support import add_dataset_row

LN2 = math.log(2)


def on_curve(a: float, b: float, n: int) -> float:
    return a + b * math.log(n)


# --- the fit ------------------------------------------------------------------------------


def test_noiseless_points_give_back_the_curve_and_a_zero_standard_error():
    a, b = 0.2, 0.05
    points = [("self-tuning", n, on_curve(a, b, n)) for n in (12, 24, 48, 96) for _seed in (0, 1)]
    [estimate] = estimate_label_gains(points)
    assert estimate.method == "self-tuning"
    assert estimate.intercept == pytest.approx(a, abs=1e-12)
    assert estimate.slope == pytest.approx(b, abs=1e-12)
    assert estimate.gain_per_doubling == pytest.approx(b * LN2, abs=1e-12)
    assert estimate.gain_per_doubling_se == pytest.approx(0.0, abs=1e-9)
    assert estimate.n_max == estimate.extra_labels == 96
    assert estimate.measured_top1 == pytest.approx(on_curve(a, b, 96))
    assert estimate.predicted_top1_at_double == pytest.approx(on_curve(a, b, 192))
    assert estimate.n_points == 8


def test_two_points_fit_exactly_and_have_no_standard_error():
    [estimate] = estimate_label_gains([("fine-tune", 10, 0.5), ("fine-tune", 40, 0.7)])
    assert estimate.gain_per_doubling == pytest.approx(0.1)  # 0.2 over two doublings
    assert estimate.gain_per_doubling_se is None
    assert estimate.predicted_top1_at_double == pytest.approx(0.8)
    assert estimate.n_points == 2


def test_the_standard_error_is_the_regression_slope_standard_error():
    counts = [12, 12, 24, 24, 48, 48]
    top1 = [0.60, 0.64, 0.70, 0.71, 0.78, 0.75]
    points = [("fixmatch", n, y) for n, y in zip(counts, top1, strict=True)]
    [estimate] = estimate_label_gains(points)
    x = np.log(counts)
    (slope, intercept), cov = np.polyfit(x, top1, 1, cov="unscaled")
    residuals = np.array(top1) - (intercept + slope * x)
    slope_se = math.sqrt(residuals @ residuals / (len(x) - 2) * cov[0, 0])
    assert estimate.slope == pytest.approx(slope)
    assert estimate.gain_per_doubling_se == pytest.approx(slope_se * LN2)
    assert 0 < estimate.gain_per_doubling_se < estimate.gain_per_doubling
    assert estimate.measured_top1 == pytest.approx((0.78 + 0.75) / 2)


def test_the_prediction_is_what_was_measured_plus_the_gain_so_they_never_disagree():
    """The fit's own value at 2·n_max (63.3%) was shown beside 70% measured at n_max and a
    gain of +5 points."""
    [estimate] = estimate_label_gains([("m", 10, 0.6), ("m", 20, 0.3), ("m", 40, 0.7)])
    assert estimate.gain_per_doubling == pytest.approx(0.05)
    assert estimate.predicted_top1_at_double == pytest.approx(0.75)


def test_an_estimate_says_how_many_more_images_the_dataset_holds():
    points = [("m", 30, 0.3), ("m", 360, 0.5)]  # "all" of 360 labeled images, 100 unlabeled
    [estimate] = estimate_label_gains(points, images=460)
    assert (estimate.extra_labels, estimate.images_left) == (360, 100)
    assert estimate_label_gains(points)[0].images_left is None  # not told
    assert estimate_label_gains(points, images=300)[0].images_left == 0


def test_a_method_measured_at_one_labeled_count_gets_no_estimate():
    points = [("fine-tune", 24, 0.61), ("fine-tune", 24, 0.65),  # two seeds, one budget
              ("self-tuning", 24, 0.7), ("self-tuning", 48, 0.8)]
    assert [e.method for e in estimate_label_gains(points)] == ["self-tuning"]
    assert estimate_label_gains([]) == []


def test_the_predicted_accuracy_never_passes_100_percent_but_the_gain_is_kept():
    [estimate] = estimate_label_gains([("self-tuning", 50, 0.90), ("self-tuning", 100, 0.98)])
    assert estimate.gain_per_doubling == pytest.approx(0.08)
    assert estimate.predicted_top1_at_double == 1.0


@pytest.mark.parametrize(("top1_at_20", "predicts"), [
    (0.70, False),  # falls with labels
    (0.80, False),  # flat
    (0.8003, False),  # +0.03 points per doubling: shown as +0.0
    (0.8006, True),  # +0.06: shown as +0.1
])
def test_a_fit_that_does_not_rise_predicts_no_accuracy(top1_at_20: float, predicts: bool):
    [estimate] = estimate_label_gains([("fixmatch", 10, 0.80), ("fixmatch", 20, top1_at_20)])
    assert estimate.gain_per_doubling == pytest.approx(top1_at_20 - 0.80)
    assert (estimate.predicted_top1_at_double is not None) == predicts


def run(method: str, status: str = "succeeded", **metrics) -> Run:
    return Run(method=method, status=status, metrics=metrics)


def test_a_run_without_a_recorded_count_takes_its_budgets_count():
    old = Run(method="fine-tune", status="succeeded", budget_label="50%",
              metrics={"test_top1": 0.7})
    recorded = run("fine-tune", test_top1=0.5, labeled_count=12)
    [estimate] = label_estimates([old, recorded], {"50%": 24})
    assert (estimate.n_max, estimate.n_points) == (24, 2)
    assert estimate.gain_per_doubling == pytest.approx(0.2)
    assert label_estimates([old, recorded]) == []  # no count for the old run: one point left


def test_runs_give_their_recorded_labeled_count_and_the_rest_are_left_out():
    runs = [
        run("self-tuning", test_top1=0.6, labeled_count=12),
        run("self-tuning", test_top1=0.8, labeled_count=48),
        # Finished before the worker recorded labeled counts: not on the curve.
        run("self-tuning", test_top1=0.1),
        run("self-tuning", "failed", labeled_count=6),
        run("self-tuning", "running", test_top1=0.1, labeled_count=36),
        run("fine-tune", test_top1=0.5, labeled_count=12),
        run("fine-tune", test_top1=0.7, labeled_count=48),
    ]
    estimates = label_estimates(runs)
    assert [e.method for e in estimates] == ["fine-tune", "self-tuning"]
    fine_tune, self_tuning = estimates
    assert (self_tuning.n_points, self_tuning.n_max) == (2, 48)
    assert self_tuning.gain_per_doubling == pytest.approx(0.1)  # 0.2 over two doublings
    assert fine_tune.predicted_top1_at_double == pytest.approx(0.8)


# --- the API and the page -----------------------------------------------------------------

BUDGETS = {"4/class": {"per_class": 4}, "50%": 0.5, "all": "all"}
LABELED = {"4/class": 12, "50%": 24, "all": 48}  # 3 classes of 16 labeled training images


def seed_experiment(database_url: str, runs: list[tuple[str, str, str, dict]]) -> tuple[int, dict]:
    """Write an experiment and its runs straight into the database, as the worker would have
    left them: training real models is slow, and the estimate only reads the record.
    `runs` are (method, budget label, status, metrics); returns (experiment id, run ids)."""
    dataset_id = add_dataset_row(database_url, {c: {"train": 16, "test": 4} for c in "abc"})
    with session_scope(database_url) as session:
        methods = list(dict.fromkeys(method for method, *_ in runs))
        experiment = Experiment(name="estimates", dataset_id=dataset_id,
                                backbone="test_efficientnet", methods=methods,
                                budgets=list(BUDGETS.values()), seeds=[0], preset="quick",
                                overrides={})
        session.add(experiment)
        session.flush()
        ids = {}
        for method, label, status, metrics in runs:
            row = Run(experiment_id=experiment.id, dataset_id=dataset_id, method=method,
                      budget=BUDGETS[label], budget_label=label, seed=0, status=status,
                      metrics=metrics, total_steps=30, step=30 if status == "succeeded" else 0)
            session.add(row)
            session.flush()
            ids[(method, label)] = row.id
        return experiment.id, ids


def finished(label: str, top1: float) -> dict:
    return {"test_top1": top1, "labeled_count": LABELED[label]}


def test_the_experiment_api_estimates_what_twice_the_labels_would_buy(live_server):
    """Runs are written to the database as succeeded (see seed_experiment), at a per-class
    budget, a fraction and "all"; an older run that recorded no labeled count is placed at its
    budget's count, worked out from the dataset as the engine does."""
    experiment_id, _ = seed_experiment(live_server.database_url, [
        ("self-tuning", "4/class", "succeeded", finished("4/class", 0.60)),
        ("self-tuning", "50%", "succeeded", finished("50%", 0.71)),
        ("self-tuning", "all", "succeeded", finished("all", 0.78)),
        ("fine-tune", "4/class", "succeeded", finished("4/class", 0.50)),
        ("fine-tune", "50%", "succeeded", {"test_top1": 0.58}),  # recorded no labeled count
        ("fine-tune", "all", "failed", {}),
    ])
    with live_server.client() as client:
        response = client.get(f"/api/experiments/{experiment_id}")
        schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert response.status_code == 200, response.text
    fine_tune, estimate = response.json()["label_estimates"]
    assert fine_tune["method"] == "fine-tune" and fine_tune["n_max"] == 24
    assert fine_tune["gain_per_doubling"] == pytest.approx(0.08)  # 12 -> 24 labels: +8 points
    # Budgets run from fewest labels to most, whatever their kind.
    table = response.json()["budget_table"]
    assert [(row["budget_label"], row["labeled_count"]) for row in table] == [
        (label, LABELED[label]) for label in ("4/class", "4/class", "50%", "50%", "all", "all")]

    slope, _ = np.polyfit(np.log([12, 24, 48]), [0.60, 0.71, 0.78], 1)
    assert estimate["method"] == "self-tuning"
    assert estimate["n_max"] == estimate["extra_labels"] == 48
    assert estimate["n_points"] == 3
    assert estimate["measured_top1"] == pytest.approx(0.78)
    assert estimate["gain_per_doubling"] == pytest.approx(slope * LN2)
    assert estimate["predicted_top1_at_double"] == pytest.approx(0.78 + slope * LN2)
    assert estimate["images_left"] == 0 and fine_tune["images_left"] == 24  # of 48
    assert 0 < estimate["gain_per_doubling_se"] < 0.05
    documented = schema["ExperimentOut"]["properties"]["label_estimates"]["description"]
    assert "extrapolation" in documented


@pytest.mark.browser
def test_the_page_shows_what_more_labels_would_buy_and_updates_it_as_runs_finish(
    live_server, settings, request
):
    from worker.runs import RunRecorder

    experiment_id, ids = seed_experiment(live_server.database_url, [
        ("self-tuning", "4/class", "succeeded", finished("4/class", 0.60)),
        ("self-tuning", "50%", "succeeded", finished("50%", 0.70)),
        ("self-tuning", "all", "running", {}),
        ("fine-tune", "4/class", "succeeded", finished("4/class", 0.50)),
        ("fine-tune", "50%", "queued", {}),
        ("fine-tune", "all", "queued", {}),
    ])
    flat_id, _ = seed_experiment(live_server.database_url, [
        ("fine-tune", label, "succeeded", finished(label, 0.60)) for label in LABELED])
    single_budget_id, _ = seed_experiment(live_server.database_url, [
        ("self-tuning", "4/class", "succeeded", finished("4/class", 0.60)),
    ])
    noisy_id, _ = seed_experiment(live_server.database_url, [
        ("fine-tune", "4/class", "succeeded", finished("4/class", 0.60)),
        ("fine-tune", "50%", "succeeded", finished("50%", 0.50)),
        ("self-tuning", "4/class", "succeeded", finished("4/class", 0.60)),
        ("self-tuning", "50%", "succeeded", finished("50%", 0.70)),
        ("self-tuning", "all", "succeeded", finished("all", 0.62)),
    ])
    rows = "#label-estimates tbody tr"

    def cells() -> list[str]:
        return page.locator(f"{rows} > *").all_inner_texts()

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        page.evaluate("window.sameDocument = true")  # a reload would drop this
        assert page.is_hidden("#estimates-note") and page.is_visible("#estimates-caveat")
        # 2 points on 12 test images said "+10.0 points" with nothing of how few they are.
        assert " ".join(page.inner_text("#estimates-caveat").split()).endswith(
            "close to 100%. Each top-1 is over the dataset's 12 test images: one image is 8.3 "
            "points, so a few images more or less right move it by points.")
        # Two budgets, two points: the line through them, and no standard error.
        assert cells() == ["Self-Tuning", "70.0% at 24 labels", "80.0% at 48 labels (+24)",
                           "+10.0 points"]

        # The "all" run finishes: the worker's own recorder writes it and tells the page.
        RunRecorder(settings, ids[("self-tuning", "all")], experiment_id).finish(
            "succeeded", metrics=finished("all", 0.78))
        page.wait_for_function(
            "(selector) => document.querySelector(selector).textContent.includes('96 labels')",
            arg=f"{rows} td:nth-child(3)")
        assert cells() == ["Self-Tuning", "78.0% at 48 labels",
                           "87.0% at 96 labels (+48; this dataset has no more images)",
                           "+9.0 ± 0.6 points"]
        assert page.evaluate("window.sameDocument") is True
        assert page.locator(rows).count() == 1  # fine-tune still has one budget
        browser.screenshot("1-estimates")

        # One unlucky seed tilts a line down: it predicts nothing. A gain smaller than its
        # standard error is flagged (a fall of 18 points per doubling was shown as a forecast).
        page.goto(f"{live_server.url}/experiments/{noisy_id}")
        page.wait_for_selector(f"{rows} >> nth=1")
        assert cells() == [
            "Fine-tuning", "50.0% at 24 labels",
            "none: top-1 did not rise with labels in these runs", "−10.0 points",
            "Self-Tuning", "62.0% at 48 labels",
            "63.0% at 96 labels (+48; this dataset has no more images)",
            "+1.0 ± 5.2 points (within the scatter of the runs)"]
        browser.screenshot("2-noisy-estimates")

        # Three runs on one flat line: no scatter at all, so nothing is "within" it.
        page.goto(f"{live_server.url}/experiments/{flat_id}")
        page.wait_for_selector(rows)
        assert cells() == [
            "Fine-tuning", "60.0% at 48 labels",
            "none: top-1 did not rise with labels in these runs", "+0.0 ± 0.0 points"]

        page.goto(f"{live_server.url}/experiments/{single_budget_id}")
        page.wait_for_selector("#budget-table tbody tr")
        assert page.is_hidden("#label-estimates") and page.is_hidden("#estimates-caveat")
        assert re.search(r"two or more budgets", page.inner_text("#estimates-note"))
        browser.assert_no_errors()
