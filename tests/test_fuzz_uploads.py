"""Fuzzed uploads: malformed archives and multipart bodies never cause a 5xx and never
leave a file or a row behind. SELFTUNE_FUZZ_EXAMPLES raises the count (default 150 per
strategy; `SELFTUNE_FUZZ_EXAMPLES=500` gives over 1,000 requests)."""

from __future__ import annotations

import io
import os
import zipfile

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_datasets_support import (
    assert_nothing_left,
    class_entries,
    dataset_server,
    image_bytes,
    tar_bytes,
    upload,
    zip_bytes,
)

EXAMPLES = int(os.environ.get("SELFTUNE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url):
    with dataset_server(tmp_path_factory.mktemp("fuzz"), redis_url,
                        SELFTUNE_MAX_UPLOAD_BYTES=str(2 * 1024 * 1024),
                        SELFTUNE_MAX_ARCHIVE_FILES="200") as live:
        with live.client(timeout=60) as client:
            yield live, client


def check(server, response: httpx.Response, accepted_ok: bool = False) -> None:
    live, client = server
    assert response.status_code < 500, response.text
    if response.status_code == 201:
        assert accepted_ok, f"garbage was accepted: {response.text}"
        assert client.delete(f"/api/datasets/{response.json()['id']}").status_code == 204
    else:
        assert response.status_code in (400, 413, 415, 422), response.text
        assert isinstance(response.json()["detail"], str | list)
    assert_nothing_left(live)


names = st.one_of(
    st.text(min_size=0, max_size=80),
    st.sampled_from(["../evil.png", "/abs.png", "a/../../b.png", "C:\\x.png", "a//b.png",
                     "\x00.png", "__MACOSX/cat/1.png", ".hidden/1.png", "cat/.x.png",
                     "train/test/val/x.png", "labels.csv", "unlabeled/u.png"]),
    st.builds(lambda a, b: f"{a}/{b}.png", st.text(max_size=20), st.text(max_size=20)),
)
contents = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 50).map(lambda seed: image_bytes(seed)),
    st.just(b"path,label\nx.png,cat\n,\n\xff\xfe"),
)


@FUZZ
@given(raw=st.binary(max_size=4000), suffix=st.sampled_from([".zip", ".tar", ".tar.gz", ""]))
def test_random_bytes_as_an_archive(server, raw, suffix):
    check(server, upload(server[1], raw, filename=f"photos{suffix}"))


@FUZZ
@given(entries=st.dictionaries(names, contents, max_size=8), kind=st.sampled_from(["zip", "tgz"]),
       cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_archives_with_hostile_names_and_contents(server, entries, kind, cut):
    base = class_entries(per_class=2)
    base.update(entries)
    data = zip_bytes(base) if kind == "zip" else tar_bytes(base)
    if cut is not None:
        data = data[:cut]  # truncated archive
    check(server, upload(server[1], data, filename=f"x.{kind}"), accepted_ok=cut is None)


# Any bytes as a tar entry's name, as tarfile reads them (not UTF-8: lone surrogates).
byte_names = st.binary(min_size=1, max_size=40).map(
    lambda raw: raw.decode("utf-8", "surrogateescape")
)


@FUZZ
@given(entries=st.dictionaries(byte_names, contents, max_size=6), gz=st.booleans())
def test_tar_entries_named_with_arbitrary_bytes(server, entries, gz):
    """Names in any encoding (tarfile keeps non-UTF-8 bytes as lone surrogates): whatever
    is accepted reads back over the API and as a page."""
    _, client = server
    base = class_entries(per_class=2)
    base.update(entries)
    response = upload(client, tar_bytes(base, gz=gz), filename="x.tar.gz" if gz else "x.tar")
    if response.status_code == 201:
        dataset_id = response.json()["id"]
        assert client.get(f"/api/datasets/{dataset_id}").json() == response.json()
        assert client.get(f"/api/datasets/{dataset_id}/images").status_code == 200
        assert client.get(f"/datasets/{dataset_id}").status_code == 200
    check(server, response, accepted_ok=True)


@FUZZ
@given(
    boundary=st.text(alphabet="abcdefghij0123456789-'()+_,./:=? ", min_size=0, max_size=72),
    header=st.sampled_from([
        'form-data; name="file"; filename="a.zip"', 'form-data; name="file"',
        'form-data; name="name"', "attachment", 'form-data; name="file"; filename=""',
        'form-data; name="file"; filename="../../a.zip"', "",
    ]),
    body=st.binary(max_size=500),
    content_type=st.sampled_from(["multipart/form-data", "multipart/mixed", "text/plain",
                                  "application/zip", "multipart/form-data; charset=utf-8"]),
    truncate=st.booleans(),
)
def test_malformed_multipart_bodies(server, boundary, header, body, content_type, truncate):
    payload = (f"--{boundary}\r\nContent-Disposition: {header}\r\n\r\n").encode() + body
    if not truncate:
        payload += f"\r\n--{boundary}--\r\n".encode()
    value = f"{content_type}; boundary={boundary}" if boundary else content_type
    headers = {"content-type": value.strip()}  # HTTP clients refuse edge whitespace
    response = server[1].post("/api/datasets", content=payload, headers=headers)
    check(server, response)


def test_an_upload_just_over_the_limit_is_refused_while_streaming(server):
    live, client = server
    big = io.BytesIO()
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("cat/1.png", os.urandom(3 * 1024 * 1024))
    response = upload(client, big.getvalue())
    assert response.status_code == 413
    assert_nothing_left(live)
