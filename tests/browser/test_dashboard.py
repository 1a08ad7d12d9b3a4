"""The dashboard in a real browser against the live stack: what a user sees and does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.browser.conftest import Api, kill_api, low_contrast, revive_api, sign_in, sync_api
from tests.helpers import wait_for
from tests.worker.conftest import tiny_spec

expect = sync_api.expect


def steps_drawn(page: Any) -> int:
    """How many steps the loss chart holds (the charts' container says it as data-steps)."""
    return int(page.locator("#charts").get_attribute("data-steps") or 0)


def open_by_keyboard(page: Any, job: dict[str, Any]) -> None:
    row = page.locator(f'#jobs tr[data-id="{job["id"]}"]')
    row.focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(f"#/jobs/{job['id']}$"))


def test_sign_in_then_a_job_runs_to_success_with_the_chart_growing(
    page: Any, api: Api, stack: Any, shots: Path, request: Any
):
    expect(page.locator("#notice")).to_contain_text("Sign in")
    sign_in(page, stack.token())
    expect(page.locator("#session")).to_contain_text("signed in as admin (admin)")
    # The job waits behind a blocker until the page follows it: 100 steps take a few seconds on a quiet
    # box, less than the page's two list refreshes before it opens the job, so it could be over by then.
    blocker = api.submit(tiny_spec("browser-blocker", steps=100_000))  # takes both slots
    # Should the test stop before it cancels the blocker, the module's later tests must not wait behind it.
    request.addfinalizer(lambda: api.http.post(f"/jobs/{blocker['id']}/cancel"))
    job = api.submit(tiny_spec("browser-ok", steps=100, checkpoint_every=50, validation_split=0.1, eval_every=50))
    row = page.locator(f'#jobs tr[data-id="{job["id"]}"]')
    expect(row).to_be_visible()  # the next refresh lists it
    # Refreshes (the row's times change each time) keep the keyboard focus where it was.
    row.focus()
    for _ in range(2):
        with page.expect_response(lambda r: "/overview" in r.url):
            pass
    expect(row).to_be_focused()
    assert low_contrast(page) == []
    open_by_keyboard(page, job)
    expect(page.locator("#job-title")).to_contain_text("browser-ok")
    state = page.locator("#job-state")
    expect(state).to_have_text("queued")
    expect(page.locator("#job-live")).to_contain_text("following live")
    api.cancel(blocker["id"])
    expect(state).to_have_text("running", timeout=90_000)
    first = wait_for(lambda: steps_drawn(page), timeout=60, what="a first step on the chart")
    wait_for(lambda: steps_drawn(page) > first, timeout=60, what="the chart growing")
    page.screenshot(path=str(shots / "running.png"), full_page=True)
    # The server goes away mid-run: the page says so (never a silent freeze), then resumes by itself.
    kill_api(stack)
    expect(page.locator("#banner")).to_contain_text("server unreachable")
    expect(page.locator("#job-live")).to_contain_text("reconnecting")
    page.screenshot(path=str(shots / "server-unreachable.png"), full_page=True)
    revive_api(stack)
    expect(page.locator("#banner")).to_be_hidden(timeout=10_000)
    # Its stream resumed (Last-Event-ID): following again, or over if the job ended meanwhile.
    expect(page.locator("#job-live")).to_contain_text(re.compile("following live|the job is over"), timeout=10_000)
    expect(state).to_have_text("succeeded", timeout=90_000)
    wait_for(lambda: steps_drawn(page) == 100, timeout=10, what="every step drawn, none lost over the restart")
    assert page.locator("#charts").get_attribute("data-evals") == "2"  # eval loss at steps 50 and 100
    # Dashed markers where checkpoints were written (every 50 steps); no restart in this run.
    expect(page.locator("#charts")).to_have_attribute("data-markers", "2 checkpoints, 0 restarts")
    facts = page.locator("#job-facts")
    expect(facts).to_contain_text("100 / 100 steps")
    expect(facts).to_contain_text("elapsed")
    expect(page.locator("#log")).to_contain_text("step")
    # The final model and the checkpoints are listed, and a download really downloads (bearer header, blob).
    expect(page.locator("#artifacts")).to_contain_text("final model")
    with page.expect_download() as got:
        page.get_by_role("button", name="model/config.json", exact=True).click()
    assert got.value.suggested_filename == "config.json"
    assert Path(got.value.path()).read_text().strip().startswith("{")
    expect(page.locator("#job-flag")).to_be_hidden()
    assert low_contrast(page) == []
    # Back to the list: the row keeps the focus it had.
    page.get_by_role("link", name="all jobs").click()
    expect(page.locator(f'#jobs tr[data-id="{job["id"]}"]')).to_be_focused()


def test_a_waiting_job_is_followed_live_to_the_end_and_cancel_asks_first(page: Any, browser: Any, api: Api, stack: Any):
    sign_in(page, stack.token())
    blocker = api.submit(tiny_spec("browser-blocker", steps=100_000))  # takes both slots
    waiting = api.submit(tiny_spec("browser-waits", steps=10))
    page.goto(f"{stack.url}/#/jobs/{waiting['id']}")
    expect(page.locator("#job-state")).to_have_text("queued")
    expect(page.locator("#job-facts")).to_contain_text("queue position1")
    # More than 10 s with nothing on its stream (the freeze this page used to have): still live.
    expect(page.locator("#job-live")).to_contain_text(re.compile(r"following live"))
    expect(page.locator("#updated")).to_have_text(re.compile(r"last update [0-3] s ago"))
    wait_for(lambda: _quiet_for(page) >= 11, timeout=40, what="11 s without an event")
    expect(page.locator("#job-state")).to_have_text("queued")
    expect(page.locator("#banner")).to_be_hidden()

    # In a second tab: cancel the blocker. The first answer is no; then yes.
    other = browser.new_page()
    other.goto(f"{stack.url}/#/")
    # The slots say who holds them and for how long; the queue gives the waiting job its place.
    expect(other.locator("#gpus")).to_contain_text(
        re.compile(r"browser-blocker \(admin, running, for \d+ s\)"), timeout=60_000
    )
    expect(other.locator("#queue tr", has_text="browser-waits")).to_contain_text("1")
    other.locator("#queue a", has_text="browser-blocker").click()
    expect(other).to_have_url(re.compile(f"#/jobs/{blocker['id']}$"))
    expect(other.locator("#job-state")).to_have_text("running")
    asked: list[str] = []

    def answer(dialog: Any, accept: bool) -> None:
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    other.once("dialog", lambda d: answer(d, False))
    other.get_by_role("button", name="Cancel job").click()
    wait_for(lambda: asked, timeout=5, what="a confirmation")
    assert "browser-blocker" in asked[0] and "running" in asked[0]
    expect(other.locator("#job-state")).to_have_text("running")
    other.once("dialog", lambda d: answer(d, True))
    other.get_by_role("button", name="Cancel job").click()
    expect(other.locator("#job-state")).to_have_text(re.compile("cancelling|cancelled"))
    expect(other.locator("#job-state")).to_have_text("cancelled", timeout=60_000)
    other.close()

    # The first tab, never reloaded, follows the waiting job through to its end.
    expect(page.locator("#job-state")).to_have_text("running", timeout=90_000)
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=90_000)
    wait_for(lambda: steps_drawn(page) == 10, timeout=10, what="every step drawn")


def _quiet_for(page: Any) -> int:
    m = re.search(r"last event (\d+) s ago", page.locator("#job-live").inner_text())
    if m:
        return int(m.group(1))
    return 0


def test_a_failed_job_shows_its_error_and_log_and_a_diverged_one_is_flagged(page: Any, api: Api, stack: Any):
    sign_in(page, stack.token())
    # One slot each, side by side: data that breaks at line 251, and a learning rate that blows the loss up.
    job = api.submit(tiny_spec("browser-bad-data", gpus=1, dataset="bad.jsonl", steps=200))
    adamw = {"type": "AdamW", "params": {"lr": 10.0}}
    blowup = {"train_batch_size": 4, "gradient_accumulation_steps": 1, "optimizer": adamw}
    diverging = api.submit(tiny_spec("browser-diverges", gpus=1, steps=8, deepspeed=blowup))
    row = page.locator(f'#jobs tr[data-id="{job["id"]}"]')
    expect(row).to_contain_text("failed", timeout=120_000)
    row.click()
    expect(page.locator("#job-state")).to_have_text("failed")
    error = page.locator("#job-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(re.compile(r"invalid: .*line 251"))
    expect(page.locator("#log")).not_to_be_empty()
    expect(page.locator("#job-cancel")).to_be_hidden()
    expect(page.locator("#job-flag")).to_be_hidden()

    page.goto(f"{stack.url}/#/jobs/{diverging['id']}")
    expect(page.locator("#job-state")).to_have_text(re.compile("succeeded|failed"), timeout=120_000)
    flag = page.locator("#job-flag")
    expect(flag).to_be_visible()
    expect(flag).to_contain_text(re.compile(r"loss diverged: [\d.]+ at step \d+, [\d,.]+ at step 8|loss not finite"))


def test_a_wrong_or_revoked_token_clears_the_screen(page: Any, stack: Any, api: Api):
    sign_in(page, "not-a-token")
    expect(page.locator("#notice")).to_contain_text("token rejected")
    expect(page.locator("#session")).to_be_hidden()
    # A token revoked while its user watches: the next refresh clears what it showed.
    made = api.http.post("/tokens", json={"name": "browser"}).json()
    sign_in(page, made["token"])
    expect(page.locator("#session")).to_contain_text("signed in as admin")
    expect(page.locator("#jobs tr").first).to_be_visible()
    assert api.http.delete(f"/tokens/{made['id']}").status_code == 204
    expect(page.locator("#notice")).to_contain_text("token rejected", timeout=20_000)
    expect(page.locator("#jobs tr")).to_have_count(0)
    expect(page.locator("#list-view")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('trainbox-token')") is None


def test_phone_width_is_one_column(page: Any, stack: Any, api: Api, shots: Path):
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, stack.token())
    expect(page.locator("#jobs tr.job").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    columns = page.locator("#list-view > .col")
    boxes = [columns.nth(0).bounding_box(), columns.nth(1).bounding_box()]
    assert boxes[0]["x"] == boxes[1]["x"] and boxes[1]["y"] > boxes[0]["y"]  # stacked, not side by side
    page.screenshot(path=str(shots / "phone-list.png"), full_page=True)
    page.locator("#jobs tr.job", has_text="succeeded").first.click()
    expect(page.locator("#job-state")).to_have_text("succeeded")
    wait_for(lambda: steps_drawn(page), timeout=20, what="the charts")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(shots / "phone-job.png"), full_page=True)


def test_a_job_url_that_names_no_job_says_so(page: Any, stack: Any):
    sign_in(page, stack.token())
    page.goto(f"{stack.url}/#/jobs/jnosuchjob")
    expect(page.locator("#job-error")).to_contain_text("no such job")
    page.get_by_role("link", name="all jobs").click()
    expect(page.locator("#list-view")).to_be_visible()
    expect(page.locator("#job-view")).to_be_hidden()
