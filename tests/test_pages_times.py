"""Times on the pages: stored in UTC, shown in the reader's time zone, UTC without script."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.sync_api import expect

from app.db import session_scope
from app.models import Dataset
from tests.browser import open_browser
from tests.support import add_dataset_row

CREATED = datetime(2026, 3, 1, 22, 30, tzinfo=UTC)  # the next day in Tokyo


def dataset_created_at(database_url: str) -> int:
    dataset_id = add_dataset_row(database_url)
    with session_scope(database_url) as session:
        session.get(Dataset, dataset_id).created_at = CREATED
    return dataset_id


def test_pages_say_their_times_are_utc(live_server):
    dataset_id = dataset_created_at(live_server.database_url)
    page = httpx.get(f"{live_server.url}/datasets/{dataset_id}", timeout=30).text
    assert '<time datetime="2026-03-01T22:30:00Z">2026-03-01 22:30 UTC</time>' in page


@pytest.mark.browser
def test_a_reader_in_tokyo_sees_tokyo_time(live_server, request):
    dataset_id = dataset_created_at(live_server.database_url)
    local = (CREATED + timedelta(hours=9)).strftime("%Y-%m-%d %H:%M")
    with open_browser(request.node.name, timezone_id="Asia/Tokyo") as browser:
        for path in ("/datasets", f"/datasets/{dataset_id}"):
            browser.page.goto(f"{live_server.url}{path}")
            when = browser.page.locator("time").first
            expect(when).to_have_text(local)
            expect(when).to_have_attribute("title", "2026-03-01 22:30 UTC")
        browser.assert_no_errors()
