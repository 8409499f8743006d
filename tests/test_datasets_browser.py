"""The dataset pages in Chromium: choose or drop an archive, watch it upload, land on the
dataset page; API errors shown as they are; usable on a phone-sized screen."""

from __future__ import annotations

import base64
import io
import re
import tarfile
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser import PHONE, open_browser
from tests.support import LiveServer
from tests.test_datasets_support import (
    class_entries,
    image_bytes,
    zip_bytes,
)

pytestmark = pytest.mark.browser
DATASET_URL = re.compile(r".*/datasets/\d+$")



def test_chosen_archive_uploads_with_progress_and_opens_the_dataset_page(
    server: LiveServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The finished upload opened its dataset page only after a "Leave site?" question: the
    page still counted the upload as running. A user who chose to stay was left on "Done."."""
    archive = tmp_path / "pets.zip"
    archive.write_bytes(zip_bytes({
        **class_entries(("cat", "dog"), per_class=6),
        "unlabeled/u1.png": image_bytes(501),
        "cat/notes.txt": b"not an image",
    }))
    with open_browser(request.node.name) as browser:
        page = browser.page
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.dismiss()))
        page.goto(server.url + "/datasets/new")
        # Both pages say where they stand, as the experiment and run pages do.
        assert page.inner_text(".crumbs") == "Datasets › upload"
        page.set_input_files("#file", str(archive))
        assert "pets.zip" in page.inner_text("#chosen")
        page.fill("#name", "Pets")
        page.click("#upload-button")
        page.wait_for_url(DATASET_URL)
        assert dialogs == []

        assert page.inner_text("h1") == "Pets"
        dataset_id = page.url.rsplit("/", 1)[1]
        assert page.inner_text(".crumbs") == f"Datasets › #{dataset_id}"
        assert page.get_attribute(".crumbs a", "href") == "/datasets"
        assert "cat" in page.inner_text("#class-counts")
        assert "not an image (.txt)" in page.inner_text("#skipped")
        assert page.get_attribute("#start-experiment", "href").startswith(
            "/experiments/new?dataset_id=")
        page.wait_for_function(  # lazy thumbnails on screen have loaded and decoded
            "() => [...document.querySelectorAll('#class-thumbnails img')].slice(0, 4)"
            ".every((img) => img.complete && img.naturalWidth > 0)"
        )
        browser.screenshot("dataset-desktop")
        browser.assert_no_errors()


def test_an_upload_can_be_cancelled_and_leaving_during_one_asks_first(
    server: LiveServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """There was no way to stop an upload, and leaving the page cut it off without a word.
    The upload is held in the browser (never answered) so it stays in progress."""
    archive = tmp_path / "held.zip"
    archive.write_bytes(zip_bytes(class_entries(("cat", "dog"))))
    before = server_datasets(server)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.route("**/api/datasets", lambda route: None)  # held: no answer ever comes
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.dismiss()))
        page.goto(server.url + "/datasets/new")
        page.set_input_files("#file", str(archive))
        page.click("#upload-button")
        page.wait_for_selector("#upload-progress:not([hidden])")
        assert page.is_disabled("#upload-button")

        page.evaluate("() => { location.href = '/datasets'; }")  # leaving: the browser asks
        page.wait_for_timeout(500)
        assert dialogs == ["beforeunload"] and page.url.endswith("/datasets/new")

        page.click("#upload-cancel")
        page.wait_for_selector("#upload-cancelled:not([hidden])")
        assert page.is_hidden("#upload-progress") and page.is_enabled("#upload-button")
        browser.screenshot("upload-cancelled")
        page.evaluate("() => { location.href = '/datasets'; }")  # nothing runs: no question
        page.wait_for_url(re.compile(r".*/datasets$"))
        assert dialogs == ["beforeunload"]
    assert server_datasets(server) == before


def server_datasets(server: LiveServer) -> list[int]:
    with server.client() as client:
        return [dataset["id"] for dataset in client.get("/api/datasets").json()]


def test_dropped_bad_archive_shows_the_api_detail_and_stays_on_the_form(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    bad = zip_bytes({**class_entries(("cat", "dog")), "../escape.png": image_bytes(7)})
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(server.url + "/datasets/new")
        page.evaluate(
            """(encoded) => {
                const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "bad.zip", {type: "application/zip"}));
                const zone = document.getElementById("dropzone");
                zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer}));
                zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer}));
            }""",
            base64.b64encode(bad).decode(),
        )
        assert "bad.zip" in page.inner_text("#chosen")
        page.click("#upload-button")
        error = page.locator("#upload-error")
        error.wait_for(state="visible")
        assert "points outside the archive" in error.inner_text()
        assert page.url.endswith("/datasets/new")
        assert page.is_enabled("#upload-button")
        browser.assert_no_errors(expected=("422",))


def test_dataset_pages_fit_a_phone_screen(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    with server.client() as client:
        response = client.post("/api/datasets", files={"file": ("wide.zip", zip_bytes(
            class_entries(("a-class-with-a-rather-long-name", "another-long-class-name"),
                          per_class=14, seed=3)))})
        assert response.status_code == 201, response.text
        dataset_id = response.json()["id"]
    with open_browser(request.node.name, viewport=PHONE) as browser:
        for path, shot in ((f"/datasets/{dataset_id}", "dataset-phone"),
                           ("/datasets", "list-phone"), ("/datasets/new", "upload-phone")):
            browser.page.goto(server.url + path)
            assert browser.horizontal_overflow() == 0, path
            browser.screenshot(shot)
        browser.assert_no_errors()


def test_every_class_of_a_dataset_of_many_has_its_thumbnails_a_click_away(
    server: LiveServer, client, request: pytest.FixtureRequest
) -> None:
    """Only the first 100 classes had thumbnails, and nothing on the page showed the others'
    (CUB has 200 classes; a dataset of 1,000 had 900 never shown). They come 100 classes a
    page now, and a class's name in the table opens its page at its thumbnails."""
    names = [f"species{n}" for n in range(205)]
    archive = zip_bytes({**class_entries(names, per_class=1, prefix="train/"),
                         **class_entries(names, per_class=1, prefix="test/", seed=1)})
    response = client.post("/api/datasets", files={"file": ("birds.zip", archive)},
                           data={"name": "Birds"})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/datasets/{dataset_id}")
        headings = "#class-thumbnails h3"
        assert page.locator(headings).count() == 100
        assert page.inner_text("#class-thumbnails nav").startswith("Classes 1–100 of 205")
        page.click("#class-counts a:text-is('species150')")
        page.wait_for_url(f"**/datasets/{dataset_id}?thumbs=2#class-150")
        assert page.locator(headings).first.inner_text().startswith("species100")
        assert page.locator("#class-150").is_visible()
        page.wait_for_function(  # its thumbnail loads (lazily, now on screen)
            "() => [...document.querySelectorAll('#class-150 + .thumbs img')]"
            ".every((img) => img.complete && img.naturalWidth > 0)")
        page.click("#class-thumbnails nav >> nth=0 >> a[rel=next]")
        page.wait_for_url(f"**/datasets/{dataset_id}?thumbs=3#class-thumbnails")
        assert page.locator(headings).count() == 5
        assert page.inner_text("#class-thumbnails nav").startswith("Classes 201–205 of 205")
        page.goto(f"{server.url}/datasets/{dataset_id}?thumbs=9")
        assert page.locator(headings).count() == 0
        assert "Page 9 is past the last class (205)" in page.inner_text("#class-thumbnails")
        browser.assert_no_errors()
    assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204


# A class whose folder name makes paths longer than a tar header's 100 bytes, and not ASCII:
# the archive the page makes names them in pax headers.
LONG_CLASS = "chat-très-poilu-" * 7


def test_a_folder_chosen_goes_as_one_tar_archive_and_becomes_the_dataset(
    server: LiveServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Only archives could be uploaded: a person with a folder of images zipped it first."""
    folder = tmp_path / "Pets été"
    entries = {**class_entries(("cat", LONG_CLASS), per_class=6, seed=4),
               "unlabeled/u1.png": image_bytes(901), "cat/notes.txt": b"not an image"}
    # What an upload skips by name is left out before it is packed: a project's .git/ held
    # more files than its images, counted against the server's limit and sent to be skipped.
    hidden = {".DS_Store": b"\0\0\0\1", "cat/.thumb.png": image_bytes(902),
              **{f".git/objects/{n}": b"blob" for n in range(30)},
              "__MACOSX/cat/._1.png": b"fork"}
    for path, data in {**entries, **hidden}.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(server.url + "/datasets/new")
        page.set_input_files("#folder", str(folder))
        # Each file: a 512-byte header, its bytes to a multiple of 512, and before them a pax
        # header and record of 512 bytes each (every path starts with "Pets été"); two empty
        # blocks at the end.
        tar_bytes = sum(1024 + 512 + -(-len(data) // 512) * 512
                        for data in entries.values()) + 1024
        expect(page.locator("#chosen")).to_have_text(re.compile(
            f"^Pets été/: 14 files, {tar_bytes / 1024:.1f} KiB, sent as one tar archive; "
            "left out, as an upload skips them: (.+) and 1 more$"))
        left_out = re.search("skips them: (.+) and 1 more$", page.inner_text("#chosen"))[1]
        assert set(left_out.split(", ")) < {
            "Pets été/.DS_Store", "Pets été/cat/.thumb.png", "Pets été/.git/",
            "Pets été/__MACOSX/"}
        page.click("#upload-button")
        page.wait_for_url(DATASET_URL)
        assert page.inner_text("h1") == "Pets été"  # the folder's name
        counts = page.inner_text("#class-counts")
        assert "cat" in counts and LONG_CLASS in counts
        skipped = page.inner_text("#skipped")
        assert "Pets été/cat/notes.txt" in skipped and ".DS_Store" not in skipped
        browser.assert_no_errors()
    with server.client() as client:
        dataset = client.get(page_dataset(client, "Pets été")).json()
    assert {c["name"]: c["train"] + c["test"] for c in dataset["classes"]} == {
        "cat": 6, LONG_CLASS: 6}
    assert dataset["unlabeled"] == 1


@pytest.mark.server_env(SELFTUNE_MAX_ARCHIVE_FILES="4", SELFTUNE_MAX_UPLOAD_BYTES="3000")
def test_a_folder_over_the_servers_limits_is_refused_before_it_is_packed_and_sent(
    live_server: LiveServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A folder of more files or bytes than the server takes was packed and sent whole, only
    to be refused once it had arrived."""
    many, large, fits = tmp_path / "many", tmp_path / "large", tmp_path / "fits"
    for i in range(5):
        (many / "cat").mkdir(parents=True, exist_ok=True)
        (many / "cat" / f"{i}.png").write_bytes(b"x")
    for name, size in (("a", 1600), ("b", 1600)):
        (large / "cat").mkdir(parents=True, exist_ok=True)
        (large / "cat" / f"{name}.png").write_bytes(b"x" * size)
    (fits / "cat").mkdir(parents=True)
    dotted = tmp_path / "dotted"
    (dotted / ".cache").mkdir(parents=True)
    (dotted / ".a.png").write_bytes(b"x")
    (dotted / ".cache" / "b.png").write_bytes(b"x")
    (fits / "cat" / "a.png").write_bytes(b"x" * 10)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(live_server.url + "/datasets/new")
        assert "up to 2.9 KiB and 4 files." in page.inner_text(".lead")
        page.set_input_files("#folder", str(dotted))
        expect(page.locator("#upload-error")).to_have_text(
            "The folder holds only hidden files or folders (dotted/.a.png, dotted/.cache/), "
            "which an upload skips: choose the folder of your images.")
        page.set_input_files("#folder", str(many))
        expect(page.locator("#upload-error")).to_have_text(
            "This folder holds 5 files; the server accepts at most 4 in one upload. "
            "Split it into smaller folders.")
        assert page.inner_text("#chosen") == ""
        page.set_input_files("#folder", str(large))
        expect(page.locator("#upload-error")).to_have_text(
            "This folder's files are 3.1 KiB; the server accepts at most 2.9 KiB. "
            "Split it into smaller folders.")
        page.set_input_files("#folder", str(fits))
        expect(page.locator("#chosen")).to_have_text(re.compile(r"^fits/: 1 file, "))
        expect(page.locator("#upload-error")).to_be_hidden()
        page.click("#upload-button")
        # Within the limits, it is sent: the server says what it makes of it.
        expect(page.locator("#upload-error")).to_contain_text("has no usable images")
        browser.assert_no_errors(expected=("422",))


def page_dataset(client, name: str) -> str:
    (found,) = [d["id"] for d in client.get("/api/datasets").json() if d["name"] == name]
    return f"/api/datasets/{found}"


def test_a_dropped_folder_is_read_through_and_sent_packed(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    """A folder dropped on the page is read entry by entry (FileSystemEntry). Headless
    Chromium cannot make a drop of a real folder, so the drop's items answer entries made in
    the page, with the interface the browser gives them (a folder read in batches)."""
    images = {path: base64.b64encode(data).decode() for path, data in class_entries(
        ("bird", "fish"), per_class=5, seed=7).items()}
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(server.url + "/datasets/new")
        drop = """(images) => {
                const file = (path, encoded) => ({
                    isFile: true, isDirectory: false, fullPath: "/aquarium/" + path,
                    file: (done) => done(new File(
                        [Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0))],
                        path.split("/").pop(), { type: "image/png" })),
                });
                // Without images, a folder whose reading never ends (a slow disk).
                const folder = (fullPath, children) => ({
                    isFile: false, isDirectory: true, fullPath,
                    createReader: () => {
                        const batches = [children.slice(0, 3), children.slice(3), []];
                        return { readEntries: (done) => images && setTimeout(
                            () => done(batches.shift())) };
                    },
                });
                const classes = ["bird", "fish"].map((name) => folder("/aquarium/" + name,
                    Object.entries(images || {}).filter(([path]) => path.startsWith(name + "/"))
                        .map(([path, encoded]) => file(path, encoded))));
                // A hidden folder is left out unread (a .git/ of many thousand files).
                const git = { isFile: false, isDirectory: true, fullPath: "/aquarium/.git",
                              createReader: () => { throw new Error("read .git/"); } };
                const dropped = folder("/aquarium", [...classes, git]);
                const transfer = new DataTransfer();
                transfer.items.add(new File([], "aquarium"));
                DataTransferItem.prototype.webkitGetAsEntry = () => dropped;
                const zone = document.getElementById("dropzone");
                zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer }));
                zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
            }"""
        page.evaluate(drop, None)
        expect(page.locator("#chosen")).to_have_text("Reading the folder…")
        page.click("#upload-button")
        expect(page.locator("#upload-error")).to_have_text(
            "The folder is still being packed: press Upload again once its size shows.")
        page.evaluate(drop, images)  # dropped again: this one goes
        expect(page.locator("#chosen")).to_have_text(re.compile(
            r"^aquarium/: 10 files, [0-9.]+ KiB, sent as one tar archive; "
            r"left out, as an upload skips them: aquarium/\.git/$"))
        page.click("#upload-button")
        page.wait_for_url(DATASET_URL)
        assert page.inner_text("h1") == "aquarium"
        counts = page.inner_text("#class-counts")
        assert "bird" in counts and "fish" in counts
        browser.assert_no_errors()


def test_the_tar_a_folder_becomes_holds_every_file_at_its_path_for_pythons_tarfile(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    """folder_tar.js on 4,100 files, a step at a time, read back by the tarfile the server
    reads uploads with: names of 99, 100 and 101 bytes (the ustar field holds 100), not ASCII,
    long; file sizes on and off the 512-byte blocks."""
    special = ["a" * 95 + "/.png", "b" * 96 + "/.png", "c" * 97 + "/.png",
               "été/ünïcode ✓.png", "d/" * 150 + "deep.png", "e/block.png", "f/empty.png"]
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(server.url + "/datasets/new")
        packed = page.evaluate(
            """async (special) => {
                const sizes = { "e/block.png": 512, "f/empty.png": 0 };
                const entries = special.map((path, i) => ({ path, file: new File(
                    [new Uint8Array(sizes[path] ?? i + 1).fill(i + 1)],
                    path.split("/").pop(), { lastModified: 1_700_000_000_000 }) }));
                for (let i = 0; i < 4100 - special.length; i += 1) {
                    const file = new File([String(i)], `${i}.png`);
                    entries.push({ path: `many/${i}.png`, file });
                }
                const steps = [];
                const blob = await window.folderTar.pack(entries, (n) => steps.push(n));
                const bytes = new Uint8Array(await blob.arrayBuffer());
                let text = "";
                for (let i = 0; i < bytes.length; i += 0x8000) {
                    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
                }
                return { steps, tar: btoa(text) };
            }""",
            special,
        )
        browser.assert_no_errors()
    assert packed["steps"] == [2000, 4000, 4100]
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed["tar"]))) as archive:
        members = archive.getmembers()
        assert [m.name for m in members[:len(special)]] == special
        assert len(members) == 4100 and all(m.isfile() for m in members)
        for i, member in enumerate(members[:len(special)]):
            size = {"e/block.png": 512, "f/empty.png": 0}.get(member.name, i + 1)
            assert archive.extractfile(member).read() == bytes([i + 1]) * size
            assert member.mtime == 1_700_000_000
        assert [archive.extractfile(m).read() for m in members[len(special):]] == [
            str(i).encode() for i in range(4100 - len(special))]


def test_every_training_image_of_a_class_can_be_shown_on_the_dataset_page(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    """The page showed the first 12 of each class and no way to the rest, nor any test image:
    an odd image of a class (a mislabeled one, a format read wrong) could not be looked at
    there."""
    with server.client() as client:
        answer = client.post("/api/datasets", files={"file": ("many.zip", zip_bytes(
            {**class_entries(("cat",), per_class=100, seed=61),
             **class_entries(("dog",), per_class=5, seed=62)}))}, data={"name": "many"})
        assert answer.status_code == 201, answer.text
        dataset = answer.json()
        listed = [image["original_path"].rsplit("/", 1)[-1] for image in client.get(
            f"/api/datasets/{dataset['id']}/images",
            params={"label": 0, "split": "train", "limit": 1000}).json()["items"]]
        tested = [image["original_path"].rsplit("/", 1)[-1] for image in client.get(
            f"/api/datasets/{dataset['id']}/images",
            params={"label": 0, "split": "test", "limit": 1000}).json()["items"]]
    train = {c["name"]: c["train"] for c in dataset["classes"]}
    test = {c["name"]: c["test"] for c in dataset["classes"]}
    assert train["cat"] == len(listed) > 60  # a few are held out for testing
    assert test["cat"] == len(tested) > 1 and test["dog"] >= 1
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/datasets/{dataset['id']}")
        cat_box = page.locator("#class-thumbnails .thumbs[data-class='0']")
        expect(cat_box.locator("img")).to_have_count(12)
        assert page.locator("[data-more-class='1']").count() == 0  # every dog shown
        more = page.locator("[data-more-class='0']")
        expect(more).to_have_text(f"Show 48 more ({train['cat'] - 12} not shown)")
        more.click()
        expect(cat_box.locator("img")).to_have_count(60)
        assert " ".join(page.inner_text("#class-0").split()) == (
            f"cat ({train['cat']} train: the first 60)")
        expect(more).to_have_text(f"Show {train['cat'] - 60} more ({train['cat'] - 60} not "
                                  "shown)")
        more.click()
        expect(cat_box.locator("img")).to_have_count(train["cat"])
        expect(more).to_be_hidden()
        assert " ".join(page.inner_text("#class-0").split()) == f"cat ({train['cat']} train)"
        alts = cat_box.locator("img").evaluate_all("(images) => images.map((i) => i.alt)")
        assert alts == listed  # in order, each once

        # The test images too (the page showed none): those every run is scored on.
        cat_tests = page.locator("[data-test-of='0']")
        expect(cat_tests.locator("img")).to_have_count(0)
        expect(page.get_by_role("heading", name="Test images of cat")).to_be_hidden()
        show = page.locator("[data-more-test='0']")
        expect(show).to_have_text(f"Show its {test['cat']} test images")
        show.click()
        expect(cat_tests.locator("img")).to_have_count(test["cat"])
        expect(page.get_by_role("heading", name="Test images of cat")).to_be_visible()
        expect(show).to_be_hidden()
        alts = cat_tests.locator("img").evaluate_all("(images) => images.map((i) => i.alt)")
        assert alts == tested
        page.locator("[data-more-test='1']").click()
        expect(page.locator("[data-test-of='1'] img")).to_have_count(test["dog"])
        browser.assert_no_errors()
