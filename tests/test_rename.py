"""Renaming a dataset or an experiment: `PATCH` over real HTTP, and the Rename form under the
title of their pages in Chromium."""

from __future__ import annotations

import pytest

from tests.browser import open_browser
from tests.support import add_dataset_row

EXPERIMENT = {"methods": ["fine-tune"], "budgets": [0.5], "seeds": [0],
              "overrides": {"iterations": 10}}


@pytest.fixture
def named(live_server) -> tuple[int, int]:
    """A dataset "shapes" and an experiment "first try" on it (its run stays queued)."""
    dataset_id = add_dataset_row(live_server.database_url)
    with live_server.client() as client:
        created = client.post("/api/experiments", json={
            **EXPERIMENT, "dataset_id": dataset_id, "name": "first try"})
    assert created.status_code == 201, created.text
    return dataset_id, created.json()["id"]


@pytest.mark.parametrize("kind", ["datasets", "experiments"])
def test_a_name_is_changed_and_a_bad_one_is_refused_leaving_the_old(live_server, named, kind):
    dataset_id, experiment_id = named
    url = f"/api/{kind}/{dataset_id if kind == 'datasets' else experiment_id}"
    with live_server.client() as client:
        before = client.get(url).json()
        renamed = client.patch(url, json={"name": "  camera traps, spring  "})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json() == {**before, "name": "camera traps, spring"}
        assert client.get(url).json()["name"] == "camera traps, spring"
        listed = client.get(f"/api/{kind}").json()
        assert [item["name"] for item in listed] == ["camera traps, spring"]
        # "e" + a combining accent is kept as the one character a person sees.
        assert client.patch(url, json={"name": "cafe\u0301"}).json()["name"] == "caf\u00e9"

        refusals = {
            "": "must not be empty",
            "   ": "must not be empty",
            "a\tb": "must not contain control characters (NUL, tab, line breaks)",
            "x" * 201: "String should have at most 200 characters",
        }
        for name, message in refusals.items():
            refused = client.patch(url, json={"name": name})
            assert refused.status_code == 422, name
            assert [(e["loc"], e["msg"]) for e in refused.json()["detail"]] == [
                (["body", "name"], message)]
        for body in ({"name": 5}, {}, {"name": "x", "budgets": [0.1]}):
            assert client.patch(url, json=body).status_code == 422, body
        unreadable = client.patch(url, content=b'{"name": "\xff"}',
                                  headers={"Content-Type": "application/json"})
        assert unreadable.status_code == 400
        assert client.get(url).json()["name"] == "caf\u00e9"

        gone = client.patch(f"/api/{kind}/999999", json={"name": "x"})
        assert gone.status_code == 404
        assert gone.json()["detail"] == f"{kind[:-1]} 999999 does not exist"
        # A page on another site cannot rename through the user's browser.
        forged = client.patch(url, json={"name": "pwned"},
                              headers={"Sec-Fetch-Site": "cross-site"})
        assert forged.status_code == 403
        assert client.get(url).json()["name"] == "caf\u00e9"


@pytest.mark.browser
@pytest.mark.parametrize("kind", ["datasets", "experiments"])
def test_rename_under_the_title_shows_the_new_name_at_once(live_server, named, kind, request):
    dataset_id, experiment_id = named
    path = f"/{kind}/{dataset_id if kind == 'datasets' else experiment_id}"
    old = "shapes" if kind == "datasets" else "first try"
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(live_server.url + path)
        assert page.is_hidden("#rename-form")
        page.click("#rename")
        assert page.input_value("#rename-name") == old
        assert page.evaluate("document.activeElement.id") == "rename-name"

        # Refused: said under the field, the title as it was, the field kept for a fix.
        page.fill("#rename-name", "   ")
        page.click("#rename-form button[type=submit]")
        error = page.locator("#rename-form .field-error")
        error.wait_for(state="visible")
        assert error.inner_text() == "The name must not be empty."
        assert page.inner_text("#title-name") == old
        assert page.evaluate("document.activeElement.id") == "rename-name"

        page.fill("#rename-name", "camera traps <spring>")
        with page.expect_response(f"**/api{path}") as answer:
            page.press("#rename-name", "Enter")
        assert answer.value.status == 200
        page.wait_for_selector("#rename-form", state="hidden")
        assert page.inner_text("#title-name") == "camera traps <spring>"
        # The tab's title too, after how an experiment stands (its one run waits).
        state = "queued · " if kind == "experiments" else ""
        assert page.title() == f"{state}camera traps <spring> — Self-Tuning Lab"
        assert page.evaluate("document.activeElement.id") == "rename"
        if kind == "datasets":  # what Delete will ask about
            assert page.get_attribute("[data-dataset-name]", "data-dataset-name") == (
                "camera traps <spring>")

        # Escape leaves it as it is.
        page.click("#rename")
        page.fill("#rename-name", "something else")
        page.press("#rename-name", "Escape")
        assert page.is_hidden("#rename-form")
        assert page.evaluate("document.activeElement.id") == "rename"
        browser.screenshot("renamed")
        page.reload()
        assert page.inner_text("#title-name") == "camera traps <spring>"
        browser.assert_no_errors(expected=("status of 422",))



def racing_app(settings, event_name: str, *statements: str):
    """The app in this process, each request's database session running `statements` (SQL)
    through another connection, as another request that lands at that moment, the first time
    the session's `event_name` fires."""
    from fastapi.testclient import TestClient
    from sqlalchemy import event, text

    from app.db import get_sessionmaker, session_scope
    from app.deps import get_db
    from app.main import create_app

    def racing_session():
        session = get_sessionmaker(settings.sqlalchemy_url)()

        def other_request(*_args) -> None:
            with session_scope(settings.sqlalchemy_url) as other:
                for statement in statements:
                    other.execute(text(statement))

        event.listen(session, event_name, other_request, once=True)
        try:
            yield session
        finally:
            session.close()

    app = create_app(settings)
    app.dependency_overrides[get_db] = racing_session
    return TestClient(app, base_url="http://localhost", client=("127.0.0.1", 50000))


@pytest.mark.parametrize("kind", ["datasets", "experiments"])
def test_a_rename_as_the_thing_is_deleted_is_a_404_not_a_500(settings, named, kind):
    """A rename and a delete at once: the rename's UPDATE found no row, and the answer was a
    500 (StaleDataError) where the thing is simply gone."""
    dataset_id, experiment_id = named
    runs = f"DELETE FROM runs WHERE experiment_id = {experiment_id}"
    experiment = f"DELETE FROM experiments WHERE id = {experiment_id}"
    deletes = {"datasets": (runs, experiment, f"DELETE FROM datasets WHERE id = {dataset_id}"),
               "experiments": (runs, experiment)}[kind]
    thing = dataset_id if kind == "datasets" else experiment_id
    with racing_app(settings, "before_flush", *deletes) as client:
        renamed = client.patch(f"/api/{kind}/{thing}", json={"name": "spring"})
        assert renamed.status_code == 404, renamed.text
        assert renamed.json() == {"detail": "it was deleted by another request while this one "
                                            "was being answered: nothing was changed"}


def test_a_page_read_as_its_dataset_is_deleted_is_a_404_not_a_500(settings, named):
    """The dataset page reads some of the row's columns when it needs them: a delete in
    between was a 500 (ObjectDeletedError)."""
    dataset_id, experiment_id = named
    with racing_app(settings, "loaded_as_persistent",
                    f"DELETE FROM runs WHERE experiment_id = {experiment_id}",
                    f"DELETE FROM experiments WHERE id = {experiment_id}",
                    f"DELETE FROM datasets WHERE id = {dataset_id}") as client:
        page = client.get(f"/datasets/{dataset_id}", headers={"Accept": "text/html"})
    assert page.status_code == 404
    # A page read changed nothing and meant to change nothing: it says only that it is gone.
    assert "deleted by another request while this one was being answered." in page.text
    assert "nothing was changed" not in page.text
