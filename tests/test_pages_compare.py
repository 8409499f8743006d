"""Experiments side by side: ticked in the list, one chart and one table (/experiments/compare)."""

from __future__ import annotations

import csv
import io
import re

import pytest
import redis
from playwright.sync_api import expect

from app.db import session_scope
from app.models import Dataset, Experiment, Run
from tests.browser import open_browser
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import mark_running, start_sweep
from tests.test_pages_fixes import finish

pytestmark = pytest.mark.browser

# Two classes of 10 labeled training images: 1/class keeps 2 labels, 50% 10, all 20.
SCORES = {  # (experiment, method, budget label, seed): test top-1
    ("first", "fine-tune", "50%", 0): 0.60, ("first", "fine-tune", "50%", 1): 0.70,
    ("first", "self-tuning", "50%", 0): 0.80, ("first", "self-tuning", "50%", 1): 0.70,
    ("first", "fine-tune", "all", 0): 0.85, ("first", "fine-tune", "all", 1): 0.95,
    ("first", "self-tuning", "all", 0): 0.90,  # its seed 1 is still queued
    ("second", "fine-tune", "1/class", 0): 0.55, ("second", "fine-tune", "50%", 0): 0.75,
}


def cells(page) -> list[list[str]]:
    return [[" ".join(cell.split()) for cell in row.locator("th, td").all_inner_texts()]
            for row in page.locator("#budget-table tbody tr").all()]


def test_ticked_experiments_are_compared_on_one_chart_and_one_table(live_server, request):
    database_url, live = live_server.database_url, redis.Redis.from_url(live_server.redis_url)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        first, _ = start_sweep(client, dataset_id, name="first", budgets=["50%", "all"])
        second, _ = start_sweep(client, dataset_id, name="second", budgets=["1/class", "50%"],
                                methods=["fine-tune"], seeds=[0])
        start_sweep(client, dataset_id, name="not ticked", seeds=[0])
    names = {first: "first", second: "second"}
    with session_scope(database_url) as session:
        runs = {(names[run.experiment_id], run.method, run.budget_label, run.seed): run.id
                for run in session.query(Run).filter(Run.experiment_id.in_(names))}
    for key, score in SCORES.items():
        mark_running(database_url, runs[key])
        finish(database_url, live, runs[key], {"test_top1": score})

    with open_browser(request.node.name, back_forward_cache=True) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments")
        # One ticked is said on the list, the tick kept (it was a bare "Error 422" page).
        page.check("#experiments input[aria-label='Compare first']")
        page.click("#compare")
        expect(page.locator("#compare-error")).to_have_text(
            "Tick one more experiment to compare (2 to 6).")
        assert page.url == f"{live_server.url}/experiments"
        assert page.is_checked("#experiments input[aria-label='Compare first']")
        page.check("#experiments input[aria-label='Compare second']")
        page.click("#compare")
        page.wait_for_url(re.compile(r"/experiments/compare\?ids=\d+&ids=\d+$"))
        assert page.title() == "Comparing 2 experiments — Self-Tuning Lab"
        assert page.locator("#compared tbody a[href^='/experiments/']").all_inner_texts() == [
            "second", "first"]  # the list's order: newest first

        # Budgets from fewest labels to most; each experiment's methods; the best of each
        # budget across both marked (among the most finished seeds: 50%'s two-seed methods).
        assert page.locator("#budget-table thead th").all_inner_texts() == [
            "Experiment", "Method", "1/class", "50%", "all"]
        assert cells(page) == [
            [f"second #{second}", "Fine-tuning", "★ best: 55.0 2 labels", "75.0 10 labels", ""],
            [f"first #{first}", "Fine-tuning", "", "65.0 ± 7.1 10 labels",
             "★ best: 90.0 ± 7.1 20 labels"],
            [f"first #{first}", "Self-Tuning", "", "★ best: 75.0 ± 7.1 10 labels",
             "90.0 (1 of 2) 20 labels"],
        ]
        # One line per experiment and method, each through its own budgets.
        page.wait_for_function("Chart.getChart(document.getElementById('budget-chart'))")
        assert browser.chart_points("#budget-chart") == {
            f"second (#{second}) · Fine-tuning": 2, f"first (#{first}) · Fine-tuning": 2,
            f"first (#{first}) · Self-Tuning": 2}
        dashes = page.evaluate("Chart.getChart(document.getElementById('budget-chart'))"
                               ".data.datasets.map((d) => d.borderDash.length > 0)")
        assert dashes == [False, True, True]  # those of the experiment listed second are dashed
        # and so are their keys in the legend (a stretch of line each, not a filled box)
        keys = ("Chart.getChart(document.getElementById('budget-chart')).legend.legendItems"
                ".map((item) => [item.pointStyle, item.lineDash?.length > 0])")
        assert page.evaluate(keys) == [["line", False], ["line", True], ["line", True]]
        browser.screenshot("compared")
        # The table as CSV, from the page's link: the same values, fractions.
        href = page.get_attribute("#result-downloads a", "href")
        assert href == f"/api/experiments/compare.csv?ids={second}&ids={first}"
        table = list(csv.DictReader(io.StringIO(page.request.get(live_server.url + href).text())))
        assert [(row["experiment_id"], row["experiment_name"], row["budget_label"],
                 row["labeled_count"], row["method"], row["finished"], row["mean_top1"],
                 row["best"]) for row in table] == [
            (str(second), "second", "1/class", "2", "fine-tune", "1", "0.55", "True"),
            (str(second), "second", "50%", "10", "fine-tune", "1", "0.75", "False"),
            (str(first), "first", "50%", "10", "fine-tune", "2", "0.65", "False"),
            (str(first), "first", "50%", "10", "self-tuning", "2", "0.75", "True"),
            (str(first), "first", "all", "20", "fine-tune", "2", "0.9", "True"),
            (str(first), "first", "all", "20", "self-tuning", "1", "0.9", "False"),
        ]
        # The first experiment has a run to go: its result comes in without a reload, in the
        # table and on the chart, and its status with it.
        assert page.inner_text(f"#compared-status-{first}") == "in progress"
        assert page.evaluate("Chart.getChart(document.getElementById('budget-chart'))"
                             ".data.datasets[2].data[2]") == pytest.approx(0.90)
        mark_running(database_url, runs[("first", "self-tuning", "all", 1)])
        finish(database_url, live, runs[("first", "self-tuning", "all", 1)], {"test_top1": 0.8})
        expect(page.locator("#budget-table tbody tr").nth(2).locator("td").nth(2)).to_have_text(
            "85.0 ± 7.1 20 labels", use_inner_text=True)
        expect(page.locator(f"#compared-status-{first}")).to_have_text("finished")
        page.wait_for_function("Chart.getChart(document.getElementById('budget-chart'))"
                               ".data.datasets[2].data[2] > 0.849")
        # Of its own experiment's budgets (2), not the chart's (3: it said "2 of 3").
        summary = page.get_attribute("#budget-chart", "aria-label")
        assert "Self-Tuning: highest 85.0% at all (20 labels), 2 of 2 budgets measured" in summary
        assert (f"second (#{second}) · Fine-tuning: highest 75.0% at 50% (10 labels), 2 of 2 "
                "budgets measured") in summary
        assert page.locator("[data-going]").count() == 0  # nothing to go: no more reads

        # Back from an experiment's page once it was renamed since: read again, not the page
        # as it was left (the browser's back/forward cache).
        page.click(f"#budget-table a[href='/experiments/{first}']")
        page.wait_for_url(re.compile(rf"/experiments/{first}$"))
        with live_server.client() as client:
            assert client.patch(f"/api/experiments/{first}", json={
                "name": "first, renamed with a much longer name"}).status_code == 200
        page.go_back(wait_until="commit")
        page.wait_for_url(re.compile(r"/experiments/compare\?"), wait_until="commit")
        expect(page.locator("#compared tbody a[href^='/experiments/']").nth(1)).to_have_text(
            "first, renamed with a much longer name")
        # The legend cuts a long name (four took a phone's chart box); the tooltip has it.
        # The chart is drawn again after the table takes the new name (read_again.js).
        legend_texts = ("Chart.getChart(document.getElementById('budget-chart'))"
                        "?.legend.legendItems.map((item) => item.text)")
        page.wait_for_function(f"({legend_texts} ?? []).some((text) => text.includes('much'))")
        legend = page.evaluate(legend_texts)
        assert legend == [f"second (#{second}) · Fine-tuning",
                          f"first, renamed with a much… (#{first}) · Fine-tuning",
                          f"first, renamed with a much… (#{first}) · Self-Tuning"]
        assert f"first, renamed with a much longer name (#{first}) · Self-Tuning" in (
            browser.chart_points("#budget-chart"))
        browser.assert_no_errors()

        # One ticked, or one that does not exist, is said on the page.
        shown = page.goto(f"{live_server.url}/experiments/compare?ids={first}")
        assert shown.status == 422
        assert page.inner_text("#error-detail") == (
            "choose 2 to 6 experiments to compare: 1 chosen")
        shown = page.goto(f"{live_server.url}/experiments/compare?ids={first}&ids=999999")
        assert shown.status == 404
        assert "999999" in page.inner_text("#error-detail")
    with live_server.client() as client:  # the API's answers to the same
        alone = client.get("/api/experiments/compare.csv", params={"ids": [first, first]})
        gone = client.get("/api/experiments/compare.csv", params={"ids": [first, 999999]})
    assert (alone.status_code, alone.json()) == (
        422, {"detail": "choose 2 to 6 experiments to compare: 1 chosen"})
    assert (gone.status_code, gone.json()) == (
        404, {"detail": "experiment 999999 does not exist"})


def add_sweeps(database_url: str, count: int) -> dict[str, int]:
    """`count` experiments named "sweep 0", "sweep 1", ... (oldest first) on a dataset of their
    own, without runs; their ids by name."""
    dataset_id = add_dataset_row(database_url)
    with session_scope(database_url) as session:
        session.add_all(Experiment(name=f"sweep {number}", dataset_id=dataset_id, backbone="b",
                                   methods=["fine-tune"], budgets=[0.5], seeds=[0],
                                   preset="quick") for number in range(count))
    with session_scope(database_url) as session:
        return {experiment.name: experiment.id for experiment in session.query(Experiment)
                if experiment.dataset_id == dataset_id}


def test_experiments_ticked_on_two_pages_of_the_list_are_compared_together(live_server, request):
    """The list shows 100 experiments a page, and a tick was lost with its page: two
    experiments 100 apart could not be compared from the list. Ticks are kept for the tab."""
    ids = add_sweeps(live_server.database_url, 101)
    newest, oldest = ids["sweep 100"], ids["sweep 0"]

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments")
        page.check("input[aria-label='Compare sweep 100']")  # the newest: page 1
        assert page.is_hidden("#ticked-elsewhere")
        page.click("nav.pager a[rel=next] >> nth=0")
        page.wait_for_url(re.compile(r"/experiments\?page=2$"))
        expect(page.locator("#ticked-elsewhere")).to_have_text(
            "Also ticked on other pages: sweep 100 Untick them")
        page.check("input[aria-label='Compare sweep 0']")  # the oldest: page 2
        browser.screenshot("ticked-on-two-pages")
        page.click("#compare")
        page.wait_for_url(re.compile(rf"/experiments/compare\?ids={oldest}&ids={newest}$"))
        assert page.locator("#compared tbody a[href^='/experiments/']").all_inner_texts() == [
            "sweep 0", "sweep 100"]

        page.go_back()  # the list's page 2 as it was left: its tick, and the other page's
        page.wait_for_url(re.compile(r"/experiments\?page=2$"))
        expect(page.locator("input[aria-label='Compare sweep 0']")).to_be_checked()
        page.click("#ticked-elsewhere button")
        assert page.is_hidden("#ticked-elsewhere")
        page.goto(f"{live_server.url}/experiments")
        expect(page.locator("input[aria-label='Compare sweep 100']")).not_to_be_checked()
        expect(page.locator("#ticked-elsewhere")).to_have_text(
            "Also ticked on other pages: sweep 0 Untick them")
        browser.assert_no_errors()


def test_ticks_of_deleted_experiments_are_forgotten_and_left_out_of_the_comparison(
        live_server, request):
    """Ticks are kept for the tab, so one may outlive its experiment: comparing it answered a
    404 for the whole comparison, and the list kept showing it ticked."""
    ids = add_sweeps(live_server.database_url, 103)

    def delete(name: str) -> None:
        with live_server.client() as client:
            assert client.delete(f"/api/experiments/{ids[name]}").status_code == 204

    with live_server.client() as client:  # the list's `ids` leaves out what does not exist
        listed = client.get("/api/experiments", params={"ids": [ids["sweep 1"], 999999,
                                                                ids["sweep 0"]]})
        too_many = client.get("/api/experiments", params={"ids": list(range(1, 102))})
    assert listed.status_code == 200
    assert [item["name"] for item in listed.json()] == ["sweep 1", "sweep 0"]
    assert listed.headers["X-Total-Count"] == "2"
    assert too_many.status_code == 422

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments?page=2")  # the oldest three
        for number in range(3):
            page.check(f"input[aria-label='Compare sweep {number}']")
        page.goto(f"{live_server.url}/experiments")
        page.check("input[aria-label='Compare sweep 102']")
        expect(page.locator("#ticked-elsewhere")).to_have_text(
            "Also ticked on other pages: sweep 0, sweep 1, sweep 2 Untick them")

        delete("sweep 0")
        page.reload()  # the list asks after the ticks of other pages
        expect(page.locator("#ticked-elsewhere")).to_have_text(
            "Also ticked on other pages: sweep 1, sweep 2 Untick them")

        delete("sweep 1")  # deleted after the list was read: the comparison leaves it out
        page.click("#compare")
        page.wait_for_url(re.compile(r"/experiments/compare\?"))
        assert page.locator("#compared tbody a[href^='/experiments/']").all_inner_texts() == [
            "sweep 102", "sweep 2"]
        assert page.inner_text("#compare-gone") == (
            f"Experiment {ids['sweep 1']} does not exist (deleted?): compared without it.")
        page.goto(f"{live_server.url}/experiments")  # and the compare page forgot its tick
        expect(page.locator("#ticked-elsewhere")).to_have_text(
            "Also ticked on other pages: sweep 2 Untick them")

        delete("sweep 2")  # one left to compare: said so, with what to do
        shown = page.goto(f"{live_server.url}/experiments/compare?ids={ids['sweep 102']}"
                          f"&ids={ids['sweep 2']}")
        assert shown.status == 404
        assert page.inner_text("#error-detail") == (
            f"Experiment {ids['sweep 2']} does not exist (deleted?): tick another experiment to "
            "compare with.")
        page.click("text=Open sweep 102")  # the one left is a click away
        page.wait_for_url(f"{live_server.url}/experiments/{ids['sweep 102']}")
        browser.assert_no_errors(expected=("404",))


def test_experiments_on_different_datasets_each_have_their_best_starred(live_server):
    """Another dataset's test images are others: its top-1 does not compare, and the star went
    to 56.7 over 0.0 on two datasets as if one method had won. A dataset made from another by
    adding labels keeps its test split, and compares with it (the link "what the added labels
    bought" leads here: the page had said they did not compare)."""
    database_url, live = live_server.database_url, redis.Redis.from_url(live_server.redis_url)
    ours, theirs = add_dataset_row(database_url), add_dataset_row(database_url)
    ours_labeled, ours_labeled_more = add_dataset_row(database_url), add_dataset_row(database_url)
    with session_scope(database_url) as session:
        session.get(Dataset, ours_labeled).derived_from_id = ours
        session.get(Dataset, ours_labeled_more).derived_from_id = ours_labeled
    with live_server.client() as client:
        first, _ = start_sweep(client, ours, name="ours", budgets=["50%"],
                               methods=["fine-tune"], seeds=[0])
        second, _ = start_sweep(client, theirs, name="theirs", budgets=["50%"],
                                methods=["fine-tune", "self-tuning"], seeds=[0])
        third, _ = start_sweep(client, ours, name="ours again", budgets=["50%"],
                               methods=["fine-tune"], seeds=[0])
        fourth, _ = start_sweep(client, ours_labeled_more, name="ours + labels",
                                budgets=["50%"], methods=["fine-tune"], seeds=[0])
    scores = {first: {"fine-tune": 0.9}, second: {"fine-tune": 0.2, "self-tuning": 0.3},
              third: {"fine-tune": 0.8}, fourth: {"fine-tune": 0.95}}
    with session_scope(database_url) as session:
        runs = [(run.id, scores[run.experiment_id][run.method]) for run in
                session.query(Run).filter(Run.experiment_id.in_(scores))]
    for run_id, score in runs:
        mark_running(database_url, run_id)
        finish(database_url, live, run_id, {"test_top1": score})
    with live_server.client() as client:
        answer = client.get("/api/experiments/compare.csv", params={"ids": [first, second, third]})
        rows = [(int(row["experiment_id"]), row["method"], row["best"])
                for row in csv.DictReader(io.StringIO(answer.text))]
        assert rows == [(first, "fine-tune", "True"), (second, "fine-tune", "False"),
                        (second, "self-tuning", "True"), (third, "fine-tune", "False")]
        page = client.get("/experiments/compare", params={"ids": [first, second, third]}).text
        assert ("The best at each budget, among the experiments scored on one test split (a "
                "dataset's, shared by those made from it by adding labels; another") in (
            " ".join(page.split()))
        same = client.get("/experiments/compare", params={"ids": [first, third]}).text
        assert "across these experiments, is marked" in " ".join(same.split())

        answer = client.get("/api/experiments/compare.csv", params={"ids": [first, fourth]})
        assert [(int(row["experiment_id"]), row["best"]) for row in csv.DictReader(
            io.StringIO(answer.text))] == [(first, "False"), (fourth, "True")]
        labeled = client.get("/experiments/compare", params={"ids": [first, fourth]}).text
        assert "across these experiments, is marked" in " ".join(labeled.split())
