"""Browser tests of the dashboard: Debian's chromium driven by Playwright (sync API, no browser
download) against the live embedded stack (uvicorn + a Celery worker with 2 CPU slots, SQLite, Redis
db 8). Screenshots go to $TRAINBOX_ARTIFACTS (or a temporary folder), printed at the start.

scripts/browser.sh installs chromium; without it the suite is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.worker.conftest import start_stack

CHROMIUM = os.environ.get("TRAINBOX_CHROMIUM", "/usr/bin/chromium")
REDIS_URL = "redis://127.0.0.1:6379/8"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no browser at {CHROMIUM}: run scripts/browser.sh (as root it installs Debian's chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is not installed")


@pytest.fixture(scope="session")
def shots() -> Path:
    """Where the screenshots go (CI keeps the folder as an artifact)."""
    root = os.environ.get("TRAINBOX_ARTIFACTS")
    folder = Path(root) / "browser" if root else Path(tempfile.mkdtemp(prefix="trainbox-browser-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {folder}")
    return folder


# The stack, its API client and the browser are the module's (tests/browser has one): they go when its
# tests are done, not at the end of the whole run, where an idle stack's worker would sweep every second
# and chromium would idle beside the rest of the suite.
@pytest.fixture(scope="module")
def stack() -> Iterator[Any]:
    # Its own folder, not pytest's numbered ones: another pytest run on the machine prunes those.
    folder = Path(tempfile.mkdtemp(prefix="trainbox-browser-stack-"))
    s = start_stack(folder, REDIS_URL, cancel_grace_s="5")
    yield s
    s.stop()
    shutil.rmtree(folder, ignore_errors=True)


class Api:
    """The few calls the tests make behind the browser's back (submitting, cancelling, reading)."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> None:
        r = self.http.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 202, r.text


@pytest.fixture(scope="module")
def api(stack: Any) -> Iterator[Api]:
    a = Api(stack.url, stack.token())
    yield a
    a.http.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One chromium for the dashboard tests, on a new empty profile."""
    profile = tempfile.mkdtemp(prefix="trainbox-chromium-")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(20_000)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any, stack: Any, shots: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh tab on the dashboard, signed out; fails the test on any script error or CSP violation."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if _bad(m) else None)
    page.goto(stack.url + "/")
    page.evaluate("localStorage.clear()")
    page.reload()
    yield page
    page.screenshot(path=str(shots / f"{request.node.name}-end.png"), full_page=True)
    page.close()
    assert not problems, problems


def _bad(message: Any) -> bool:
    # A 401 or 404 the page asked for and handled is logged by chromium as a failed resource; those are
    # the point of some tests. Script errors and CSP refusals are not.
    if message.type != "error":
        return False
    # A server that went away (a test kills it) shows as network errors, which the page reports itself.
    handled = r"Failed to load resource: (the server responded with a status of (401|404|416)|net::ERR_)"
    return not re.search(handled, message.text)


def sign_in(page: Any, token: str) -> None:
    """What a user does: paste the token into the labelled field and press Sign in."""
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()


# WCAG 2 contrast of every visible text on the page against the background it is drawn on.
CONTRAST_JS = """() => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.checkVisibility()) continue;
    const fg = rgb(getComputedStyle(el).color).slice(0, 3);
    const [a, b] = [lum(fg), lum(background(el))].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const what = `${el.tagName}.${el.className} "${el.textContent.trim().slice(0, 30)}"`;
    if (ratio < 4.5) low.push(`${what}: ${ratio.toFixed(2)}`);
  }
  return low;
}"""


def low_contrast(page: Any) -> list[str]:
    """Texts under WCAG AA's 4.5:1 (none should be)."""
    return page.evaluate(CONTRAST_JS)


def kill_api(stack: Any) -> None:
    """The API process dies (SIGKILL to its process group): the page sees a server that went away."""
    child = stack.child("api")
    os.killpg(child.proc.pid, signal.SIGKILL)
    child.proc.wait(10)


def revive_api(stack: Any) -> None:
    """The stack's supervisor restarts it, as `trainbox up` does; returns once it answers /healthz."""

    def healthy() -> bool:
        stack.supervise_once()
        try:
            return httpx.get(stack.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=60, interval=0.5, what="the API restarted")
