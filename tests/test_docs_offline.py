"""/docs works offline: Swagger UI comes from /static/vendor (filled by make), never a CDN."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from app.main import StaticAssets

TOKEN = "docs-stay-public"
# The module's shared `server` (conftest) runs with a token: the docs and the schema stay public,
# as FastAPI's own /docs and /openapi.json were; the API itself does not.
SERVER_ENV = {"SELFTUNE_API_TOKEN": TOKEN}

# Far below the real sizes (Swagger UI's bundle is ~1.7 MB), far above an error page.
MIN_BYTES = {".js": 100_000, ".css": 10_000, ".png": 100}

ABSOLUTE_URL = re.compile(r"(?i)\bhttps?://[^\s'\"<>)]*")


class _Attributes(HTMLParser):
    """Collects every src= and href= value of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls.extend(value for name, value in attrs if name in ("src", "href") and value)


def references(html: str) -> list[str]:
    """src= and href= attributes, `url: '...'` in inline scripts and url(...) in inline CSS."""
    parser = _Attributes()
    parser.feed(html)
    scripted = re.findall(r"""\burl\s*:\s*['"]([^'"]+)['"]""", html)
    styled = re.findall(r"""\burl\(\s*['"]?([^'")\s]+)""", html)
    return parser.urls + scripted + styled


def assert_self_contained(client: httpx.Client, path: str) -> list[str]:
    """The page names no other host, and every asset it names is served here, in full."""
    response = client.get(path, headers={"Accept": "text/html"})
    assert response.status_code == 200, (path, response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert ABSOLUTE_URL.findall(html) == [], f"{path} loads from another host"
    urls = references(html)
    for url in urls:
        # Same-origin paths only: no scheme, no protocol-relative //host/...
        assert url.startswith("/") and not url.startswith("//"), (path, url)
    for url in (u for u in urls if u.startswith("/static/")):
        asset = client.get(url)
        assert asset.status_code == 200, f"{url} (from {path}): {asset.status_code}; run make"
        suffix = url[url.rfind("."):]
        assert len(asset.content) >= MIN_BYTES.get(suffix, 1), (url, len(asset.content))
    return urls


def test_swagger_ui_at_docs_loads_only_the_apps_own_files(client: httpx.Client):
    urls = assert_self_contained(client, "/docs")
    assert "/static/vendor/swagger-ui-bundle.js" in urls
    assert "/static/vendor/swagger-ui.css" in urls
    assert "/openapi.json" in urls
    # Without the token: the docs and the schema they render are public, the API is not.
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and schema.json()["paths"]
    assert not any(path.startswith("/docs") for path in schema.json()["paths"])
    assert client.get("/api/health").status_code == 401


def test_swagger_ui_oauth2_redirect_page_is_local(client: httpx.Client):
    assert_self_contained(client, "/docs/oauth2-redirect")


def test_no_redoc_page_from_a_cdn(client: httpx.Client):
    response = client.get("/redoc")
    assert response.status_code == 404
    assert ABSOLUTE_URL.findall(response.text) == []



def test_static_vendor_holds_only_the_served_files(client: httpx.Client):
    """The folder make fills holds the copies and nothing else (no build marker)."""
    folder = Path(__file__).resolve().parents[1] / "app" / "static" / "vendor"
    assert sorted(path.name for path in folder.iterdir()) == [
        "chart.umd.min.js", "favicon-32x32.png", "swagger-ui-bundle.js", "swagger-ui.css"]


def test_hidden_files_in_the_static_folder_are_not_served(tmp_path: Path):
    (tmp_path / "app.js").write_text("ok")
    (tmp_path / ".installed").write_text("")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("secret")
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / ".app.js.swp").write_text("draft")
    app = Starlette(routes=[Mount("/static", StaticAssets(directory=tmp_path))])
    with TestClient(app) as local:
        assert local.get("/static/app.js").text == "ok"
        for hidden in (".installed", ".git/config", "vendor/.app.js.swp", "vendor/../.installed"):
            assert local.get(f"/static/{hidden}").status_code == 404, hidden


def test_the_schema_has_one_operation_per_route_and_no_warnings(tmp_path: Path):
    """FastAPI warns (and Swagger UI mixes up operations) when two share an id, as a route
    declared for GET and HEAD together does; downloads declare HEAD as a hidden route."""
    import warnings

    from app.config import Settings
    from app.main import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = create_app(Settings(data_dir=tmp_path)).openapi()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    # Named as the functions are, for generated clients (upload_dataset_api_datasets_post).
    assert schema["paths"]["/api/datasets"]["post"]["operationId"] == "upload_dataset"
    assert schema["paths"]["/api/runs/{run_id}/label-next.csv"]["get"]["responses"]["200"][
        "content"] == {"text/csv": {}}  # never JSON
    # What the server refuses, a generated client can check first: empty or repeated lists.
    sweep = schema["components"]["schemas"]["ExperimentIn"]["properties"]
    assert [sweep[name]["minItems"] for name in ("methods", "budgets", "seeds")] == [1, 1, 1]
    assert sweep["seeds"]["uniqueItems"] and sweep["seeds"]["items"]["minimum"] == 0
    assert list(schema["paths"]["/api/runs/{run_id}/checkpoint"]) == ["get"]


def test_the_schema_documents_the_statuses_a_client_must_handle(tmp_path: Path):
    """Each status below is one the route really answers (see the tests of each); a client
    generated from the schema learns of them only if the schema lists them."""
    from app.config import Settings
    from app.main import create_app

    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    expected = {
        ("/api/experiments", "post"): {"200", "201", "400", "409", "410", "413", "422"},
        ("/api/experiments/check", "post"): {"200", "400", "413", "422"},
        ("/api/experiments/{experiment_id}", "get"): {"200", "404", "422"},
        ("/api/experiments/{experiment_id}", "delete"): {"204", "404", "409", "422"},
        ("/api/experiments/{experiment_id}", "patch"): {"200", "400", "404", "413", "422"},
        ("/api/datasets/{dataset_id}", "patch"): {"200", "400", "404", "413", "422"},
        ("/api/experiments/{experiment_id}/events", "get"): {"200", "204", "404", "422"},
        ("/api/runs/{run_id}", "get"): {"200", "404", "422"},
        ("/api/runs/{run_id}/cancel", "post"): {"200", "404", "409", "422"},
        ("/api/runs/{run_id}/requeue", "post"): {"200", "404", "409", "422"},
        ("/api/experiments/{experiment_id}/requeue", "post"): {"200", "404", "409", "422"},
        ("/api/runs/{run_id}/files/{name}", "get"): {"200", "206", "304", "404", "416", "422"},
        ("/api/runs/{run_id}/checkpoint", "get"): {"200", "206", "304", "404", "416", "422"},
        ("/api/runs/{run_id}/label-next.csv", "get"): {"200", "304", "404", "422"},
        ("/api/experiments/{experiment_id}/runs.csv", "get"): {"200", "304", "404", "422"},
        ("/api/experiments/compare.csv", "get"): {"200", "304", "404", "422"},
    }
    # Every API route: a missing or wrong token, too many wrong ones, a database (or Redis)
    # that does not answer.
    token = {"401", "429", "503"}
    documented = {key: set(paths[key[0]][key[1]]["responses"]) for key in expected}
    assert documented == {key: statuses | token for key, statuses in expected.items()}
