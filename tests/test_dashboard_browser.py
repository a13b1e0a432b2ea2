"""The dashboard page in a real headless Chromium, driven by selenium.

One browser and one queue for the whole module: a SQLite queue that one worker pool drained
(40 done, 2 failed, one of them with a hostile id) and a second, live pool whose name is markup
and which holds one gated task while three wait (and one waits out a delay). The page is served
by a real dashboard server on its own read-only connection. Tests run in file order; the last
one changes the queue.

Needs Debian's ``chromium`` and ``chromium-driver`` and selenium (requirements-dev.txt). Without
them the tests skip, unless ``TQ_REQUIRE_BROWSER`` is set (CI sets it), which fails them instead.
``TQ_SCREENSHOT=PATH`` saves a screenshot of the page there (docs/dashboard.png in the README).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests.dashboard_support import HOSTILE, Dashboard, drain, make_tasks, serving
from tests.support import WAIT, wait_until

REQUIRE_BROWSER = bool(os.environ.get("TQ_REQUIRE_BROWSER"))
LIVE_WORKER = "<b>worker-b</b>"
TOKEN = "browser-token-0123456789"


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"TQ_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module, with its console log kept."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _unavailable("chromium and chromedriver are not installed (apt-get install chromium "
                     "chromium-driver)")  # fmt: skip
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -r requirements-dev.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--lang=en-US"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Queue:
    """The module's queue: its store, the live pool's gate, and the dashboards serving it."""

    def __init__(self, store: Any, gate: threading.Event, dashboard: Dashboard) -> None:
        self.store = store
        self.gate = gate
        self.dashboard = dashboard

    def status(self) -> dict[str, Any]:
        answer = self.dashboard.get("/api/status")
        assert answer.status == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Queue]:
    db = tmp_path_factory.mktemp("dashboard") / "queue.db"
    store = tq.open_store(str(db), lease_seconds=3.0)
    store.enqueue_many(make_tasks((f"order-{i:02d}" for i in range(40)), sleep_ms=2))
    store.enqueue_many(make_tasks([HOSTILE], fail="<script>alert(2)</script>"))
    store.enqueue_many(make_tasks(["charge-card-17"], fail="card declined"))
    drain(store, "worker-a")
    backfill_history(store, "worker-earlier")
    # A live worker that holds one task at its gate while three wait behind it.
    gate = threading.Event()

    def gated(task: tq.Task) -> dict[str, Any]:
        gate.wait(60)
        return {"id": task.id}

    manager = tq.IdempotencyManager(store=store)
    pool = tq.WorkerPool(gated, workers=1, idempotency=manager, durable=True,
                         worker_name=LIVE_WORKER)  # fmt: skip
    stop = threading.Event()
    serve = threading.Thread(target=pool.serve, args=(stop,), kwargs={"prefetch": 1})
    store.enqueue_many(make_tasks(f"report-{i}" for i in range(4)))
    store.enqueue_many(make_tasks(["nightly-digest"]), delay=3600)
    serve.start()
    try:
        wait_until(lambda: store.queue_status()["tasks"]["running"] == 1, "the gated task")
        with serving(str(db)) as dashboard:
            yield Queue(store, gate, dashboard)
    finally:
        stop.set()
        gate.set()
        serve.join(WAIT)
        pool.shutdown(wait=True, cancel_pending=True)
        store.close()


def backfill_history(store: Any, worker: str) -> None:
    """Write the history a worker that ran through the last hour would have left: a row per
    minute before this one, its counts in a wave, its latencies from a real collector."""
    now = int(time.time() // 60)
    for back in range(1, tq.DASHBOARD_MINUTES):
        metrics = tq.MetricsCollector()
        finished = 30 + int(25 * math.sin(back / 6)) + back % 7
        failed = (back % 11 == 0) + (back % 17 == 0) * 3
        for index in range(finished + failed):
            seconds = 0.02 + 0.002 * (index % 40) + 0.001 * back
            if index < finished:
                metrics.record_success(seconds, seconds)
            else:
                metrics.record_failure("permanent", seconds, seconds)
        latency = tq._history_latency(metrics._history_totals(), tq._NO_TOTALS)
        counts = {"succeeded": finished, "failed": failed, "duplicates": 0, "retries": failed}
        store.record_history(worker, now - back, counts, json.dumps(latency))


def load(browser: Any, url: str, refreshes: int = 1) -> None:
    """Open `url` and wait until the page has drawn itself `refreshes` times from the API."""
    browser.get(url)
    wait_refreshed(browser, refreshes)


def wait_refreshed(browser: Any, at_least: int) -> None:
    def refreshed() -> bool:
        count = browser.execute_script("return document.body.dataset.refreshes || '0'")
        return int(count) >= at_least

    wait_until(refreshed, f"the page to refresh {at_least} times")


def severe_console_entries(browser: Any) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def text_of(browser: Any, element_id: str) -> str:
    return browser.execute_script(f"return document.getElementById('{element_id}').textContent")


def test_page_loads_with_no_console_error(browser: Any, queue: Queue) -> None:
    browser.get_log("browser")  # start from an empty log
    load(browser, queue.dashboard.base + "/")
    assert severe_console_entries(browser) == []
    assert browser.title == "task-queue dashboard"
    assert text_of(browser, "message") == ""
    screenshot = os.environ.get("TQ_SCREENSHOT")
    if screenshot:
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, height + 140)  # the whole page, window chrome included
        load(browser, queue.dashboard.base + "/")
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(screenshot)
        browser.set_window_size(1280, 900)


def shown_and_expected(
    browser: Any, queue: Queue, page: Any, expected: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Return what the page shows (`page(browser)`) and what `/api/status` says it should show
    (`expected(status)`), once they agree, with the status.

    The two are read a moment apart: a minute that ends, or a worker whose last heartbeat ages
    out, between them changes the status. Then the page's next refresh (every 5 s) must agree.
    """
    for _ in range(4):
        refreshes = int(browser.execute_script("return document.body.dataset.refreshes"))
        shown = page(browser)
        status = queue.status()
        if shown == expected(status):
            break
        wait_refreshed(browser, refreshes + 1)
    return shown, expected(status), status


def chart_bars(browser: Any) -> dict[str, list[list[float]]]:
    return browser.execute_script(
        "const bars = {};"
        "for (const id of ['chart-throughput', 'chart-failures']) {"
        "  bars[id] = Array.from(document.querySelectorAll('#' + id + ' rect.bar'))"
        "    .map(bar => [Number(bar.dataset.minute), Number(bar.dataset.count)]);"
        "}"
        "return bars;"
    )


def test_charts_draw_the_last_hour_from_the_history(browser: Any, queue: Queue) -> None:
    load(browser, queue.dashboard.base + "/")

    def expected(status: dict[str, Any]) -> dict[str, list[list[float]]]:
        minutes = status["history"]["minutes"]
        return {
            chart: [[m, c] for m, c in zip(minutes, status["history"][series], strict=True)]
            for chart, series in (("chart-throughput", "finished"), ("chart-failures", "failed"))
        }

    shown, wanted, status = shown_and_expected(browser, queue, chart_bars, expected)
    assert shown == wanted
    assert len(shown["chart-throughput"]) == tq.DASHBOARD_MINUTES
    assert sum(count for _, count in shown["chart-throughput"]) == status["last_hour"]["finished"]
    assert sum(count for _, count in shown["chart-failures"]) == status["last_hour"]["failed"] > 0
    heights = browser.execute_script(
        "return Array.from(document.querySelectorAll('#chart-throughput rect.bar'))"
        ".map(bar => bar.getBBox().height)"
    )
    assert max(heights) > 50  # the tallest bar fills the chart's height


def page_numbers(browser: Any) -> dict[str, Any]:
    return browser.execute_script(
        "const text = id => document.getElementById(id).textContent;"
        "const rows = id => Array.from(document.querySelectorAll('#' + id + ' tr'))"
        "  .map(row => Array.from(row.cells).map(cell => cell.textContent));"
        "const numbers = {};"
        "for (const name of ['queued', 'delayed', 'running', 'failed', 'done', 'stalled']) {"
        "  numbers[name] = text('count-' + name);"
        "}"
        "for (const name of ['hour-finished', 'hour-failed', 'latency-count', 'latency-p50',"
        "                    'latency-p95', 'latency-p99', 'latency-mean']) {"
        "  numbers[name] = text(name);"
        "}"
        "numbers.queues = rows('queue-rows').map(row => row.slice(0, 6));"
        "numbers.workers = rows('worker-rows').map(row => row[0]);"
        "return numbers;"
    )


def numbers_of(status: dict[str, Any]) -> dict[str, Any]:
    numbers = {name: str(value) for name, value in status["counts"].items()}
    numbers["hour-finished"] = str(status["last_hour"]["finished"])
    numbers["hour-failed"] = str(status["last_hour"]["failed"])
    latency = status["latency_ms"]
    numbers["latency-count"] = str(latency["count"])
    for name in ("p50", "p95", "p99", "mean"):
        numbers[f"latency-{name}"] = f"{latency[name]:.1f} ms"
    states = ("queued", "delayed", "running", "failed", "done")
    numbers["queues"] = [
        [name, *(str(queue[state]) for state in states)]
        for name, queue in sorted(status["queues"].items())
    ]
    numbers["workers"] = [worker["name"] for worker in status["workers"]]
    return numbers


def test_numbers_match_api_status(browser: Any, queue: Queue) -> None:
    load(browser, queue.dashboard.base + "/")
    shown, wanted, status = shown_and_expected(browser, queue, page_numbers, numbers_of)
    assert shown == wanted
    assert status["counts"] == {
        "queued": 3, "delayed": 1, "running": 1, "failed": 2, "done": 40, "stalled": 0,
    }  # fmt: skip
    latency = status["latency_ms"]
    assert latency["count"] == status["last_hour"]["finished"] + status["last_hour"]["failed"]
    assert LIVE_WORKER in shown["workers"]


def test_markup_in_data_shows_as_text(browser: Any, queue: Queue) -> None:
    browser.get_log("browser")
    load(browser, queue.dashboard.base + "/")
    # The live worker's name is markup: shown as those characters, and no <b> element made.
    assert browser.execute_script("return document.querySelectorAll('#worker-rows b').length") == 0
    if not hasattr(queue.store, "failed_tasks"):
        pytest.skip("the store lists no failed tasks yet")
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#failed-rows tr')).map("
        "row => [row.dataset.id, row.querySelector('td.id').textContent,"
        " row.querySelector('td.error').textContent])"
    )
    assert [HOSTILE, HOSTILE] in [row[:2] for row in shown]
    assert any(row[2].endswith("<script>alert(2)</script>") for row in shown)
    assert browser.execute_script("return document.getElementsByTagName('img').length") == 0
    assert browser.execute_script("return document.scripts.length") == 1
    assert severe_console_entries(browser) == []


def test_page_stays_readable_at_phone_width(browser: Any, queue: Queue) -> None:
    browser.set_window_size(390, 844)
    try:
        load(browser, queue.dashboard.base + "/")
        widths = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " document.getElementById('chart-throughput').getBoundingClientRect().width]"
        )
        page_width, view_width, chart_width = widths
        assert page_width <= view_width  # no sideways scrolling of the page; tables scroll alone
        assert chart_width >= view_width * 0.7  # the charts take the width there is
    finally:
        browser.set_window_size(1280, 900)


def test_page_with_a_token_sends_it_on_every_call(browser: Any, queue: Queue) -> None:
    with serving(queue.store, token=TOKEN) as guarded:
        browser.get_log("browser")
        load(browser, f"{guarded.base}/?token={TOKEN}")
        assert severe_console_entries(browser) == []
        assert text_of(browser, "count-done") == "40"
        browser.get(f"{guarded.base}/")  # without it: refused, and nothing of the queue shown
        assert "csrf-token" not in browser.page_source
        assert "a valid token is needed" in browser.page_source


def test_retry_button_moves_a_failed_task_back_to_the_queue(browser: Any, queue: Queue) -> None:
    if not hasattr(queue.store, "failed_tasks"):
        pytest.skip("the store cannot retry failed tasks yet")
    load(browser, queue.dashboard.base + "/")
    before = browser.execute_script("return Number(document.body.dataset.refreshes)")
    browser.execute_script(
        "document.querySelector('#failed-rows tr[data-id=\"charge-card-17\"] button.retry').click()"
    )
    wait_refreshed(browser, before + 1)
    failed = {task["id"] for task in queue.store.failed_tasks()}
    assert failed == {HOSTILE}
    assert queue.store.task_states(["charge-card-17"]) == {"charge-card-17": "queued"}
    assert queue.status()["counts"]["queued"] == 4  # three waiting, and this one
    assert text_of(browser, "count-failed") == "1"
    assert "1 task(s) changed" in text_of(browser, "message")
