"""The OpenAPI description (/openapi.json) with what FastAPI does not write from the routes
themselves: answers any route can give (a list of field errors for a parameter it refuses, a
JSON body over the limit, a database that does not answer), the headers clients read
(Location, X-Total-Count, ETag, ranges, feeds' Last-Event-ID) and the cookie the login page
sets. A client generated from the description read a 422 for `?top=0` as a message, and had
no word of the headers it pages, resumes and caches by."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from app.deps import AUTH_COOKIE

ERROR = {"$ref": "#/components/schemas/ErrorOut"}
FIELD_ERRORS = {"$ref": "#/components/schemas/HTTPValidationError"}

# POST routes that make something: where it is, and whether an Idempotency-Key replayed it.
MADE = ("/api/datasets", "/api/datasets/{dataset_id}/labels", "/api/experiments")
# Lists a page at a time.
LISTS = ("/api/datasets", "/api/experiments", "/api/datasets/{dataset_id}/images")
NEXT_PAGE_LINKED = (*LISTS, "/api/runs/{run_id}/metrics")
FEEDS = ("/api/runs/{run_id}/events", "/api/experiments/{experiment_id}/events")


def _header(description: str, kind: str = "string", required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


def _parameter(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


def _add_parameter(operation: dict[str, Any], parameter: dict[str, Any]) -> None:
    parameters = operation.setdefault("parameters", [])
    if not any(p["name"].lower() == parameter["name"].lower() for p in parameters):
        parameters.append(parameter)


def _json(description: str, schema: dict[str, Any], **headers: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": schema}}}
    if headers:
        _headers(answer, **headers)
    return answer


def _headers(response: dict[str, Any], **headers: dict[str, Any]) -> None:
    response.setdefault("headers", {}).update(
        {name.replace("_", "-"): value for name, value in headers.items()})


def describe(schema: dict[str, Any]) -> dict[str, Any]:
    """Add to FastAPI's description, in place; returns it."""
    schema["components"].setdefault("securitySchemes", {})["TokenCookie"] = {
        "type": "apiKey", "in": "cookie", "name": AUTH_COOKIE,
        "description": "the HttpOnly cookie the login page (/login) sets with the token: what "
                       "a browser sends (an EventSource cannot send `Authorization`)"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            _describe(path, method, operation)
    return schema


def _describe(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation["responses"]
    if {"HTTPBearer": []} in operation.get("security", []):
        operation["security"].append({"TokenCookie": []})
    # A parameter FastAPI refuses is answered with its list of field errors, whatever the
    # route's own refusals look like.
    unprocessable = responses.get("422", {}).get("content", {}).get("application/json", {})
    if operation.get("parameters") and unprocessable.get("schema") == ERROR:
        unprocessable["schema"] = {"anyOf": [ERROR, FIELD_ERRORS]}
    if "application/json" in operation.get("requestBody", {}).get("content", {}):
        responses.setdefault("413", _json(
            "the body is over the 1 MiB a JSON body may have", ERROR))
    if path.startswith("/api/") and path != "/api/health":
        responses.setdefault("503", _json(
            "the database (or Redis, where the route needs it) does not answer: nothing was "
            "changed; try again", ERROR,
            Retry_After=_header("seconds to wait, where given", "integer")))
    if method == "post" and path in MADE:
        for status in ("200", "201"):
            if status in responses:
                _headers(responses[status], Location=_header("its address in the API",
                                                             required=True))
        if "200" in responses:
            _headers(responses["200"], Idempotent_Replayed=_header(
                "`true`: an earlier request with this Idempotency-Key made it"))
    if method == "get" and path in LISTS:
        _headers(responses["200"], X_Total_Count=_header(
            "how many there are in all (every page's)", "integer", required=True))
    if method == "get" and path in NEXT_PAGE_LINKED:
        _headers(responses["200"], Link=_header('`<...>; rel="next"` where there is a next '
                                                "page"))
    if "304" in responses:
        etag = _header("send it as `If-None-Match` to be answered 304 while it is unchanged",
                       required=True)
        _headers(responses["200"], ETag=etag)
        _headers(responses["304"], ETag=etag)
        _add_parameter(operation, _parameter(
            "If-None-Match", "an ETag held: 304 while the answer has not changed"))
    if "206" in responses:
        _headers(responses["200"], Accept_Ranges=_header("`bytes`", required=True))
        responses["206"]["content"] = {**responses["200"].get("content", {}),
                                       "multipart/byteranges": {}}
        responses["206"]["description"] += (
            " (one range: in the file's media type; several: `multipart/byteranges`)")
        _headers(responses["206"], Content_Range=_header(
            "`bytes first-last/length` (one range)"), ETag=_header("as the whole file's"),
                 Accept_Ranges=_header("`bytes`"))
        if "416" in responses:
            _headers(responses["416"], Content_Range=_header("`bytes */length`", required=True))
        _add_parameter(operation, _parameter("Range", "`bytes=first-last`: a part of it"))
        _add_parameter(operation, _parameter(
            "If-Range", "its ETag: the part only while it is unchanged, else all of it"))
    if path in FEEDS:
        _add_parameter(operation, _parameter(
            "Last-Event-ID", "resume after this event id (an EventSource sends it when it "
            "reconnects); wins over `?last_event_id=`"))


def install(app: FastAPI) -> None:
    """Serve the described schema at /openapi.json (made once, as FastAPI's own)."""
    made: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(made())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
