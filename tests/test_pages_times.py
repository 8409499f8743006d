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


def test_times_from_a_postgresql_set_to_another_time_zone_are_given_in_utc(
    postgres_url, tmp_path, redis_url
):
    """PostgreSQL hands times back in its session's time zone, the server's unless set:
    on a server in Berlin the API said `...T23:30:00+01:00` for 22:30 UTC, and the run page's
    tooltip, which reads the ISO text, showed "23:30:00 UTC". Now every time is in UTC."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from app.db import upgrade_to_head
    from app.models import Experiment, Run
    from tests.test_datasets_support import dataset_server

    database = postgres_url.rsplit("/", 1)[1]
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(text(f"ALTER DATABASE \"{database}\" SET timezone TO 'Europe/Berlin'"))
    with admin.connect() as connection:  # a new session takes the database's setting
        assert connection.execute(text("SHOW timezone")).scalar() == "Europe/Berlin"
    admin.dispose()
    upgrade_to_head(postgres_url)
    dataset_id = dataset_created_at(postgres_url)
    with session_scope(postgres_url) as session:
        experiment = Experiment(name="times", dataset_id=dataset_id, backbone="b",
                                methods=["fine-tune"], budgets=[0.5], seeds=[0], preset="quick",
                                created_at=CREATED)
        session.add(experiment)
        session.flush()
        run = Run(experiment_id=experiment.id, dataset_id=dataset_id, method="fine-tune",
                  budget=0.5, budget_label="50%", seed=0, config={}, status="succeeded",
                  created_at=CREATED, started_at=CREATED,
                  finished_at=CREATED + timedelta(minutes=5), queued_at=CREATED)
        session.add(run)
        session.flush()
        experiment_id, run_id = experiment.id, run.id
    with dataset_server(tmp_path, redis_url, database_url=postgres_url) as server, \
            server.client() as client:
        run = client.get(f"/api/runs/{run_id}").json()
        times = [client.get("/api/datasets").json()[0]["created_at"],
                 client.get(f"/api/experiments/{experiment_id}").json()["created_at"],
                 client.get("/api/experiments").json()[0]["created_at"],
                 run["created_at"], run["started_at"]]
        assert times == ["2026-03-01T22:30:00Z"] * 5
        assert run["finished_at"] == "2026-03-01T22:35:00Z"
        page = client.get(f"/datasets/{dataset_id}").text
        assert '<time datetime="2026-03-01T22:30:00Z">2026-03-01 22:30 UTC</time>' in page
