"""A dataset's page says how many experiments were made on it and leads to them."""

from __future__ import annotations

import re

from tests.support import add_dataset_row

SWEEP = {"methods": ["fine-tune"], "budgets": [0.5], "seeds": [0],
         "overrides": {"iterations": 10}}


def experiment_cell(html: str) -> str:
    return re.search(r'<td id="experiment-count">(.*?)</td>', html).group(1)


def test_a_dataset_page_counts_its_experiments_and_links_to_their_list(live_server):
    dataset_id = add_dataset_row(live_server.database_url)
    other = add_dataset_row(live_server.database_url)
    with live_server.client() as client:
        assert experiment_cell(client.get(f"/datasets/{dataset_id}").text) == "none yet"
        for target, name in ((dataset_id, "first"), (dataset_id, "second"), (other, "third")):
            started = client.post("/api/experiments",
                                  json={**SWEEP, "dataset_id": target, "name": name})
            assert started.status_code == 201, started.text
        assert experiment_cell(client.get(f"/datasets/{dataset_id}").text) == (
            f'<a href="/experiments?dataset_id={dataset_id}">2 experiments</a>')
        assert experiment_cell(client.get(f"/datasets/{other}").text) == (
            f'<a href="/experiments?dataset_id={other}">1 experiment</a>')
        listed = client.get(f"/experiments?dataset_id={dataset_id}").text
    assert re.findall(r'<a href="/experiments/\d+">(\w+)</a>', listed) == ["second", "first"]
