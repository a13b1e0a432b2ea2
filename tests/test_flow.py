"""Flow control: rate limits, attempt timeouts and server-directed backoff (SPEC section 5).

Rates are judged over counts, never wall times: handlers record `time.monotonic()` as their
first act, and no half-open window of the limit's period may hold more calls than the limit.
Waits are judged as orderings of recorded instants (a retry starts at or after the failure plus
its Retry-After). Worker processes are real `task-queue worker` processes on one SQLite file or
one PostgreSQL schema.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import json
import math
import re
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Launcher
from tests.support import REPO, WAIT, one_line_error, run_cli, tree_bytes, wait_until, write_tasks

FAST_RETRY = tq.RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002)


def busiest_window(times: list[float], period: float) -> int:
    """Return the most calls that any half-open window (t - period, t] of `times` holds."""
    ordered = sorted(times)
    most = 0
    first = 0
    for last, now in enumerate(ordered):
        while ordered[first] <= now - period:
            first += 1
        most = max(most, last - first + 1)
    return most


class Stamps:
    """A handler that records when each call started; an async twin shares the record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards times
        self.times: list[tuple[str, float]] = []

    def __call__(self, task: tq.Task) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            self.times.append((task.id, now))
        return {"id": task.id}

    async def call_async(self, task: tq.Task) -> dict[str, str]:
        return self(task)

    def of(self, prefix: str = "") -> list[float]:
        with self._lock:
            return [at for task_id, at in self.times if task_id.startswith(prefix)]


# --- Rate limits in one process ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["plain", "async"])
def test_a_rate_limit_holds_in_every_window(make_pool: Any, kind: str) -> None:
    stamps = Stamps()
    handler = stamps if kind == "plain" else stamps.call_async
    pool = make_pool(handler, workers=8, rate_limit="20/s", namespace=f"rate-{kind}")
    records = pool.run([tq.Task(f"t-{n:03d}") for n in range(30)])
    assert {record.status for record in records} == {tq.TaskStatus.SUCCEEDED}
    times = stamps.of()
    assert len(times) == 30
    assert busiest_window(times, 1.0) <= 20
    # The limit binds (30 calls need two windows), and it is a window, not one call per 50 ms:
    # a burst of the whole limit may go at once.
    assert busiest_window(times, 0.25) == 20


@pytest.mark.timeout(60)
def test_every_attempt_counts_against_the_limit(make_pool: Any) -> None:
    stamps = Stamps()
    lock = threading.Lock()
    failed: set[str] = set()

    def flaky(task: tq.Task) -> dict[str, str]:
        stamps(task)
        with lock:
            first = task.id not in failed
            failed.add(task.id)
        if first:
            raise tq.TransientError("first attempt fails")
        return {"id": task.id}

    pool = make_pool(flaky, workers=8, rate_limit="10/s", retry=FAST_RETRY)
    # 20 calls need two windows; if a retry took no slot they would all fit in the first.
    records = pool.run([tq.Task(f"t-{n:03d}") for n in range(10)])
    assert [record.attempts for record in records] == [2] * 10
    times = stamps.of()
    assert len(times) == 20
    assert busiest_window(times, 1.0) <= 10


@pytest.mark.timeout(60)
def test_a_group_limit_holds_its_group_only(make_pool: Any) -> None:
    stamps = Stamps()
    pool = make_pool(stamps, workers=4, rate_limits={"slow": "5/s"})
    tasks = []
    for n in range(20):
        tasks.append(tq.Task(f"slow-{n:03d}", group="slow"))
        tasks.append(tq.Task(f"free-{n:03d}"))
    records = pool.run(tasks)
    assert {record.status for record in records} == {tq.TaskStatus.SUCCEEDED}
    slow, free = sorted(stamps.of("slow-")), stamps.of("free-")
    assert len(slow) == 20 and len(free) == 20
    assert busiest_window(slow, 1.0) <= 5
    # The eleventh slow call cannot come before two periods have passed; every ungrouped task,
    # never waiting for the group's slots, has run by then.
    assert max(free) < slow[10]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "sqlite-file"])
def test_a_task_waiting_for_its_slot_holds_no_worker_and_is_cancelled_unrun(
    make_pool: Any, tmp_path: Path, shared: bool
) -> None:
    stamps = Stamps()
    db = str(tmp_path / "keys.db")
    pool = make_pool(stamps, workers=1, rate_limits={"api": "2/h"}, db_path=db if shared else None)
    limited = [pool.submit(tq.Task(f"api-{n}", group="api")) for n in range(3)]
    wait_until(lambda: len(stamps.of("api-")) == 2, "two calls of the group")
    # The third waits an hour for a slot; the pool's only worker runs other work meanwhile.
    other = pool.submit(tq.Task("other"))
    assert other.result(timeout=WAIT).status is tq.TaskStatus.SUCCEEDED
    assert not limited[2].done()
    if not shared:
        assert pool.idempotency.lookup("api-2") is None  # it waits unclaimed
    pool.shutdown(cancel_pending=True)
    statuses = [future.result(timeout=WAIT).status for future in limited]
    assert statuses == [tq.TaskStatus.SUCCEEDED] * 2 + [tq.TaskStatus.CANCELLED]
    assert len(stamps.of("api-")) == 2
    if shared:
        # A shared limit may have let it claim its key first (the store said no only at the
        # call): the claim is released, so a rerun takes the key at once.
        with tq.IdempotencyManager(db) as store:
            row = store.lookup("api-2")
        assert row is None or row["state"] == "failed"


@pytest.mark.timeout(60)
def test_tasks_waiting_for_a_slot_keep_their_room_in_the_queue(make_pool: Any) -> None:
    stamps = Stamps()
    pool = make_pool(stamps, workers=2, queue_size=2, on_full="reject", rate_limits={"api": "1/h"})
    first = pool.submit(tq.Task("api-0", group="api"))
    assert first.result(timeout=WAIT).status is tq.TaskStatus.SUCCEEDED
    waiting = [pool.submit(tq.Task(f"api-{n}", group="api")) for n in (1, 2)]
    wait_until(lambda: pool._queue.qsize() == 0, "the waiting tasks to leave the queue")
    # Both wait for the limit outside the queue, yet a producer still meets a full queue.
    with pytest.raises(tq.QueueFullError):
        pool.submit(tq.Task("free"))
    pool.shutdown(cancel_pending=True)
    assert [f.result(timeout=WAIT).status for f in waiting] == [tq.TaskStatus.CANCELLED] * 2
    assert pool._queue._queue.held == 0


# --- Rate limits shared by worker processes ------------------------------------------------------

TIMING_MODULE = "tq_timing"
TIMING_SOURCE = '''\
"""Records the start of each call: "task_id monotonic" in a file per process (O_APPEND)."""

import os
import time

_fd = None


def record(task):
    global _fd
    now = time.monotonic()
    if _fd is None:
        path = os.path.join(os.environ["HANDLER_LOG_DIR"], f"{os.getpid()}.times")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{task.id} {now!r}\\n".encode())
    return {"id": task.id}
'''


def timed_calls(launcher: Launcher) -> dict[int, list[float]]:
    calls: dict[int, list[float]] = {}
    for path in launcher.logs.glob("*.times"):
        lines = path.read_text(encoding="utf-8").splitlines()
        calls[int(path.stem)] = [float(line.split()[1]) for line in lines]
    return calls


@pytest.mark.timeout(150)
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_three_worker_processes_share_one_limit(
    launcher: Launcher, tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    db = str(tmp_path / "queue.db") if database == "sqlite" else request.getfixturevalue("pg_url")
    (launcher.root / f"{TIMING_MODULE}.py").write_text(TIMING_SOURCE, encoding="utf-8")
    total, limit = 40, 20  # two seconds of calls at the limit
    workers = [
        launcher.worker(db, "--workers", "4", "--rate-limit", f"{limit}/s",
                        handler=f"{TIMING_MODULE}:record")
        for _ in range(3)
    ]  # fmt: skip
    # The tasks arrive once all three serve: each takes a share (8 rows at a time) at once.
    wait_until(
        lambda: all("serving" in worker.stderr() for worker in workers),
        "every worker to serve",
        procs=workers,
    )
    tasks = write_tasks(tmp_path / "tasks.json", [{"id": f"t-{n:03d}"} for n in range(total)])
    enqueued = launcher.run("enqueue", "--db", db, "--task-file", str(tasks))
    assert enqueued.returncode == 0, enqueued.stderr
    wait_until(
        lambda: sum(map(len, timed_calls(launcher).values())) >= total,
        "every task to run",
        timeout=90,
        procs=workers,
    )
    for worker in workers:
        assert worker.terminate() == 143, worker.stderr()
    calls = timed_calls(launcher)
    times = [at for each in calls.values() for at in each]
    assert len(times) == total
    assert len(calls) == 3, "every process took part"
    assert busiest_window(times, 1.0) <= limit


# --- Timeouts ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_async_handler_is_cancelled_at_its_deadline(make_pool: Any) -> None:
    cancelled: list[float] = []
    deadlines: list[float | None] = []
    never = threading.Event()

    async def stuck(task: tq.Task) -> None:
        deadlines.append(tq.current_deadline())
        try:
            while not never.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.append(time.monotonic())
            raise

    pool = make_pool(stuck, workers=4, task_timeout=0.2, retry=FAST_RETRY)
    record = pool.submit(tq.Task("stuck")).result(timeout=WAIT)
    assert record.status is tq.TaskStatus.FAILED
    assert record.error_kind == "timeout"
    assert record.attempts == 3
    assert len(cancelled) == 3
    assert all(d is not None for d in deadlines)
    # Each attempt's cancellation came at or after its own deadline.
    assert all(c >= d for c, d in zip(cancelled, deadlines, strict=True))  # type: ignore[operator]
    assert tq.current_deadline() is None


@pytest.mark.timeout(60)
def test_a_late_plain_attempt_is_a_timeout_and_is_retried(make_pool: Any) -> None:
    seen: list[tuple[float, float | None]] = []

    def slow_once(task: tq.Task) -> dict[str, int]:
        deadline = tq.current_deadline()
        seen.append((time.monotonic(), deadline))
        if len(seen) == 1:
            assert deadline is not None
            while time.monotonic() <= deadline:  # overstay the first attempt's deadline
                time.sleep(0.01)
            return {"attempt": 1}  # too late: discarded
        return {"attempt": len(seen)}

    pool = make_pool(slow_once, workers=2, task_timeout=0.2, retry=FAST_RETRY)
    record = pool.submit(tq.Task("slow")).result(timeout=WAIT)
    assert record.status is tq.TaskStatus.SUCCEEDED
    assert record.output == {"attempt": 2}
    assert record.attempts == 2
    assert pool.metrics.snapshot()["retries"] == 1
    started, deadline = seen[0]
    assert deadline is not None and started < deadline <= started + 0.2 + 1e-6


@pytest.mark.timeout(60)
def test_the_last_attempt_timing_out_fails_as_timeout(make_pool: Any) -> None:
    def overstays(task: tq.Task) -> None:
        deadline = tq.current_deadline()
        assert deadline is not None
        while time.monotonic() <= deadline:
            time.sleep(0.01)

    pool = make_pool(overstays, task_timeout=0.1, retry=tq.RetryPolicy(max_attempts=2))
    # A task's own timeout wins over the pool's.
    quick = tq.Task("own-timeout", timeout=0.05)
    record, own = pool.run([tq.Task("pool-timeout"), quick])
    for each in (record, own):
        assert each.status is tq.TaskStatus.FAILED
        assert each.error_kind == "timeout"
        assert each.attempts == 2
        assert each.error.startswith("TimeoutError: the attempt ran past its deadline")
    assert "0.05 s" in own.error and "0.1 s" in record.error
    assert pool.metrics.snapshot()["failures_by_kind"] == {"timeout": 2}


@pytest.mark.timeout(60)
def test_leases_are_renewed_while_an_attempt_runs_to_its_deadline(make_pool: Any) -> None:
    gate = threading.Event()

    def waits(task: tq.Task) -> dict[str, bool]:
        gate.wait(WAIT)
        return {"ok": True}

    pool = make_pool(waits, lease_seconds=0.3, task_timeout=30)
    future = pool.submit(tq.Task("long"))
    first = wait_until(lambda: pool.idempotency.lookup("long"), "the claim")["lease_expires"]
    wait_until(lambda: pool.idempotency.lookup("long")["lease_expires"] > first + 0.2, "a renewal")
    gate.set()
    assert future.result(timeout=WAIT).status is tq.TaskStatus.SUCCEEDED


# --- Server-directed backoff ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["plain", "async"])
def test_retry_after_is_honoured_beyond_max_delay(make_pool: Any, kind: str) -> None:
    events: list[tuple[str, float]] = []

    def step(task: tq.Task) -> dict[str, int]:
        events.append(("start", time.monotonic()))
        if len(events) == 1:
            events.append(("failed", time.monotonic()))
            raise tq.TransientError("HTTP 429", retry_after=0.4)
        return {"ok": 1}

    async def step_async(task: tq.Task) -> dict[str, int]:
        return step(task)

    retry = tq.RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.001)
    pool = make_pool(step if kind == "plain" else step_async, retry=retry)
    record = pool.submit(tq.Task("busy")).result(timeout=WAIT)
    assert record.status is tq.TaskStatus.SUCCEEDED and record.attempts == 2
    (_, _), (_, failed), (_, second) = events
    assert second >= failed + 0.4


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, True, "5", [1]])
def test_retry_after_must_be_a_finite_number_of_seconds(bad: Any) -> None:
    with pytest.raises(ValueError, match="retry_after must be None or a finite number"):
        tq.TransientError("x", retry_after=bad)


def test_retry_after_is_capped_at_an_hour() -> None:
    assert tq.TransientError("x", retry_after=7200).retry_after == tq.MAX_RETRY_AFTER == 3600
    assert tq.TransientError("x", retry_after=0).retry_after == 0
    assert tq.TransientError("x").retry_after is None
    assert str(tq.TransientError("HTTP 503", retry_after=2)) == "HTTP 503"


# --- Validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_limit": "100/d"}, "rate_limit must be calls per period"),
        ({"rate_limit": "0/s"}, "rate_limit must be calls per period"),
        ({"rate_limit": "10001/s"}, "1 to 10,000 calls"),
        ({"rate_limit": 100}, "rate_limit must be calls per period"),
        ({"rate_limits": {"": "1/s"}}, "rate_limits: a group name must be a non-empty string"),
        ({"rate_limits": {"api": "fast"}}, r"rate_limits\['api'\] must be calls per period"),
        ({"rate_limits": ["api"]}, "rate_limits must be a mapping"),
        ({"task_timeout": 0}, "task_timeout must be None or a number of seconds > 0"),
        ({"task_timeout": math.nan}, "task_timeout must be None or a number of seconds > 0"),
        ({"task_timeout": True}, "task_timeout must be None or a number of seconds > 0"),
    ],
)
def test_bad_pool_arguments_are_refused_with_one_clear_line(kwargs: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        tq.WorkerPool(lambda task: None, **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"group": ""}, "group"), ({"group": "a\x00b"}, "group"), ({"group": 5}, "group"),
     ({"timeout": 0}, "timeout"), ({"timeout": -1.0}, "timeout"), ({"timeout": "3"}, "timeout"),
     ({"timeout": math.inf}, "timeout")],
)  # fmt: skip
def test_bad_task_fields_are_refused_naming_the_field(kwargs: Any, field: str) -> None:
    with pytest.raises(tq.TaskFileError) as caught:
        tq.Task("t", **kwargs)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("value", "reason"),
    [({"group": 7}, "field 'group' must be a non-empty string"),
     ({"group": ""}, "field 'group' must be a non-empty string"),
     ({"timeout_seconds": 0}, "field 'timeout_seconds' must be a number of seconds > 0"),
     ({"timeout_seconds": "1"}, "field 'timeout_seconds' must be a number of seconds > 0"),
     ({"timeout_seconds": True}, "field 'timeout_seconds' must be a number of seconds > 0")],
)  # fmt: skip
def test_bad_task_file_fields_exit_2_naming_task_and_field(
    tmp_path: Path, value: dict[str, Any], reason: str
) -> None:
    path = write_tasks(tmp_path / "tasks.json", [{"id": "a"}, {"id": "b", **value}])
    before = tree_bytes(tmp_path)
    proc = run_cli(["--task-file", str(path), "--db", str(tmp_path / "p.db")], tmp_path)
    line = one_line_error(proc)
    assert "task 1" in line and reason in line
    assert tree_bytes(tmp_path) == before


def test_task_file_groups_and_timeouts_are_read() -> None:
    task = tq.Task.from_dict({"id": "a", "group": "github", "timeout_seconds": 2})
    assert (task.group, task.timeout) == ("github", 2.0)
    assert tq.Task.from_dict({"id": "b", "group": None}).group is None


@pytest.mark.parametrize(
    ("args", "env", "named", "reason"),
    [
        (["--rate-limit", "5/d"], {}, "--rate-limit", "calls per period such as '100/s'"),
        (["--rate-limit", "api=5/s", "--rate-limit", "api=1/s"], {}, "--rate-limit",
         "two limits for group 'api'"),
        (["--rate-limit", "5/s", "--rate-limit", "6/s"], {}, "--rate-limit",
         "two limits for every call"),
        (["--rate-limit", "=5/s"], {}, "--rate-limit", "must be a non-empty string"),
        (["--task-timeout", "0"], {}, "--task-timeout", "expected a number > 0"),
        (["--task-timeout", "soon"], {}, "--task-timeout", "expected a number > 0"),
        ([], {"TQ_RATE_LIMIT": "lots"}, "TQ_RATE_LIMIT", "calls per period such as '100/s'"),
        ([], {"TQ_TASK_TIMEOUT": "-3"}, "TQ_TASK_TIMEOUT", "expected a number > 0"),
    ],
)  # fmt: skip
def test_bad_flags_and_variables_exit_2_and_touch_nothing(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str, reason: str
) -> None:
    tasks = write_tasks(tmp_path / "tasks.json", [{"id": "a"}])
    before = tree_bytes(tmp_path)
    for command in (["--task-file", str(tasks)], ["worker"]):
        proc = run_cli([*command, "--db", str(tmp_path / "p.db"), *args], tmp_path, env)
        line = one_line_error(proc)
        assert named in line and reason in line
    assert tree_bytes(tmp_path) == before


def test_help_lists_the_flow_flags() -> None:
    for command in ([], ["worker"]):
        proc = run_cli([*command, "--help"], REPO)
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        assert "--rate-limit RATE_LIMIT" in text and "TQ_RATE_LIMIT" in text
        assert "--task-timeout TASK_TIMEOUT" in text and "TQ_TASK_TIMEOUT" in text


def test_rate_limit_settings_read_groups_from_flags_and_variables() -> None:
    config = tq.load_config({"rate_limit": ["100/s", "github=5/s"]}, {}, None)
    assert config["rate_limit"] == ("100/s", {"github": "5/s"})
    config = tq.load_config({}, {"TQ_RATE_LIMIT": " github = 5/m , 3/h ", "TQ_TASK_TIMEOUT": "2"})
    assert config["rate_limit"] == ("3/h", {"github": "5/m"})
    assert config["task_timeout"] == 2.0


@pytest.mark.timeout(60)
def test_the_command_line_runs_a_rate_limited_file(tmp_path: Path) -> None:
    tasks = [{"id": f"t-{n}", "payload": {"latency_ms": 0}, "group": "api"} for n in range(6)]
    path = write_tasks(tmp_path / "tasks.json", tasks)
    proc = run_cli(
        ["--task-file", str(path), "--db", str(tmp_path / "p.db"), "--rate-limit", "api=3/s",
         "--task-timeout", "5", "--json"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["succeeded"] == 6


# --- The durable queue keeps groups and timeouts -------------------------------------------------


def test_an_old_sqlite_file_gains_the_new_columns_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = tq.SqliteStore(path)
    store.enqueue_many([tq.Task("before")])
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE idempotency_tasks DROP COLUMN task_group")
    conn.execute("ALTER TABLE idempotency_tasks DROP COLUMN timeout_seconds")
    conn.execute("DROP TABLE idempotency_limits")
    conn.commit()
    conn.close()
    status = tq.open_store(str(path), create=False)  # a reader changes nothing
    assert status.queue_status()["tasks"]["queued"] == 1
    status.close()
    store = tq.SqliteStore(path)
    try:
        store.enqueue_many([tq.Task("after", group="api", timeout=1.5)])
        taken = {q.task.id: q.task for q in store.take_many("w", 10)}
        assert taken["before"].group is None and taken["before"].timeout is None
        assert (taken["after"].group, taken["after"].timeout) == ("api", 1.5)
        assert store.take_slots("x", 2, 1.0, 1, 0.01)[0] == 1
    finally:
        store.close()


def test_an_old_postgres_schema_gains_the_new_columns(pg_url: str) -> None:
    store = tq.open_store(pg_url)
    store.enqueue_many([tq.Task("before")])
    store.close()
    schema = store_fixtures.schema_of(pg_url)
    store_fixtures.pg_execute(
        f"ALTER TABLE {schema}.tasks DROP COLUMN task_group, DROP COLUMN timeout_seconds"
    )
    store_fixtures.pg_execute(f"DROP TABLE {schema}.limits")
    store = tq.open_store(pg_url)
    try:
        store.enqueue_many([tq.Task("after", group="api", timeout=1.5)])
        taken = {q.task.id: q.task for q in store.take_many("w", 10)}
        assert taken["before"].group is None
        assert (taken["after"].group, taken["after"].timeout) == ("api", 1.5)
        assert store.take_slots("x", 2, 1.0, 1, 0.01)[0] == 1
    finally:
        store.close()


# --- The README's HTTP client, against a real server ---------------------------------------------


def readme_client_source() -> str:
    """Return the code block of README's "A rate-limited HTTP client" section, verbatim."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### A rate-limited HTTP client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README has no client example"
    return match.group(1)


class FlakyServer(http.server.ThreadingHTTPServer):
    """/flaky/N answers 429 with Retry-After: 1, then 503, then 200; /slow/N stalls its first
    answer for 3 s, then answers at once; /gone/N is 404. Every request's arrival is recorded."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.lock = threading.Lock()  # guards arrivals
        self.arrivals: dict[str, list[float]] = {}
        self.released = threading.Event()


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyServer

    def do_GET(self) -> None:
        with self.server.lock:
            seen = self.server.arrivals.setdefault(self.path, [])
            seen.append(time.monotonic())
            count = len(seen)
        route = self.path.split("/")[1]
        if route == "flaky" and count == 1:
            self.answer(429, {"Retry-After": "1"})
        elif route == "flaky" and count == 2:
            self.answer(503)
        elif route == "slow" and count == 1:
            self.server.released.wait(3)  # the client's deadline comes first
            self.answer(200)
        elif route == "gone":
            self.answer(404)
        else:
            self.answer(200)

    def answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        body = b"hello"
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (its deadline)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.timeout(90)
def test_the_readme_http_client_finishes_every_task(tmp_path: Path) -> None:
    source = tmp_path / "readme_client.py"
    source.write_text(readme_client_source(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("readme_client", source)
    assert spec is not None and spec.loader is not None
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    assert client.retry_after("7") == 7.0
    assert client.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date long past
    assert client.retry_after("soon") is None and client.retry_after(None) is None

    server = FlakyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    tasks = [tq.Task(f"flaky-{n}", {"url": f"{base}/flaky/{n}"}) for n in range(4)]
    tasks += [tq.Task(f"slow-{n}", {"url": f"{base}/slow/{n}"}) for n in range(2)]
    tasks.append(tq.Task("gone", {"url": f"{base}/gone/0"}))
    try:
        with tq.WorkerPool(client.fetch, workers=8, retry=client.RETRY, rate_limit="50/s",
                           task_timeout=0.5) as pool:  # fmt: skip
            records = {record.task_id: record for record in pool.run(tasks)}
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()
    for task in tasks[:-1]:
        record = records[task.id]
        assert record.status is tq.TaskStatus.SUCCEEDED, record
        assert record.output == {"status": 200, "bytes": 5}
    assert Counter(r.attempts for r in records.values() if r.task_id.startswith("flaky")) == {3: 4}
    assert {records[f"slow-{n}"].attempts for n in range(2)} == {2}
    gone = records["gone"]
    assert (gone.status, gone.error_kind, gone.attempts) == (tq.TaskStatus.FAILED, "permanent", 1)
    for n in range(4):
        first, second, _ = server.arrivals[f"/flaky/{n}"]
        assert second >= first + 1.0  # the server's Retry-After: 1 was honoured
