"""With SELFTUNE_API_TOKEN set, nothing is reachable without the token."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import httpx
import pytest

from app.deps import AUTH_COOKIE, WrongTokens, guessing_address
from tests.support import app_env, start_server

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def guarded_server(settings, tmp_path):
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_API_TOKEN=TOKEN)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    yield url
    process.stop()


PUBLIC = ("/healthz",)  # the liveness check: no details, no token


def every_operation(schema: dict) -> list[tuple[str, str]]:
    operations = []
    for path, item in schema["paths"].items():
        if path in PUBLIC:
            continue
        concrete = re.sub(r"\{[^}]*name[^}]*\}", "model.safetensors", path)
        concrete = re.sub(r"\{[^}]+\}", "1", concrete)
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                operations.append((method.upper(), concrete))
    return operations


def test_every_api_route_in_the_openapi_schema_needs_the_token(guarded_server):
    schema = httpx.get(guarded_server + "/openapi.json", timeout=30).json()
    operations = every_operation(schema)
    assert len(operations) >= 12, operations
    assert ("GET", "/api/runs/1/events") in operations  # SSE too
    assert ("GET", "/api/runs/1/checkpoint") in operations  # downloads too
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        for method, path in operations:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
        # Downloads answer HEAD through routes the schema does not list: guarded the same.
        assert client.head("/api/runs/1/checkpoint").status_code == 401
        ok = client.get("/api/health", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    # The schema says so: Swagger UI (/docs) offers "Authorize" for the bearer token, and
    # every API operation asks for it (it declared none, so "Try it out" could only fail).
    # Or the login page's cookie, which a browser sends.
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "the server's SELFTUNE_API_TOKEN (when it has one)"}
    assert (schemes["TokenCookie"]["in"], schemes["TokenCookie"]["name"]) == (
        "cookie", AUTH_COOKIE)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            expected = [] if path in PUBLIC else [{"HTTPBearer": []}, {"TokenCookie": []}]
            assert operation.get("security", []) == expected, (method, path)
            # ... and the answers the token can bring, for clients generated from it.
            if path not in PUBLIC:
                assert {"401", "429"} <= set(operation["responses"]), (method, path)
                assert "Retry-After" in operation["responses"]["429"]["headers"]


def test_an_api_request_body_is_not_read_before_the_token_is_checked(guarded_server):
    """FastAPI reads and parses a route's JSON body before its dependencies run: without the
    token, a malformed body got a 422 saying what was wrong, and anyone could make the server
    parse a megabyte of JSON. Now a body that has not even arrived is answered 401."""
    host, port = guarded_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /api/experiments/check HTTP/1.1\r\nHost: " + host.encode()
                           + b"\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000\r\n\r\n[[],[],")  # the rest never comes
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert b"www-authenticate: bearer" in answer.lower()
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        json_headers = {"Content-Type": "application/json"}
        refused = client.post("/api/experiments", content=b"{bad", headers=json_headers)
        assert refused.status_code == 401 and refused.json() == {
            "detail": "missing or wrong API token: send 'Authorization: Bearer <token>'"}
        read = client.post("/api/experiments", content=b"{bad",
                           headers={**json_headers, "Authorization": f"Bearer {TOKEN}"})
        assert read.status_code == 422  # with the token the body is read, and refused


def test_the_liveness_check_needs_no_token_and_tells_nothing_more(guarded_server):
    """An uptime monitor or load balancer cannot hold the secret: /api/health was 401."""
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        alive = client.get("/healthz")
        assert alive.status_code == 200 and alive.json() == {"status": "ok"}
        assert client.head("/healthz").status_code == 200
        # With a slash too, answered, not redirected: a load balancer took the 307 as down.
        slash = client.get("/healthz/")
        assert slash.status_code == 200 and slash.json() == {"status": "ok"}
        assert client.get("/api/health").status_code == 401  # the details stay guarded


def test_pages_need_a_login_that_sets_an_httponly_samesite_cookie(guarded_server):
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        response = client.get("/")
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login")
        wrong = client.post("/login", data={"token": "nope", "next": "/"})
        assert wrong.status_code == 401 and "not right" in wrong.text
        right = client.post("/login", data={"token": TOKEN, "next": "https://evil.example/"})
        assert right.status_code == 303 and right.headers["location"] == "/"
        cookie = right.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        home = client.get("/")
        assert home.status_code == 200 and "System status" in home.text
        # The cookie opens the API for the browser's own fetches and SSE as well.
        assert client.get("/api/health").status_code == 200
        # Signed in through the page, one can sign out there too.
        assert '<form method="post" action="/logout"' in home.text
        out = client.post("/logout")
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert client.get("/").status_code == 303
        assert "Sign out" not in client.get("/login").text
        client.cookies.set(AUTH_COOKIE, "a-token-of-before")  # the token changed since
        assert "Sign out" not in client.get("/login").text


@pytest.mark.parametrize("token", ["s€cret-token", "two words", "tab\there"])
def test_a_token_no_header_can_carry_is_refused_at_start_without_echoing_it(
    settings, tmp_path, token
):
    """A token outside printable ASCII cannot travel in an Authorization header or the login
    cookie (logging in gave a 500): `make run` refuses it, naming the setting, not the value."""
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_API_TOKEN=token)
    result = subprocess.run([sys.executable, "-m", "app.launcher"], env=env, timeout=60,
                            capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "SELFTUNE_API_TOKEN: must be printable ASCII" in output
    assert token not in output and "Traceback" not in output


def test_a_browser_opening_an_api_address_without_the_token_is_sent_to_sign_in(
    guarded_server
):
    """The pages' "API" links showed a person {"detail": "missing or wrong API token: send
    'Authorization: Bearer <token>'"} once the sign-in was gone. A browser opening such an
    address (it asks for HTML) is sent to sign in and back; scripts still get the 401."""
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        opened = client.get("/api/datasets?x=1", headers=browser)
        assert opened.status_code == 303
        assert opened.headers["location"] == "/login?next=%2Fapi%2Fdatasets%3Fx%3D1"
        assert client.get("/api/datasets").status_code == 401  # a script
        # Downloads stay a 401: a browser would save the sign-in page as the file.
        assert client.get("/api/runs/1/checkpoint", headers=browser).status_code == 401
        assert client.post("/api/runs/1/cancel", headers=browser).status_code == 401
        signed_in = client.post("/login", data={"token": TOKEN, "next": "/api/datasets?x=1"})
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/api/datasets?x=1"
        assert client.get("/api/datasets?x=1", headers=browser).status_code == 200


@pytest.mark.parametrize("target", ["///evil.example/", "////evil.example", "/\\evil.example",
                                    "/\t/evil.example", "/\n/evil.example", "https:evil.example"])
def test_signing_in_never_sends_the_browser_to_another_site(guarded_server, target):
    """`next=///evil.example` (no host to Python's urlparse, another site to a browser) sent a
    user who typed the right token on to another site."""
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        right = client.post("/login", data={"token": TOKEN, "next": target})
        assert right.status_code == 303 and right.headers["location"] == "/"
        kept = client.post("/login", data={"token": TOKEN, "next": "/runs/3?tab=a//b"})
        assert kept.headers["location"] == "/runs/3?tab=a//b"


def test_no_other_site_may_frame_the_pages_and_answers_carry_hardening_headers(
    guarded_server, request
):
    """A page on another site framed a run page nearly invisibly: one click on its hidden
    "Run again" button queued the run again."""
    from tests.browser import open_browser

    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        answers = [client.get("/login"), client.get("/"), client.get("/api/datasets"),
                   client.get("/static/app.css"), client.get("/healthz"),
                   client.get("/no/such/page")]
    nonces = set()
    for answer in answers:
        assert answer.headers["x-frame-options"] == "DENY", answer.url
        policy = answer.headers["content-security-policy"]
        nonce = re.fullmatch(r"script-src 'self' 'nonce-([\w-]{24})'; object-src 'none'; "
                             r"base-uri 'none'; frame-ancestors 'none'", policy)
        assert nonce, policy
        nonces.add(nonce[1])
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "same-origin"
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.set_content(f'<iframe id="f" src="{guarded_server}/login"></iframe>')
        frame = page.frame_locator("#f")
        assert frame.locator("#token").count() == 0  # the sign-in form never showed
    assert len(nonces) == len(answers)  # a new nonce on every answer


INJECT = """(nonce) => {
    const script = document.createElement("script");
    if (nonce) script.nonce = nonce;
    script.textContent = "window.injected = (window.injected || 0) + 1";
    document.body.append(script);
    return window.injected || 0;
}"""


def test_only_the_pages_own_scripts_run(guarded_server, request):
    """A name that slipped past escaping into a page could run a script with the signed-in
    user's cookie: the policy let any inline script run. Now only scripts from the server's
    files and inline ones carrying the answer's nonce do."""
    from tests.browser import open_browser

    with open_browser(request.node.name, content_security_policy=True) as browser:
        page = browser.page
        page.goto(f"{guarded_server}/docs")  # Swagger UI, started by an inline script
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        own = page.locator("script[nonce]").first.evaluate("(script) => script.nonce")
        assert page.evaluate(INJECT, "") == 0  # refused
        assert page.evaluate(INJECT, own) == 1  # the answer's own nonce runs
        assert page.evaluate(INJECT, "guessed") == 1
        refused = [e for e in browser.errors if "Content Security Policy" in e]
        assert len(refused) == 2, browser.errors
        browser.errors.clear()

        page.goto(f"{guarded_server}/login?next=/experiments")  # pages' inline scripts run
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{guarded_server}/experiments")
        assert page.evaluate(INJECT, "") == 0
        browser.errors = [e for e in browser.errors if "Content Security Policy" not in e]
        browser.assert_no_errors()


def test_wrong_tokens_are_counted_per_address_and_only_different_ones():
    now = [1000.0]
    wrong = WrongTokens(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(20):  # a tab with a cookie from before the token changed: one guess
        wrong.record("10.0.0.1", "stale")
    assert wrong.retry_after("10.0.0.1") == 0
    now[0] += 10
    wrong.record("10.0.0.1", "guess-1")
    assert wrong.retry_after("10.0.0.1") == 0
    now[0] += 10
    wrong.record("10.0.0.1", "guess-2")  # the third different one
    assert wrong.retry_after("10.0.0.1") == 40  # until "stale" (t=1000) is a minute old
    assert wrong.retry_after("10.0.0.2") == 0  # another address is not held
    now[0] += 39.5
    assert wrong.retry_after("10.0.0.1") == 1
    now[0] += 0.5
    assert wrong.retry_after("10.0.0.1") == 0


def test_many_guessing_addresses_are_swept_once_a_minute_not_on_every_guess():
    """Past 100,000 addresses every wrong token read them all, under the lock every token
    check takes (0.08 s a guess): now at most once a minute, and stale ones still go."""
    now = [1000.0]
    wrong = WrongTokens(window_s=600, clock=lambda: now[0])
    for i in range(100_001):
        wrong.record(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "guess")
    reads = []
    recent = wrong._recent
    wrong._recent = lambda address, at: reads.append(address) or recent(address, at)
    for i in range(50):
        wrong.record(f"11.0.0.{i}", "guess")
    assert 100_000 < len(reads) < 100_200  # one sweep, then one read per guess
    now[0] += 601  # the first ones are stale now, and the minute is over
    reads.clear()
    wrong.record("12.0.0.1", "guess")
    assert len(reads) > 100_000 and len(wrong._guesses) == 1


def test_guesses_from_more_addresses_than_it_keeps_forget_the_longest_quiet_ones():
    """Guesses from many addresses within the window (an IPv6 network's) grew the record by
    about 1.4 KB an address, without bound."""
    now = [1000.0]
    wrong = WrongTokens(limit=3, window_s=600, clock=lambda: now[0], most_addresses=3)
    for guess in ("a", "b"):
        wrong.record("10.0.0.1", guess)
    for i in range(2, 5):
        now[0] += 1
        wrong.record(f"10.0.0.{i}", "a")
        wrong.record("10.0.0.1", "c")  # the address that guessed last is kept
    assert len(wrong._guesses) == 3
    assert list(wrong._guesses) == ["10.0.0.3", "10.0.0.4", "10.0.0.1"]
    assert wrong.retry_after("10.0.0.1") > 0


def test_an_address_guessing_tokens_is_held_off_and_a_stale_cookie_is_not(guarded_server):
    """No limit on wrong tokens let a client on the network try tokens as fast as the
    server answered (the README's random token makes that hopeless, a short one does not)."""
    with httpx.Client(base_url=guarded_server, timeout=30,
                      cookies={AUTH_COOKIE: "old-token"}) as tab:
        for _ in range(25):  # a browser tab after the token changed repeats one cookie
            assert tab.get("/api/experiments").status_code == 401
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/experiments", headers=right).status_code == 200
        for guess in range(9):  # with "old-token", ten different wrong tokens
            answer = client.get("/api/experiments", headers={"Authorization": f"Bearer g{guess}"})
            assert answer.status_code == 401
        held = client.get("/api/experiments", headers=right)  # the right one too, now
        assert held.status_code == 429
        assert 590 <= int(held.headers["retry-after"]) <= 600
        assert held.json()["detail"].startswith(
            "too many wrong tokens from this address (10 different ones): try again in ")
        page = client.post("/login", data={"token": TOKEN, "next": "/"})
        assert page.status_code == 429 and "Too many wrong tokens" in page.text
        assert "set-cookie" not in page.headers
    with httpx.Client(base_url=guarded_server, timeout=30,
                      cookies={AUTH_COOKIE: TOKEN}) as signed_in:
        assert signed_in.get("/datasets").status_code == 429


def test_the_sign_out_button_is_no_way_to_guess_the_token(guarded_server):
    """Pages no token guards (/login, error pages) offer "Sign out" to the right cookie: they
    compared the cookie without counting it, so a client could try tokens there without end
    (the button said which was right)."""
    for guess in range(10):
        with httpx.Client(base_url=guarded_server, timeout=30,
                          cookies={AUTH_COOKIE: f"guess{guess}"}) as guesser:
            assert "Sign out" not in guesser.get("/login").text
    with httpx.Client(base_url=guarded_server, timeout=30, cookies={AUTH_COOKIE: TOKEN}) as tab:
        login = tab.get("/login")
        assert login.status_code == 200 and "Sign out" not in login.text  # held off: no tell
        assert tab.get("/datasets").status_code == 429


def test_the_sign_out_button_shows_for_the_right_cookie(guarded_server):
    with httpx.Client(base_url=guarded_server, timeout=30, cookies={AUTH_COOKIE: TOKEN}) as tab:
        assert "Sign out" in tab.get("/login").text
        assert "Sign out" in tab.get("/datasets").text


def test_guesses_from_one_ipv6_network_count_together(guarded_server):
    """Counted per IPv6 address, a guesser on one network (2^64 addresses of its own) took a
    new address every ten guesses and was never held off. Its /64 network is counted now;
    the addresses come from a proxy on this machine (X-Forwarded-For, which uvicorn takes
    from 127.0.0.1 only), as real clients' addresses do behind one."""
    with httpx.Client(base_url=guarded_server, timeout=30) as client:
        def get(address: str, token: str) -> httpx.Response:
            return client.get("/api/experiments", headers={
                "Authorization": f"Bearer {token}", "X-Forwarded-For": address})

        for guess in range(10):  # ten different tokens, each from a new address
            assert get(f"2001:db8:1:2::{guess + 1:x}", f"g{guess}").status_code == 401
        held = get("2001:db8:1:2:ffff::1", TOKEN)  # the right one, from that network
        assert held.status_code == 429, held.text
        assert get("2001:db8:1:3::1", TOKEN).status_code == 200  # the next network is not
        assert get("10.0.0.1", TOKEN).status_code == 200
        for guess in range(10):  # IPv4 as ever: per address; mapped into IPv6, the same
            address = "10.0.0.2" if guess % 2 else "::ffff:10.0.0.2"
            assert get(address, f"g{guess}").status_code == 401
        assert get("10.0.0.2", TOKEN).status_code == 429
        assert get("10.0.0.3", TOKEN).status_code == 200


def test_an_address_is_counted_as_itself_or_its_ipv6_network():
    assert guessing_address("192.0.2.7") == "192.0.2.7"
    assert guessing_address("2001:DB8:0:0:1::7") == "2001:db8::/64"
    assert guessing_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert guessing_address("::1") == "::/64"
    assert guessing_address("unknown") == "unknown"


def test_without_a_token_the_sign_in_page_sends_people_on_and_sets_no_cookie(live_server):
    """It said "This server is protected by an API token" and any token signed in."""
    with live_server.client() as client:
        form = client.get("/login?next=/datasets")
        assert form.status_code == 303 and form.headers["location"] == "/datasets"
        signed = client.post("/login", data={"token": "anything", "next": "//evil.example"})
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        assert "set-cookie" not in signed.headers
