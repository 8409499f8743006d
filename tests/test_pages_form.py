"""The start-experiment form in Chromium: preset values, refills, and the API's validation
messages next to the fields they are about; and the pages behind the API token."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from app.db import session_scope
from app.deps import AUTH_COOKIE
from app.models import Dataset
from tests.browser import DESKTOP, PHONE, open_browser
from tests.support import add_dataset_row


@pytest.fixture
def dataset_id(live_server) -> int:
    """A dataset row is all the form needs; no images are read until a run trains."""
    with session_scope(live_server.database_url) as session:
        dataset = Dataset(
            name="shapes", storage_key="shapes-form-test", fingerprint="0" * 64,
            class_names=["circle", "square"],
            class_counts={"circle": {"train": 10, "test": 3}, "square": {"train": 10, "test": 3}},
            unlabeled_count=5, image_count=31,
        )
        session.add(dataset)
        session.flush()
        return dataset.id


def error_next_to(page, field: str) -> str:
    locator = page.locator(f'[data-field="{field}"] .field-error')
    locator.wait_for(state="visible")
    return locator.inner_text()


@pytest.mark.browser
def test_form_fills_presets_and_shows_api_errors_next_to_their_fields(
    live_server, dataset_id, request
):
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        assert page.input_value("#f-dataset_id") == str(dataset_id)
        assert page.input_value("#f-backbone") == "tf_efficientnet_lite0"
        assert page.input_value("#f-iterations") == "400"
        assert page.input_value("#f-image_size") == "64"
        assert page.input_value("#f-labeled_query_view") == "weak"
        page.select_option("#f-preset", "paper")
        assert page.input_value("#f-iterations") == "27000"
        assert page.input_value("#f-image_size") == "224"
        assert page.input_value("#f-labeled_query_view") == "strong"
        page.select_option("#f-preset", "quick")
        assert page.input_value("#f-iterations") == "400"
        assert page.input_value("#f-labeled_query_view") == "weak"
        assert "8 runs" in page.inner_text("#run-count")  # 2 methods x 4 budgets x 1 seed
        # The preset in a sentence, as text (it was its whole docstring, backticks and all).
        assert page.inner_text("#preset-about") == (
            "CPU-sized: 64 px, 16 + 16 images, 400 iterations (a few minutes on 2 cores).")
        # A cleared number runs with the preset's value, and the field says so.
        assert page.get_attribute("#f-iterations", "placeholder") == "400 (preset)"

        # Schema errors: all at once, each beside its own field.
        page.fill("#f-lr", "0")
        page.uncheck("input[name=methods][value=self-tuning]")
        page.uncheck("input[name=methods][value=fine-tune]")
        page.click("#start")
        assert "greater than 0" in error_next_to(page, "overrides.lr")
        assert error_next_to(page, "methods") == "choose at least one method"
        assert page.locator('[data-field="budgets"] .field-error').is_hidden()
        # The keyboard lands on the first field to fix.
        assert page.evaluate("document.activeElement.name") == "methods"
        browser.screenshot("form-schema-errors")

        page.fill("#f-lr", "0.01")
        page.check("input[name=methods][value=fine-tune]")
        page.fill("#f-budgets", "30%, 150%")
        page.click("#start")
        # Where the API says budgets[1], the form says which of those typed in.
        assert "the 2nd budget: budget fraction 1.5 must be in (0, 1]" in error_next_to(
            page, "budgets")
        assert page.locator('[data-field="overrides.lr"] .field-error').is_hidden()
        assert page.evaluate("document.activeElement.id") == "f-budgets"
        page.fill("#f-budgets", "all, 100%")
        page.click("#start")
        expect(page.locator('[data-field="budgets"] .field-error')).to_have_text(
            "the 2nd budget: the same budget as the 1st (all)")

        # What the form sends: budgets in the API's terms, only the values that differ from
        # the preset.
        page.fill("#f-budgets", "5%, 15%, 4/class, all")
        page.fill("#f-seeds", "0, 1")
        page.fill("#f-backbone", "no_such_network")
        assert page.input_value("#f-lr_milestones") == "0.75"
        page.fill("#f-lr_milestones", "0.5, 0.9")
        page.fill("#f-cpu_threads", "1")
        page.select_option("#f-labeled_query_view", "strong")
        with page.expect_request("**/api/experiments") as sent:
            page.click("#start")
        assert sent.value.post_data_json == {
            "dataset_id": dataset_id, "name": "", "backbone": "no_such_network",
            "methods": ["fine-tune"], "budgets": [0.05, 0.15, {"per_class": 4}, "all"],
            "seeds": [0, 1], "preset": "quick",
            "overrides": {"lr": 0.01, "lr_milestones": [0.5, 0.9], "cpu_threads": 1,
                          "labeled_query_view": "strong"},
        }
        assert "unknown backbone 'no_such_network'" in error_next_to(page, "backbone")
        page.fill("#f-backbone", "tf_efficientnet_lite0")
        page.fill("#f-lr_milestones", "0.9, 0.5")
        page.click("#start")
        assert "must be increasing fractions" in error_next_to(page, "overrides.lr_milestones")
        # In words beside the field, not pydantic's "Input should be a valid number".
        page.fill("#f-lr_milestones", "0.5 0.9")
        page.fill("#f-iterations", "2.5")
        page.click("#start")
        expect(page.locator('[data-field="overrides.lr_milestones"] .field-error')).to_have_text(
            'must be a number, not "0.5 0.9": separate the values with commas')
        assert error_next_to(page, "overrides.iterations") == "must be a whole number, not 2.5"
        page.fill("#f-iterations", "400")
        page.fill("#f-lr_milestones", "0.5, 0.9")
        assert "8 runs" in page.inner_text("#run-count")

        # The form's own budget spellings are checked before anything is sent.
        page.fill("#f-budgets", "30%, lots")
        page.click("#start")
        assert "“lots” is not a budget" in error_next_to(page, "budgets")
        assert page.url.endswith(f"/experiments/new?dataset_id={dataset_id}")
        browser.screenshot("form-budget-error")
        browser.assert_no_errors(expected=("status of 422",))


@pytest.mark.server_env(SELFTUNE_API_TOKEN="s3cret")
def test_pages_ask_for_the_token_and_say_what_is_missing(live_server):
    url = live_server.url
    for path in ["/experiments", "/experiments/new", "/experiments/7", "/runs/7",
                 "/experiments/new?dataset_id=5&seeds=0%2C1"]:
        response = httpx.get(url + path, follow_redirects=False)
        assert response.status_code == 303, path
        location = httpx.URL(response.headers["location"])
        # The whole address, query included, comes back after the login.
        assert location.path == "/login" and location.params["next"] == path
    with httpx.Client(base_url=url, cookies={AUTH_COOKIE: "s3cret"}) as client:
        assert "No experiments yet" in client.get("/experiments").text
        assert "There is no dataset yet" in client.get("/experiments/new").text
        missing = client.get("/experiments/7")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "experiment 7 does not exist"
        assert client.get("/runs/7").json()["detail"] == "run 7 does not exist"
        # A browser gets the same answers as pages; the API stays JSON whatever it accepts.
        html = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        for path, status, text in [
            ("/experiments/7", 404, "Experiment 7 does not exist. It may have been deleted."),
            ("/runs/7", 404, "Run 7 does not exist. It may have been deleted."),
            ("/runs/seven", 404, "There is no page at this address."),
            ("/no/such/page", 404, "There is no page at this address."),
            ("/experiments/new?dataset_id=x", 422, "dataset_id: "),
        ]:
            page = client.get(path, headers=html)
            assert page.status_code == status, path
            assert page.headers["content-type"].startswith("text/html"), path
            assert text in page.text and "<h1>" in page.text, (path, page.text)
        api = client.get("/api/runs/7", headers=html)
        assert api.status_code == 404 and api.json()["detail"] == "run 7 does not exist"


@pytest.mark.browser
def test_the_form_counts_distinct_runs_and_reports_every_mistake_at_once(
    live_server, dataset_id, request
):
    """With budgets "5%, 5%, abc" and seeds "0, x" it said 8 runs, showed the budget's error
    only, and the seed's came later as pydantic's text."""
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        page.fill("#f-budgets", "5%, 5%, abc")
        page.fill("#f-seeds", "0, x")
        page.dispatch_event("#f-seeds", "input")
        assert "This sweep is 2 runs (2 methods × 1 budget × 1 seed)." in page.inner_text(
            "#run-count")
        page.fill("#f-seeds", "0, 1, 1")
        page.dispatch_event("#f-seeds", "input")
        assert "(2 methods × 1 budget × 2 seeds)" in page.inner_text("#run-count")
        page.fill("#f-seeds", "0, x")
        sent = []  # starts (the form's checks as it is filled in go to /api/experiments/check)
        page.on("request", lambda r: sent.append(r.url) if r.method == "POST"
                and r.url.endswith("/api/experiments") else None)
        page.click("#start")
        assert "“abc” is not a budget" in error_next_to(page, "budgets")
        assert error_next_to(page, "seeds") == (
            "“x” is not a seed: write whole numbers such as 0, 1, 2")
        assert sent == []  # found in the page: nothing was sent
        # The check of the other fields (POST /api/experiments/check) refuses these too.
        browser.assert_no_errors(expected=("status of 422",))


@pytest.mark.browser
def test_a_mistake_the_page_finds_does_not_hide_those_the_server_finds(
    live_server, dataset_id, request
):
    """With seeds "x", no method and iterations -5, Start showed the seed's mistake alone;
    the other two came one press later, once the seed was mended."""
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        for method in page.locator("input[name=methods]").all():
            method.uncheck()
        page.fill("#f-seeds", "x")
        page.fill("#f-iterations", "-5")
        page.click("#start")
        assert error_next_to(page, "seeds") == (
            "“x” is not a seed: write whole numbers such as 0, 1, 2")
        assert error_next_to(page, "methods") != ""
        assert "greater than or equal to 1" in error_next_to(page, "overrides.iterations")
        assert page.locator(".field.invalid").count() == 3
        browser.assert_no_errors(expected=("status of 422",))


@pytest.mark.browser
def test_the_form_shows_the_experiments_warnings_before_it_starts(live_server, request):
    """What the experiment page would warn about shows under the form as it is filled in
    (from POST /api/experiments/check), and goes when the form changes; nothing is made
    until Start."""
    dataset_id = add_dataset_row(live_server.database_url)  # no unlabeled image
    warnings = "#form-warnings .warning"
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        page.fill("#f-budgets", "50%, all")
        page.wait_for_selector(f"{warnings}:has-text('no image is unlabeled')")
        assert page.locator(warnings).all_inner_texts() == [
            "At budget 'all' no image is unlabeled (the budget keeps every label and the "
            "dataset has no unlabeled images): Self-Tuning trains on the labeled images alone."]
        browser.screenshot("warning-before-start")

        page.fill("#f-budgets", "50%")
        page.wait_for_selector(warnings, state="detached")
        page.fill("#f-unlabeled_batch_size", "0")
        page.wait_for_selector(f"{warnings}:has-text('leaves every unlabeled image out')")
        page.uncheck("input[name=methods][value=self-tuning]")  # fine-tuning alone: nothing
        page.wait_for_selector(warnings, state="detached")
        with httpx.Client(base_url=live_server.url) as client:
            assert client.get("/api/experiments").json() == []
        browser.assert_no_errors()


@pytest.mark.browser
def test_the_form_for_a_dataset_that_is_gone_says_so_and_chooses_none_in_its_place(
    live_server, dataset_id, request
):
    """/experiments/new?dataset_id=9999 (a dataset deleted in another tab) chose the newest
    dataset without a word: Start would have trained on data the user had not asked for."""
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?dataset_id=9999")
        assert page.inner_text("#dataset-missing") == (
            "Dataset 9999 does not exist (deleted?); choose one below.")
        assert page.input_value("#f-dataset_id") == ""
        page.click("#start")
        assert error_next_to(page, "dataset_id") == "Choose a dataset."
        with httpx.Client(base_url=live_server.url) as client:
            assert client.get("/api/experiments").json() == []

        page.select_option("#f-dataset_id", str(dataset_id))  # a deliberate choice starts
        page.click("#start")
        page.wait_for_url(re.compile(r".*/experiments/\d+$"))
        browser.screenshot("started-on-the-chosen-dataset")
        browser.assert_no_errors(expected=("status of 422",))  # the check, without a dataset


@pytest.mark.browser
def test_the_budgets_follow_the_chosen_dataset_until_the_user_types_some(
    live_server, dataset_id, request
):
    """Classes of three labeled images keep the same one at 15 % and at 30 %: the form offered
    those on every dataset and opened such a dataset with a refusal. The offer follows the
    dataset chosen; budgets the user typed stay when the dataset changes."""
    small = add_dataset_row(live_server.database_url,
                            {name: {"train": 3, "test": 1} for name in ("x", "y")})
    with open_browser(request.node.name) as browser:
        page = browser.page
        with page.expect_response("**/api/experiments/check") as checked:
            page.goto(f"{live_server.url}/experiments/new?dataset_id={small}")
        assert checked.value.status == 200
        assert page.input_value("#f-budgets") == "30%, 50%, all"
        assert "6 runs" in page.inner_text("#run-count")
        assert page.locator('[data-field="budgets"] .field-error').is_hidden()

        page.select_option("#f-dataset_id", str(dataset_id))  # ten a class: the whole ladder
        assert page.input_value("#f-budgets") == "15%, 30%, 50%, all"
        assert "8 runs" in page.inner_text("#run-count")
        page.fill("#f-budgets", "10%, all")
        page.select_option("#f-dataset_id", str(small))
        assert page.input_value("#f-budgets") == "10%, all"
        browser.assert_no_errors()


@pytest.mark.browser
@pytest.mark.parametrize("window", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_chosen_dataset_is_read_whole_where_the_window_has_room(
    live_server, request, window
):
    """The dataset's name and counts ("animal-mnist — 10 classes, 7,716 labeled, 0 unlabe")
    were cut at the width of the other fields; a select cannot wrap. On a phone it stays
    inside the window."""
    dataset_id = add_dataset_row(
        live_server.database_url,
        {f"species-{n}": {"train": 1000, "test": 200} for n in range(12)},
        name="camera-traps-north", unlabeled_count=67890)
    with open_browser(request.node.name, viewport=window) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        fit = page.evaluate("""() => {
            const select = document.querySelector('#f-dataset_id');
            const style = getComputedStyle(select);
            const pen = document.createElement('canvas').getContext('2d');
            pen.font = style.font;
            return {text: select.options[select.selectedIndex].text,
                    needs: pen.measureText(select.options[select.selectedIndex].text).width,
                    room: select.clientWidth - parseFloat(style.paddingLeft)
                          - parseFloat(style.paddingRight) - 20};  // 20: the arrow
        }""")
        browser.screenshot("dataset-choice")
        assert fit["text"] == ("camera-traps-north — 12 classes, 12,000 labeled, "
                               "67,890 unlabeled")
        if window == DESKTOP:
            assert fit["needs"] <= fit["room"], fit
        assert browser.horizontal_overflow() == 0
        browser.assert_no_errors()


@pytest.mark.browser
def test_a_similar_experiment_starts_from_the_settings_of_the_one_it_is_like(
    live_server, dataset_id, request
):
    """Running a sweep again with one thing changed (more seeds, say) meant typing every
    method, budget and hyper-parameter in again. The experiment page's link opens the form
    with its settings, and Start sends them back as they were, less what was changed."""
    other = add_dataset_row(live_server.database_url,
                            {name: {"train": 8, "test": 2} for name in ("x", "y")})
    first = {"dataset_id": dataset_id, "name": "first try", "backbone": "tf_efficientnet_lite0",
             "methods": ["fine-tune", "fixmatch"], "budgets": [0.3, {"per_class": 2}, "all"],
             "seeds": [3, 5], "preset": "quick",
             "overrides": {"iterations": 40, "lr": 0.01, "lr_milestones": [0.5, 0.9],
                           "labeled_query_view": "strong", "pretrained": False}}
    with live_server.client() as client:
        created = client.post("/api/experiments", json=first)
        assert created.status_code == 201, created.text
        first_id = created.json()["id"]
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{first_id}")
        page.click("#start-similar")
        page.wait_for_url(f"**/experiments/new?like={first_id}")
        browser.screenshot("similar-experiment-form")
        assert page.inner_text("#like-note") == (
            f"The settings of experiment #{first_id} “first try”: change what you want to try, "
            "then start.")
        assert page.input_value("#f-dataset_id") == str(dataset_id)
        assert page.input_value("#f-name") == ""
        assert [m for m in ("self-tuning", "fine-tune", "fixmatch")
                if page.is_checked(f"input[name=methods][value={m}]")] == ["fine-tune", "fixmatch"]
        assert page.input_value("#f-budgets") == "30%, 2/class, all"
        assert page.input_value("#f-seeds") == "3, 5"
        assert page.input_value("#f-iterations") == "40"
        assert page.input_value("#f-image_size") == "64"  # the preset's, as before
        assert page.input_value("#f-lr_milestones") == "0.5, 0.9"
        assert page.input_value("#f-labeled_query_view") == "strong"
        assert not page.is_checked("#f-pretrained")
        # A cleared field runs with the preset's value, not the experiment's.
        assert page.get_attribute("#f-iterations", "placeholder") == "400 (preset)"
        assert "12 runs" in page.inner_text("#run-count")  # 2 methods x 3 budgets x 2 seeds
        # Its budgets were chosen, not suggested: another dataset keeps them.
        page.select_option("#f-dataset_id", str(other))
        assert page.input_value("#f-budgets") == "30%, 2/class, all"
        page.select_option("#f-dataset_id", str(dataset_id))

        page.fill("#f-seeds", "7")
        with page.expect_request("**/api/experiments") as sent:
            page.click("#start")
        page.wait_for_url(re.compile(r".*/experiments/\d+$"))
        assert sent.value.post_data_json == {**first, "name": "", "seeds": [7]}
        second_id = int(page.url.rsplit("/", 1)[1])
        browser.assert_no_errors()
    with live_server.client() as client:
        second = client.get(f"/api/experiments/{second_id}").json()
    assert second_id != first_id
    assert {key: second[key] for key in first} == {**first, "name": second["name"],
                                                   "seeds": [7]}


@pytest.mark.browser
def test_a_similar_experiment_of_one_that_is_gone_opens_the_usual_form(
    live_server, dataset_id, request
):
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/new?like=9999")
        assert page.inner_text("#like-missing") == (
            "Experiment 9999 does not exist (deleted?); the form has its usual values.")
        assert page.input_value("#f-dataset_id") == str(dataset_id)
        assert page.input_value("#f-seeds") == "0"
        assert page.input_value("#f-iterations") == "400"
        assert page.locator("#like-note").count() == 0
        browser.assert_no_errors()
