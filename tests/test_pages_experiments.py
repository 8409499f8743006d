"""The whole product in Chromium against a real server and a real Celery worker: upload on the
page, start a sweep with the form, watch it live, read the results, download the model; and
the live run page on a phone, cancelled from its button."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import onnxruntime
import pytest

from tests.browser import PHONE, open_browser
from tests.support import PROJECT_ROOT, make_image_archive, wait_for

pytestmark = pytest.mark.browser

# A tiny model on tiny images: a run takes seconds on two CPU cores.
TINY_FORM = {
    "#f-backbone": "test_efficientnet",
    "#f-image_size": "32",
    "#f-batch_size": "8",
    "#f-unlabeled_batch_size": "8",
    "#f-iterations": "30",
    "#f-eval_interval": "15",
    "#f-log_interval": "3",
    "#f-checkpoint_interval": "30",
    "#f-lr": "0.01",
}
TINY_API = {
    "backbone": "test_efficientnet", "preset": "quick",
    "overrides": {"pretrained": False, "image_size": 32, "batch_size": 8,
                  "unlabeled_batch_size": 8, "eval_interval": 20, "log_interval": 5,
                  "checkpoint_interval": 20, "lr": 0.01},
}
# Records every text the runs table shows, and every title of the tab, so the test can tell
# the page changed live.
WATCH_RUNS_TABLE = """() => {
    window.seenSteps = {};
    window.seenTitles = [document.title];
    window.sameDocument = true;  // a reload would drop this
    new MutationObserver(() => {
        if (window.seenTitles.at(-1) !== document.title) window.seenTitles.push(document.title);
    }).observe(document.querySelector("title"),
        {subtree: true, childList: true, characterData: true});
    const record = () => {
        for (const row of document.querySelectorAll("#runs tbody tr")) {
            const step = row.querySelector(".step")?.textContent;
            const seen = (window.seenSteps[row.dataset.runId] ??= []);
            if (step && seen[seen.length - 1] !== step) seen.push(step);
        }
    };
    new MutationObserver(record).observe(document.querySelector("#runs tbody"),
        {subtree: true, childList: true, characterData: true});
    record();
}"""


def words(texts: list[str]) -> list[str]:
    """Texts with each run of whitespace one space: innerText puts text placed out of the
    flow (a screen reader's "best" in a results cell) on a line of its own."""
    return [" ".join(text.split()) for text in texts]


@pytest.mark.slow
def test_upload_start_watch_and_take_the_model_in_the_browser(
    live_server, celery_worker, tmp_path, request
):
    archive = make_image_archive(tmp_path / "shapes.zip", train_per_class=12, test_per_class=4,
                                 unlabeled=9)
    with open_browser(request.node.name) as browser:
        page = browser.page

        # Upload on the datasets engineer's page, then follow its link to the form.
        page.goto(f"{live_server.url}/datasets/new")
        page.set_input_files("#file", str(archive))
        page.fill("#name", "shapes")
        page.click("#upload-button")
        page.wait_for_url(re.compile(r"/datasets/\d+$"))
        dataset_id = page.url.rsplit("/", 1)[1]
        page.click("#start-experiment")
        page.wait_for_url(re.compile(r"/experiments/new\?dataset_id=\d+$"))
        assert page.input_value("#f-dataset_id") == dataset_id

        for selector, value in TINY_FORM.items():
            page.fill(selector, value)
        page.uncheck("#f-pretrained")
        page.fill("#f-name", "shapes sweep")
        page.fill("#f-budgets", "50%, all")
        assert "4 runs" in page.inner_text("#run-count")
        browser.screenshot("1-form")
        page.click("#start")
        page.wait_for_url(re.compile(r"/experiments/\d+$"))
        experiment_url = page.url

        # Progress arrives over the experiment's event feed, without a reload.
        page.wait_for_selector("#runs tbody tr")
        page.evaluate(WATCH_RUNS_TABLE)
        assert page.locator("#runs tbody tr").count() == 4
        page.wait_for_function(
            """() => [...document.querySelectorAll('#runs tbody .badge')]
                .every((b) => b.textContent === 'succeeded')""",
            timeout=240_000,
        )
        assert page.evaluate("window.sameDocument") is True
        seen = page.evaluate("window.seenSteps")
        assert all(steps[-1] == "30 / 30" for steps in seen.values()), seen
        # Runs that were still queued when the page opened were seen stepping forward.
        moving = [steps for steps in seen.values() if len(steps) >= 3]
        assert moving, f"no run was seen moving: {seen}"
        assert any(re.fullmatch(r"[1-2]?\d / 30", s) and s != "0 / 30" for s in moving[-1]), seen

        # Results: one accuracy point per method and budget, the paper table, best marked.
        page.wait_for_selector("#experiment-status .badge:text-is('finished')")
        # The tab counted the runs that had ended while they trained, then said how it ended.
        assert page.title() == "finished · shapes sweep — Self-Tuning Lab"
        titles = page.evaluate("window.seenTitles")
        assert all(title.endswith(" · shapes sweep — Self-Tuning Lab") for title in titles)
        counted = [title.split(" · ")[0] for title in titles[:-1]]
        assert counted and all(re.fullmatch(r"queued|[0-4]/4", c) for c in counted), titles
        assert counted == sorted(counted, key=lambda c: -1 if c == "queued" else int(c[0])), titles
        points = browser.chart_points("#budget-chart")
        assert points == {"Self-Tuning": 2, "Fine-tuning": 2}, points
        table = page.locator("#budget-table")
        assert table.locator("thead th").all_inner_texts() == [
            "Method", "50%\n18 labels", "all\n36 labels"]
        cells = words(table.locator("tbody td").all_inner_texts())
        number = re.compile(r"(★ best: )?\d{1,3}\.\d")  # the best of a budget says so
        assert len(cells) == 4 and all(number.fullmatch(c) for c in cells), cells
        # The best of each budget (column): its highest mean as shown, each if tied; marked
        # in words and highlighted.
        rows = table.locator("tbody tr")
        texts = [words(rows.nth(i).locator("td").all_inner_texts()) for i in range(2)]
        shown = [[float(t.split()[-1]) for t in row] for row in texts]
        marked = [[rows.nth(i).locator("td").nth(j).evaluate("c => c.classList.contains('best')")
                   for j in range(2)] for i in range(2)]
        assert marked == [[t.startswith("★ best: ") for t in row] for row in texts], texts
        assert marked == [[shown[i][j] == max(shown[0][j], shown[1][j]) for j in range(2)]
                          for i in range(2)], (shown, marked)
        # One seed: a run per cell, so the runs marked best are the cells marked, ties each.
        assert page.locator("#runs tbody tr.best").count() == sum(map(sum, marked))
        # Two budgets (18 and 36 of the 36 labeled images): one doubling further per method.
        estimates = page.locator("#label-estimates tbody tr")
        assert estimates.locator("th").all_inner_texts() == ["Self-Tuning", "Fine-tuning"]
        for text in estimates.all_inner_texts():
            shown = re.fullmatch(r"\S+\s+\d{1,3}\.\d% at 36 labels\s+(.+?)\s+([+−]\d{1,3}\.\d) "
                                 r"points", text)
            assert shown, text
            predicted, gain = shown.groups()
            if gain.startswith("+") and gain != "+0.0":  # a rising line is extended
                assert re.fullmatch(r"\d{1,3}\.\d% at 72 labels \(\+36\)", predicted), text
            else:  # e.g. 100% at both budgets: no forecast
                assert predicted == "none: top-1 did not rise with labels in these runs", text
        browser.screenshot("2-experiment-finished")

        # The finished Self-Tuning run: curves, confusion matrix, quality, label next, files.
        page.click("#runs tbody tr:first-child a")
        page.wait_for_url(re.compile(r"/runs/\d+$"))
        page.wait_for_selector("#results:not([hidden])")
        assert page.title() == f"succeeded · Run #{page.url.rsplit('/', 1)[1]} — Self-Tuning Lab"
        page.wait_for_selector("#label-next-thumbs img")
        page.wait_for_function("document.getElementById('snippet').textContent.includes('timm')")
        # The curves are drawn at the next frame after the record is read (on a loaded
        # machine, after the results): wait for them rather than read them half drawn.
        page.wait_for_function("(Chart.getChart(document.getElementById('chart-losses'))"
                               "?.data.datasets ?? []).some((d) => d.data.length >= 10)")
        losses = browser.chart_points("#chart-losses")
        assert {"ce", "pgc_labeled", "pgc_unlabeled"} <= set(losses), losses
        assert set(losses.values()) == {10}, losses  # every 3 of 30 iterations
        assert browser.chart_points("#chart-lr") == {"learning rate": 10}
        # Its axis names both rates the run trained at (x0.1 at 75%): one stepped down once
        # read "0.001" alone, neither rate.
        rates, lr_axis = page.evaluate("""() => {
            const chart = Chart.getChart(document.getElementById('chart-lr'));
            const points = chart.data.datasets[0].data;
            return [[points[0].y, points.at(-1).y],
                    chart.scales.y.ticks.map((t) => t.label).filter((l) => l !== '')];
        }""")
        assert rates[1] == pytest.approx(rates[0] / 10) and set(rates) <= set(lr_axis), lr_axis
        assert page.evaluate("""async () => {  // the same chart for the preset's own rates
            const { setSeries, stepChart } = await import('/static/charts.js');
            const box = document.createElement('div');
            box.style.height = '200px';
            const canvas = box.appendChild(document.createElement('canvas'));
            document.querySelector('main').append(box);
            const chart = stepChart(canvas, { yType: 'logarithmic' });
            setSeries(chart, new Map([['lr', [{ x: 10, y: 0.002 }, { x: 50, y: 0.0002 }]]]), 60);
            chart.update();
            const labels = chart.scales.y.ticks.map((t) => t.label).filter((l) => l !== '');
            box.remove();
            return labels;
        }""") == [0.0002, 0.0005, 0.001, 0.002]
        accuracy = browser.chart_points("#chart-accuracy")
        assert accuracy["top-1"] == 2, accuracy  # evaluations at 15 and 30
        assert "training's pseudo-labels right" in browser.chart_points("#chart-pseudo")
        assert browser.chart_points("#chart-distribution")
        confusion = page.locator("#confusion tbody td").all_inner_texts()
        assert len(confusion) == 9 and sum(int(c) for c in confusion) == 12  # 3 x 4 test images
        assert page.locator("#per-class tbody tr").count() == 3
        page.locator("#label-next").scroll_into_view_if_needed()  # thumbnails load lazily
        page.wait_for_function(
            "[...document.querySelectorAll('#label-next-thumbs img')]"
            ".every((img) => img.complete && img.naturalWidth > 0)"
        )
        snippet = page.inner_text("#snippet")
        assert "test_efficientnet, 3 classes" in snippet
        # The download command as shown fetches the zip under the name it then unzips.
        fetch_line, unzip_line = page.inner_text("#snippet-download").splitlines()
        (tmp_path / "curl").mkdir()
        fetched = subprocess.run(["bash", "-c", fetch_line], cwd=tmp_path / "curl",
                                 capture_output=True, text=True, timeout=60)
        assert fetched.returncode == 0, fetched.stderr
        assert zipfile.ZipFile(tmp_path / "curl" / unzip_line.split()[-1]).testzip() is None
        # The predict command as shown labels a folder of new images with that zip.
        with zipfile.ZipFile(archive) as uploaded:
            new_images = [name for name in uploaded.namelist() if name.startswith("test/")
                          and not name.endswith("/")]
            uploaded.extractall(tmp_path / "curl" / "new-images", members=new_images)
        predict_line = page.inner_text("#snippet-predict")
        python, command = predict_line.split(maxsplit=1)
        assert python == ".venv/bin/python", predict_line
        assert command.startswith("-m worker.selftuning predict "), predict_line
        predicted = subprocess.run(
            [sys.executable, *command.split()], cwd=tmp_path / "curl",
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, text=True,
            timeout=120)
        assert predicted.returncode == 0, predicted.stderr
        with open(tmp_path / "curl" / "labels.csv", newline="") as handle:
            labels = list(csv.DictReader(handle))
        assert len(labels) == len(new_images) == 12  # 3 classes x 4 test images
        assert {row["label"] for row in labels} <= {"circle", "square", "triangle"}
        with page.expect_download() as download_info:
            page.click("#download-checkpoint")
        with open(download_info.value.path(), "rb") as handle:
            checkpoint = zipfile.ZipFile(io.BytesIO(handle.read()))
        assert {"model.safetensors", "config.json", "training.json"} <= set(checkpoint.namelist())
        # The page's snippet, run as shown next to the unzipped download, loads the trained
        # classifier (timm would silently drop a head it was not told about).
        unzipped = tmp_path / "download"
        checkpoint.extractall(unzipped)
        check = (snippet + "\nimport torch"
                 "\nfrom safetensors.torch import load_file"
                 "\nsaved = load_file('model.safetensors')"
                 "\nassert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())"
                 "\ntransform"
                 "\nprint(len(labels), model.pretrained_cfg['input_size'][-1])")
        loaded = subprocess.run([sys.executable, "-c", check], cwd=unzipped,
                                capture_output=True, text=True, timeout=120)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.split() == ["3", "32"], loaded.stdout  # 3 classes, 32 px
        hrefs = page.eval_on_selector_all("#downloads a", "(links) => links.map((a) => a.href)")
        assert len(hrefs) == 8  # checkpoint, ONNX, its 3 files, test and unlabeled
        # predictions, label next
        for href in hrefs:
            response = page.request.get(href)
            assert response.ok and response.body(), (href, response.status)
        # The ONNX model of the run the worker trained gives a score for each of its classes.
        with page.expect_download() as download_info:
            page.click("#download-onnx")
        served = onnxruntime.InferenceSession(download_info.value.path(),
                                              providers=["CPUExecutionProvider"])
        (scores,) = served.run(["logits"], {"pixels": np.zeros((2, 3, 32, 32), np.float32)})
        assert scores.shape == (2, 3)
        browser.screenshot("3-run-finished")

        # The same pages on a phone, reached by their links: nothing wider than the screen
        # except inside cards that scroll.
        page.set_viewport_size(PHONE)
        page.reload()
        page.wait_for_selector("#results:not([hidden])")
        for name, link in [("4-phone-run-finished", ".crumbs a[href^='/experiments/']"),
                           ("5-phone-experiment", ".crumbs a[href='/experiments']"),
                           ("6-phone-experiments", None)]:
            page.wait_for_load_state("networkidle")
            assert browser.horizontal_overflow() == 0, name
            browser.screenshot(name)
            if link:
                page.click(link)
        assert page.url == f"{live_server.url}/experiments"
        page.goto(f"{live_server.url}/experiments?dataset_id={dataset_id}")
        assert page.locator("#experiments a", has_text="shapes sweep").get_attribute(
            "href") == experiment_url.removeprefix(live_server.url)
        # The list names the model to take: the run with the best test top-1.
        runs = page.request.get(experiment_url.replace("/experiments/", "/api/experiments/")
                                ).json()["runs"]
        best = max(runs, key=lambda run: (run["test_top1"], -run["id"]))
        cell = page.locator("#experiments tbody tr", has_text="shapes sweep").locator(".best-run")
        assert cell.locator("a").get_attribute("href") == f"/runs/{best['id']}"
        title = {"self-tuning": "Self-Tuning", "fine-tune": "Fine-tuning"}[best["method"]]
        assert " ".join(cell.inner_text().split()) == (
            f"{best['test_top1'] * 100:.1f}% {title}, {best['budget_label']}, seed 0")
        page.goto(f"{live_server.url}/experiments?dataset_id={int(dataset_id) + 1}")
        assert page.locator("#experiments").count() == 0
        browser.assert_no_errors()


@pytest.mark.slow
def test_live_run_page_on_a_phone_survives_a_server_restart_and_cancels(
    live_server, celery_worker, tmp_path, request
):
    archive = make_image_archive(tmp_path / "shapes.zip", train_per_class=12, test_per_class=4,
                                 unlabeled=9)
    with live_server.client() as client:
        with open(archive, "rb") as handle:
            uploaded = client.post("/api/datasets", files={"file": ("shapes.zip", handle)})
        assert uploaded.status_code == 201, uploaded.text
        created = client.post("/api/experiments", json={
            "dataset_id": uploaded.json()["id"],
            "methods": ["self-tuning", "fixmatch", "fine-tune"],
            "budgets": [0.5], **{**TINY_API, "overrides": {
                **TINY_API["overrides"], "iterations": 100_000}},
        })
        assert created.status_code == 201, created.text
    running, queued, last = (run["id"] for run in created.json()["runs"])
    experiment_url = f"{live_server.url}/experiments/{created.json()['id']}"
    restarted = None

    def step_shown() -> int:
        return int(page.inner_text("#step").split(" / ")[0].replace(",", ""))

    with open_browser(request.node.name, viewport=PHONE) as browser:
        page = browser.page
        try:
            page.goto(f"{live_server.url}/runs/{queued}")  # waits behind the first run
            page.wait_for_selector("#queue-row:not([hidden])")
            # Second in line until the worker takes the first run, then next.
            assert re.match(r"[12] ", page.inner_text("#queue-position"))
            page.wait_for_function(
                "document.getElementById('queue-position').textContent.startsWith('1 ')",
                timeout=30_000,
            )
            assert browser.horizontal_overflow() == 0
            assert page.title() == f"queued · Run #{queued} — Self-Tuning Lab"
            browser.screenshot("1-phone-run-queued")

            page.goto(f"{live_server.url}/runs/{running}")
            page.wait_for_function(
                "() => (Chart.getChart(document.getElementById('chart-losses'))"
                "?.data.datasets[0]?.data.length ?? 0) >= 3",
                timeout=60_000,
            )
            before = step_shown()
            wait_for(lambda: step_shown() > before, timeout=20, message="the step to move")
            assert page.inner_text("#images-per-s") != "–"
            assert re.fullmatch(rf"\d% · Run #{running} — Self-Tuning Lab", page.title())
            wait_for(lambda: page.inner_text("#eta") != "–", timeout=15, message="an ETA")
            assert browser.horizontal_overflow() == 0
            browser.screenshot("2-phone-run-live")

            # The server dies while training goes on; the page waits, then carries on.
            quiet = len(browser.errors)
            live_server.process.stop(signal.SIGKILL)
            wait_for(lambda: page.inner_text("#live-state") == "reconnecting…", timeout=10,
                     message="the page to notice the server is gone")
            time.sleep(3)  # let the worker record points the page cannot see yet
            restarted = live_server.restart(tmp_path / "logs" / "uvicorn-restarted.log")
            wait_for(lambda: page.inner_text("#live-state") == "● live", timeout=30,
                     message="the page to reconnect")
            after = step_shown()
            wait_for(lambda: step_shown() > after, timeout=20, message="the step to move again")
            outage = browser.errors[quiet:]
            del browser.errors[quiet:]
            assert all("net::ERR_" in error for error in outage), outage

            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#cancel")
            page.wait_for_function(
                "document.querySelector('#run-status .badge').textContent === 'cancelled'",
                timeout=30_000,
            )
            assert page.locator("#cancel").is_hidden()
            assert page.title() == f"cancelled · Run #{running} — Self-Tuning Lab"
            browser.screenshot("3-phone-run-cancelled")

            # Every recorded point is on the chart once: none lost in the outage, none twice.
            with live_server.client() as client:
                recorded = client.get(f"/api/runs/{running}/metrics").json()["points"]
            steps = [p["step"] for p in recorded if p["kind"] == "progress"]
            page.wait_for_function(
                "(n) => Chart.getChart(document.getElementById('chart-losses'))"
                ".data.datasets[0].data.length === n", arg=len(steps), timeout=10_000,
            )
            charted = page.evaluate(
                "Chart.getChart(document.getElementById('chart-losses'))"
                ".data.datasets[0].data.map((point) => point.x)"
            )
            assert charted == steps

            # Cancels show on the experiment page as they happen, queued runs included.
            page.goto(experiment_url)
            page.wait_for_selector("#live-state:text-is('● live')")
            assert browser.horizontal_overflow() == 0
            browser.screenshot("4-phone-experiment-live")
            # Once the next run trains and the page has re-read the record after that start,
            # only the live feed can tell it about the cancel of the run still queued.
            page.wait_for_selector(f"#runs tr[data-run-id='{queued}'] .badge:text-is('running')",
                                   timeout=30_000)
            page.wait_for_timeout(1500)
            for run_id in (last, queued):  # the one still queued, then the one training
                with live_server.client() as client:
                    assert client.post(f"/api/runs/{run_id}/cancel").status_code == 200
                page.wait_for_selector(
                    f"#runs tr[data-run-id='{run_id}'] .badge:text-is('cancelled')")
            page.wait_for_selector("#experiment-status .badge:text-is('cancelled')")
            page.wait_for_selector("#live-state:text-is('')", state="attached")
            browser.screenshot("5-phone-experiment-cancelled")
            browser.assert_no_errors()
        finally:
            if restarted is not None:
                restarted.stop()
