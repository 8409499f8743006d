"""Names a user chose (a dataset's, an experiment's, class folders') are shown as text on
every page and in every chart and table the pages build, never run as markup: an archive's
folder named `<img src=x onerror=...>` must not run script in the browser of whoever opens
its results. Chromium against a real uvicorn, Redis and SQLite (no worker: the run's end is
recorded as a worker records it)."""

from __future__ import annotations

import pytest
import redis

from app.db import session_scope
from app.models import Dataset
from tests.browser import open_browser
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import mark_running, start_sweep
from tests.test_pages_fixes import finish

pytestmark = pytest.mark.browser

# Each sets a mark on the page if it ever runs.
HOSTILE = [
    '<img src=x onerror="window.pwned=1">',
    '"><script>window.pwned=2</script>',
    "</script><svg onload=\"window.pwned=3\">",
]


def test_names_with_markup_are_shown_as_text_and_never_run(live_server, request):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {
        name: {"train": 10, "test": 2} for name in HOSTILE})
    with session_scope(database_url) as session:
        session.get(Dataset, dataset_id).name = HOSTILE[0]
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id, name=HOSTILE[1], seeds=[0])
    mark_running(database_url, run_ids[0])
    finish(database_url, live, run_ids[0], {
        "test_top1": 0.5, "test_mean_class_acc": 0.5, "per_class_acc": [0.5, 0.5, 0.5],
        "confusion_matrix": [[1, 1, 0], [0, 1, 1], [1, 0, 1]], "pseudo_label_quality": {}})

    pages = ["/datasets", f"/datasets/{dataset_id}", "/experiments",
             f"/experiments/{experiment_id}", f"/runs/{run_ids[0]}",
             f"/experiments/new?dataset_id={dataset_id}"]
    with open_browser(request.node.name) as browser:
        page = browser.page
        for path in pages:
            page.goto(live_server.url + path)
            page.wait_for_load_state("networkidle")
            assert page.evaluate("window.pwned") is None, path
            shown = page.inner_text("main")
            assert any(name in shown for name in HOSTILE), path  # as text, not dropped
        # The run page's tables name every class as it is.
        page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        page.wait_for_selector("#results:not([hidden])")
        shown = page.inner_text("main")
        assert all(name in shown for name in HOSTILE)
        assert page.evaluate("window.pwned") is None
        browser.assert_no_errors()
