"""What another web site can make the user's browser do to a local server without a token:
nothing. Cross-site form posts (no CORS preflight) are refused, and host names other than
localhost (DNS rebinding) get no answer. Real uvicorn, Redis, SQLite and Chromium."""

from __future__ import annotations

import ipaddress
import socket

import httpx
import psutil
import pytest

from tests.browser import open_browser
from tests.support import add_dataset_row, app_env, start_server
from tests.test_experiments_cancel_delete import start_sweep, statuses


def test_a_cross_site_post_is_refused_and_changes_nothing(live_server):
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url),
                                             seeds=[0])
        # A browser too old to send Sec-Fetch-Site still names the page's site in Origin.
        own_origin = {"Origin": str(client.base_url).rstrip("/")}
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": own_origin["Origin"].replace("127.0.0.1", "localhost")}):
            refused = client.post(f"/api/runs/{run_ids[0]}/cancel", headers=headers)
            assert refused.status_code == 403, (headers, refused.text)
            assert "another site" in refused.json()["detail"]
        assert set(statuses(client, experiment_id).values()) == {"queued"}
        # The app's own pages (same-origin) and API clients (no such header) are served.
        own_page = client.post(f"/api/runs/{run_ids[0]}/cancel",
                               headers={"Sec-Fetch-Site": "same-origin", **own_origin})
        assert own_page.status_code == 200 and own_page.json()["status"] == "cancelled"
        old_browser = client.post(f"/api/runs/{run_ids[0]}/requeue", headers=own_origin)
        assert old_browser.status_code == 200, old_browser.text
        assert client.post(f"/api/runs/{run_ids[0]}/cancel").status_code == 200
        assert client.post(f"/api/runs/{run_ids[1]}/cancel").status_code == 200
        # Reading is not state-changing: a link from elsewhere still opens a page.
        assert client.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_without_a_token_only_local_host_names_are_served(live_server):
    port = httpx.URL(live_server.url).port
    with live_server.client() as client:
        for host in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
            response = client.get("/api/health", headers={"Host": f"{host}:{port}"})
            assert response.status_code == 200, (host, response.text)
        for host in ("rebound.attacker.example", "192.168.1.20", "localhost.attacker.example"):
            response = client.get("/", headers={"Host": f"{host}:{port}"})
            assert response.status_code == 403, (host, response.text)
            assert "answers to localhost only" in response.json()["detail"]


@pytest.mark.parametrize("host_setting", [None, "0.0.0.0"])
def test_without_a_token_a_client_on_another_computer_is_refused_whatever_host_it_names(
        settings, tmp_path, host_setting):
    """Started by hand on 0.0.0.0 (or as the image's own command) without a token, the
    server answered every computer that sent `Host: localhost`: the Host check was all, and
    with SELFTUNE_HOST=0.0.0.0 (which only `make run` refuses without a token) not even
    that."""
    addresses = [address.address for addresses in psutil.net_if_addrs().values()
                 for address in addresses if address.family == socket.AF_INET
                 and not ipaddress.ip_address(address.address).is_loopback]
    if not addresses:
        pytest.skip("this machine has no address but loopback to connect from")
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  **({"SELFTUNE_HOST": host_setting} if host_setting else {}))
    url, process = start_server(env, tmp_path / "uvicorn.log", options=("--host", "0.0.0.0"))
    port = httpx.URL(url).port
    try:
        local = {"Host": f"localhost:{port}"}
        refused = httpx.get(f"http://{addresses[0]}:{port}/api/datasets", headers=local,
                            timeout=30)
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"] == (
            f"this server answers to this computer only, not to {addresses[0]}: it runs "
            "without SELFTUNE_API_TOKEN. Set a token to serve other computers")
        assert httpx.get(url + "/api/datasets", headers=local, timeout=30).status_code == 200
    finally:
        process.stop()


def test_with_a_token_other_host_names_are_served(settings, tmp_path):
    """A server with a token may sit behind a proxy under any name: the token guards it."""
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_API_TOKEN="correct-horse-battery-staple")
    url, process = start_server(env, tmp_path / "uvicorn.log")
    try:
        response = httpx.get(url + "/login", headers={"Host": "lab.example.org"}, timeout=30)
        assert response.status_code == 200
    finally:
        process.stop()


@pytest.mark.browser
def test_a_form_on_another_site_cannot_cancel_a_run(live_server, request):
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url),
                                             seeds=[0])
    attack = (f'<form method="post" action="{live_server.url}/api/runs/{run_ids[0]}/cancel">'
              '<button id="go">win a prize</button></form>')
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.set_content(attack)
        with page.expect_navigation():
            page.click("#go")
        assert "another site" in page.content()
        browser.screenshot("refused")
    with live_server.client() as client:
        assert set(statuses(client, experiment_id).values()) == {"queued"}
