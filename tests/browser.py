"""Playwright on Debian's Chromium for the page tests: console errors collected, screenshots
kept under test-results/<test name>/ (gitignored) so a person can look at them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from tests.support import PROJECT_ROOT

CHROMIUM = "/usr/bin/chromium"  # Playwright's own browser download does not work here
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
RESULTS_DIR = PROJECT_ROOT / "test-results"


def results_dir(test_name: str) -> Path:
    """The test's screenshot folder, emptied so that what is there is from this run."""
    path = RESULTS_DIR / re.sub(r"[^\w.-]+", "_", test_name)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


@dataclass
class Browser:
    page: Page
    shots: Path
    errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def horizontal_overflow(self) -> int:
        """Pixels the page is wider than the window (0 when only cards scroll sideways)."""
        return self.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )

    def chart_points(self, canvas_selector: str) -> dict[str, int]:
        """Per dataset label, how many points the Chart.js chart on that canvas holds."""
        return self.page.evaluate(
            """(selector) => {
                const chart = Chart.getChart(document.querySelector(selector));
                if (!chart) return null;
                return Object.fromEntries(chart.data.datasets.map(
                    (d) => [d.label, d.data.filter((v) => v !== null && v !== undefined).length]));
            }""",
            canvas_selector,
        )

    def assert_no_errors(self, expected: tuple[str, ...] = ()) -> None:
        """No console error and no uncaught exception, except messages containing one of
        `expected` (Chromium logs every 4xx answer, also the ones a test provokes)."""
        errors = [e for e in self.errors if not any(text in e for text in expected)]
        assert not errors, "the browser reported errors:\n" + "\n".join(errors)


@contextmanager
def open_browser(test_name: str, viewport: dict[str, int] = DESKTOP,
                 timezone_id: str | None = None,
                 back_forward_cache: bool = False, touch: bool = False,
                 content_security_policy: bool = False) -> Iterator[Browser]:
    """`back_forward_cache`: Back and Forward may show a page as it was left, as Chromium does
    for people (Playwright turns that off unless told). `touch`: a phone's touch screen, with
    no mouse to hover with (CSS `(hover: none) and (pointer: coarse)`).
    `content_security_policy`: the browser keeps to the pages' policy. Off, it sets it aside,
    for Playwright's `wait_for_function` makes its predicate with `new Function`, which the
    policy refuses; the accessibility audit of every page (test_pages_accessibility) and the
    policy's own test keep to it, and fail on any script a page has that it refuses."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            ignore_default_args=["--disable-back-forward-cache"] if back_forward_cache else None)
        context = chromium.new_context(viewport=viewport, accept_downloads=True,
                                       timezone_id=timezone_id, has_touch=touch,
                                       is_mobile=touch, bypass_csp=not content_security_policy)
        context.set_default_timeout(20_000)
        page = context.new_page()
        browser = Browser(page, results_dir(test_name))
        page.on("console", lambda message: browser.errors.append(
            f"console.{message.type} on {page.url}: {message.text}"
        ) if message.type == "error" else None)
        page.on("pageerror", lambda error: browser.errors.append(
            f"uncaught on {page.url}: {error}"
        ))
        try:
            yield browser
        except Exception:
            browser.screenshot("failure")  # what the page showed when the test gave up
            raise
        finally:
            context.close()
            chromium.close()


def wait_until_held(page: Page, held: list) -> None:
    """Wait (up to 20 s) for a request a route holds in `held`: the route's handler runs only
    while Playwright waits. Exactly one must come."""
    deadline = time.monotonic() + 20
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)
    # Where none came (seen once under load): what the page had then, to tell a press that
    # did not land from an ask that was not made.
    assert len(held) == 1, (len(held), page.evaluate(
        "({focused: document.activeElement?.id, text: document.activeElement?.textContent,"
        " off: document.activeElement?.getAttribute('aria-disabled')})"))
