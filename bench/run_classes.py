"""A finished run of many classes on its page, in headless Chromium: how soon the page shows
its summary, what it weighs, and what the per-class table's "Show all", a sort of every row
and a find among them cost the main thread.

Starts its own uvicorn (SQLite in a temporary data directory, the Redis named by
SELFTUNE_REDIS_URL or redis://127.0.0.1:6379/14), records a finished run of each class count
as bench/run_record.py does, then opens its page --repeat times and measures: the page's
HTML (as sent and gzipped) and its embedded data; first contentful paint; when the Scores
and the per-class table are drawn (the frame after); the main thread's work until then;
then, with the table open on its first rows, "Show all" (until every row is in the table
and a frame has passed), a sort of every row by class and a find ("class 01") among them,
each with the main thread's work (Chromium's own count) and its longest task. Medians of
the repeats; times on a shared machine vary, so compare the rows of one run.

    .venv/bin/python bench/run_classes.py --classes 1000 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_record import print_table, served_runs  # noqa: E402

from tests.browser import DESKTOP  # noqa: E402

# Registered before the page's scripts: every main-thread task over 50 ms, and the frame
# after the Scores and the per-class table first hold rows (what a person sees then).
OBSERVE = """
window.benchLongTasks = [];
new PerformanceObserver((list) => {
  for (const task of list.getEntries()) window.benchLongTasks.push([task.startTime, task.duration]);
}).observe({ type: "longtask" });
window.benchShown = {};
const watched = { scores: "#headline tr", table: "#results:not([hidden]) #per-class tbody tr" };
new MutationObserver(() => {
  for (const [name, selector] of Object.entries(watched)) {
    if (name in window.benchShown || !document.querySelector(selector)) continue;
    window.benchShown[name] = null;
    requestAnimationFrame(() => setTimeout(() => { window.benchShown[name] = performance.now(); }));
  }
}).observe(document, { childList: true, subtree: true });
"""
LONGEST_SINCE = """(since) => Math.max(0, ...window.benchLongTasks
  .filter(([start]) => start >= since).map(([, duration]) => duration))"""
# Resolves in the frame after the per-class table holds `rows` rows.
ROWS_DRAWN = """(rows) => new Promise((resolve) => {
  const check = () => {
    if (document.querySelectorAll("#per-class tbody tr").length === rows) {
      requestAnimationFrame(() => setTimeout(resolve));
    } else requestAnimationFrame(check);
  };
  check();
})"""


def busy_ms(cdp) -> float:
    """Main-thread task time of the page so far, in ms (Chromium's own count)."""
    metrics = cdp.send("Performance.getMetrics")["metrics"]
    return 1000 * next(m["value"] for m in metrics if m["name"] == "TaskDuration")


def action(page, cdp, act, rows: int) -> tuple[float, float, float]:
    """Wall ms until the table holds `rows` rows and a frame passed, main-thread ms, longest
    task ms, of `act()`."""
    page.evaluate(ROWS_DRAWN, page.locator("#per-class tbody tr").count())  # settled before
    since, before = page.evaluate("performance.now()"), busy_ms(cdp)
    started = time.perf_counter()
    act()
    page.evaluate(ROWS_DRAWN, rows)
    wall = (time.perf_counter() - started) * 1000
    return wall, busy_ms(cdp) - before, page.evaluate(LONGEST_SINCE, since)


def measure(chromium, base: str, run_id: int, classes: int) -> dict:
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.add_init_script(OBSERVE)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    page.goto(f"{base}/runs/{run_id}", timeout=300_000)
    page.wait_for_function("window.benchShown.table && window.benchShown.scores",
                           timeout=300_000)
    result = {
        "fcp_ms": page.evaluate(
            "performance.getEntriesByName('first-contentful-paint')[0].startTime"),
        "scores_ms": page.evaluate("window.benchShown.scores"),
        "table_ms": page.evaluate("window.benchShown.table"),
        "open_busy_ms": busy_ms(cdp),
        "open_longest_ms": page.evaluate(LONGEST_SINCE, 0),
    }
    more = page.locator("#per-class-more")
    result["all_ms"], result["all_busy_ms"], result["all_longest_ms"] = action(
        page, cdp, more.click, classes)
    sort = page.get_by_role("button", name="Class", exact=True)
    result["sort_ms"], result["sort_busy_ms"], result["sort_longest_ms"] = action(
        page, cdp, sort.click, classes)
    found = sum(1 for n in range(classes) if "class 01" in f"class {n:05d}")
    find = page.get_by_label("Find a class")
    result["find_ms"], result["find_busy_ms"], result["find_longest_ms"] = action(
        page, cdp, lambda: find.fill("class 01"), found)
    context.close()
    return result


def page_weight(base: str, run_id: int) -> dict:
    html = httpx.get(f"{base}/runs/{run_id}", timeout=300).content
    start = html.index(b'id="run-data">') + len(b'id="run-data">')
    data = html[start:html.index(b"</script>", start)]
    return {"html_kb": len(html) / 1e3, "gzip_kb": len(gzip.compress(html, 6)) / 1e3,
            "data_kb": len(data) / 1e3}


COLUMNS = [  # key, heading, format
    ("classes", "classes", "{:>7,}"), ("html_kb", "page kB", "{:>7.0f}"),
    ("gzip_kb", "gzip kB", "{:>7.0f}"), ("data_kb", "data kB", "{:>7.0f}"),
    ("fcp_ms", "FCP ms", "{:>6.0f}"), ("scores_ms", "scores ms", "{:>9.0f}"),
    ("table_ms", "table ms", "{:>8.0f}"), ("open_busy_ms", "open busy", "{:>9.0f}"),
    ("open_longest_ms", "longest", "{:>7.0f}"),
    ("all_ms", "all ms", "{:>6.0f}"), ("all_busy_ms", "all busy", "{:>8.0f}"),
    ("all_longest_ms", "longest", "{:>7.0f}"),
    ("sort_ms", "sort ms", "{:>7.0f}"), ("sort_busy_ms", "sort busy", "{:>9.0f}"),
    ("sort_longest_ms", "longest", "{:>7.0f}"),
    ("find_ms", "find ms", "{:>7.0f}"), ("find_busy_ms", "find busy", "{:>9.0f}"),
    ("find_longest_ms", "longest", "{:>7.0f}"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=3, help="page openings a class count")
    args = parser.parse_args()

    rows = []
    with served_runs(args.classes, "selftune-run-classes-") as (_, base, runs, chromium):
        for classes, run_id in runs.items():
            tries = [measure(chromium, base, run_id, classes) for _ in range(args.repeat)]
            rows.append({"classes": classes, **page_weight(base, run_id),
                         **{key: statistics.median(t[key] for t in tries) for key in tries[0]}})
    print_table(COLUMNS, rows)
    print("FCP, scores and table: ms from the navigation's start (scores and table: the "
          "frame after they\nhold rows); busy: the main thread's work, ms; longest: its "
          "longest task, ms (0: none over 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
