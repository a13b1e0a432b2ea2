"""Async handlers: WorkerPool with a coroutine function, AsyncWorkerPool, and the command line.

The guarantees of a plain pool hold unchanged for an async handler: one call per key, retries that
hold no slot, backpressure, leases renewed while a call runs, shutdown, crash safety. Calls run on
the pool's own event loop; within a handler, tests coordinate with asyncio primitives created on
that loop, or poll a threading.Event set by the test thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests.support import (
    REPO,
    SCRIPT,
    WAIT,
    child_env,
    run_json,
    state_counts,
    wait_until,
    write_tasks,
)

FAST_RETRY = tq.RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002)


async def wait_for_event(event: threading.Event, timeout: float = WAIT) -> None:
    """Wait, without blocking the loop, until a test thread sets `event`."""
    deadline = time.monotonic() + timeout
    while not event.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError("test gate never opened")
        await asyncio.sleep(0.002)


class Recorder:
    """An async handler that counts its calls per key and the calls in flight at once."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.most_in_flight = 0
        self.threads: set[str] = set()
        self.started = threading.Event()

    async def __call__(self, task: tq.Task) -> dict[str, Any]:
        # Runs on the pool's loop thread only, so the counters need no lock.
        self.calls[task.key] += 1
        self.threads.add(threading.current_thread().name)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        try:
            if self.gate is not None:
                await wait_for_event(self.gate)
            else:
                await asyncio.sleep(0.001)
        finally:
            self.in_flight -= 1
        return {"id": task.id}


async def sleeping(task: tq.Task) -> str:
    await asyncio.sleep(task.payload.get("seconds", 0.001))
    return task.id


class AsyncCallable:
    async def __call__(self, task: tq.Task) -> str:
        return task.id


def test_async_handlers_are_recognised() -> None:
    """Coroutine functions, async callables and partials of them run as async handlers."""
    assert tq._is_async_handler(sleeping)
    assert tq._is_async_handler(AsyncCallable())
    assert tq._is_async_handler(functools.partial(sleeping))
    assert not tq._is_async_handler(lambda task: None)
    assert not tq._is_async_handler(tq.TaskProcessor())


@pytest.mark.timeout(30)
def test_thousands_of_calls_run_at_once_on_one_loop(tmp_db: str) -> None:
    """With workers=500, 500 calls are in flight together, all on the pool's one loop thread."""
    count = 500
    arrived: list[asyncio.Event] = []
    threads: set[str] = set()
    seen = 0

    async def handler(task: tq.Task) -> str:
        nonlocal seen
        threads.add(threading.current_thread().name)
        if not arrived:
            arrived.append(asyncio.Event())
        seen += 1
        if seen == count:
            arrived[0].set()
        # Every call waits for the last one to arrive: this finishes only if all run at once.
        await asyncio.wait_for(arrived[0].wait(), WAIT)
        return task.id

    with tq.WorkerPool(handler, workers=count, queue_size=count, db_path=tmp_db) as pool:
        records = pool.run([tq.Task(f"t{i}") for i in range(count)])
    assert {r.status for r in records} == {tq.TaskStatus.SUCCEEDED}
    assert [r.output for r in records] == [f"t{i}" for i in range(count)]
    assert threads == {"task-queue-event-loop"}
    snapshot = pool.metrics.snapshot()
    assert (snapshot["succeeded"], snapshot["workers"], snapshot["in_flight"]) == (count, count, 0)


@pytest.mark.timeout(30)
def test_workers_bounds_the_calls_in_flight() -> None:
    """No more than `workers` calls ever run at once, however many tasks wait."""
    handler = Recorder()
    with tq.WorkerPool(handler, workers=7, queue_size=500) as pool:
        records = pool.run([tq.Task(f"t{i}") for i in range(300)])
    assert len(records) == 300
    assert handler.most_in_flight <= 7
    assert sum(handler.calls.values()) == 300


@pytest.mark.timeout(30)
def test_one_call_per_key_in_flight_and_completed(tmp_db: str) -> None:
    """A key submitted many times runs once; the others are duplicates with its output."""
    gate = threading.Event()
    handler = Recorder(gate)
    with tq.WorkerPool(handler, workers=50, db_path=tmp_db) as pool:
        futures = [pool.submit(tq.Task(f"s{i}", idempotency_key="same")) for i in range(20)]
        assert handler.started.wait(WAIT)
        gate.set()
        records = [f.result(WAIT) for f in futures]
        later = pool.submit(tq.Task("again", idempotency_key="same")).result(WAIT)
    statuses = Counter(r.status for r in records)
    assert statuses == {tq.TaskStatus.SUCCEEDED: 1, tq.TaskStatus.DUPLICATE: 19}
    assert later.status is tq.TaskStatus.DUPLICATE and later.attempts == 0
    assert handler.calls == {"same": 1}
    with tq.IdempotencyManager(tmp_db) as manager:
        assert manager.get_cached_output("same") == records[0].output


@pytest.mark.timeout(30)
def test_transient_errors_are_retried_and_permanent_ones_fail_at_once() -> None:
    """Retries follow the policy; a permanent error and a bad output fail with one call."""
    attempts: Counter[str] = Counter()

    async def handler(task: tq.Task) -> Any:
        attempts[task.id] += 1
        await asyncio.sleep(0)
        if task.id == "flaky" and attempts[task.id] < 3:
            raise tq.TransientError("not yet")
        if task.id == "broken":
            raise tq.PermanentError("never")
        if task.id == "timeout":
            raise TimeoutError("slow service")
        if task.id == "not-json":
            return {1, 2}
        return "ok"

    with tq.WorkerPool(handler, workers=10, retry=FAST_RETRY) as pool:
        records = {r.task_id: r for r in pool.run(
            [tq.Task(i) for i in ("flaky", "broken", "timeout", "not-json", "fine")]
        )}  # fmt: skip
    assert (records["flaky"].status, records["flaky"].attempts) == ("succeeded", 3)
    assert (records["broken"].status, records["broken"].attempts) == ("failed", 1)
    assert records["broken"].error_kind == "permanent"
    assert (records["timeout"].attempts, records["timeout"].error_kind) == (3, "transient")
    assert records["not-json"].error_kind == "permanent"
    assert "JSON" in (records["not-json"].error or "")
    assert records["fine"].status == "succeeded"
    assert pool.metrics.snapshot()["retries"] == 4


@pytest.mark.timeout(30)
def test_full_queue_rejects_and_shutdown_cancels_queued_work() -> None:
    """Backpressure and cancel_pending hold: queued tasks are cancelled, running ones finish."""
    gate = threading.Event()
    handler = Recorder(gate)
    pool = tq.WorkerPool(handler, workers=2, queue_size=3, on_full="reject")
    try:
        running = [pool.submit(tq.Task(f"r{i}")) for i in range(2)]
        # The two calls start on the loop.
        wait_until(lambda: handler.in_flight >= 2, "both calls to start", interval=0.001)
        assert handler.in_flight == 2
        # The dispatchers may hold one claimed batch each waiting for a slot; then the queue.
        queued = []
        with pytest.raises(tq.QueueFullError):
            for i in range(50):
                queued.append(pool.submit(tq.Task(f"q{i}")))
        pool.shutdown(wait=False, cancel_pending=True)
        gate.set()
        wait_until(lambda: all(f.done() for f in running + queued), "every future")
    finally:
        gate.set()
        pool.shutdown()
    assert {f.result().status for f in running} == {tq.TaskStatus.SUCCEEDED}
    statuses = Counter(f.result().status for f in queued)
    assert statuses[tq.TaskStatus.CANCELLED] >= 1
    assert sum(handler.calls.values()) == 2 + statuses[tq.TaskStatus.SUCCEEDED]
    assert pool.metrics.snapshot()["rejected"] == 1


@pytest.mark.timeout(30)
def test_lease_is_renewed_while_a_call_runs(tmp_db: str) -> None:
    """A call that outlives several leases keeps its claim: another owner cannot take the key."""
    gate = threading.Event()
    handler = Recorder(gate)
    # The pool renews every third of the lease: a lease of 1.5 s leaves a loaded machine a
    # second to run the renewal (0.3 s left it 0.2 s, which a busy machine could overrun).
    other = tq.IdempotencyManager(tmp_db, lease_seconds=1.5)
    with tq.WorkerPool(handler, workers=4, db_path=tmp_db, lease_seconds=1.5) as pool:
        future = pool.submit(tq.Task("long"))
        assert handler.started.wait(WAIT)
        checks = []
        end = other.lookup("long")["lease_expires"] + 0.5  # past the first lease
        while time.time() < end:  # each check against the live claim
            time.sleep(0.1)
            checks.append(other.claim("long", namespace=pool.namespace).state)
        gate.set()
        record = future.result(WAIT)
    other.close()
    assert set(checks) == {"in_progress"}
    assert record.status is tq.TaskStatus.SUCCEEDED and record.attempts == 1


class StoreThreads(tq.IdempotencyManager):
    """The real store, noting which threads call it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads: set[str] = set()

    def claim_many(self, *args: Any, **kwargs: Any) -> list[tq.Claim]:
        self.threads.add(threading.current_thread().name)
        return super().claim_many(*args, **kwargs)

    def complete_many(self, *args: Any, **kwargs: Any) -> list[bool]:
        self.threads.add(threading.current_thread().name)
        return super().complete_many(*args, **kwargs)


@pytest.mark.timeout(30)
def test_the_event_loop_never_waits_on_the_store(tmp_db: str) -> None:
    """Claims and completions run on dispatcher and completer threads, never on the loop."""
    store = StoreThreads(tmp_db)
    with tq.WorkerPool(sleeping, workers=100, idempotency=store) as pool:
        records = pool.run([tq.Task(f"t{i}") for i in range(300)])
    store.close()
    assert {r.status for r in records} == {tq.TaskStatus.SUCCEEDED}
    assert store.threads
    assert "task-queue-event-loop" not in store.threads


@pytest.mark.timeout(30)
def test_shutdown_from_inside_an_async_handler_does_not_wait_for_itself() -> None:
    """A handler that shuts its own pool down finishes; the pool then refuses new work."""
    holder: list[tq.WorkerPool] = []

    async def handler(task: tq.Task) -> str:
        holder[0].shutdown()
        return task.id

    pool = tq.WorkerPool(handler, workers=4)
    holder.append(pool)
    record = pool.submit(tq.Task("self")).result(WAIT)
    assert record.status is tq.TaskStatus.SUCCEEDED
    with pytest.raises(tq.PoolClosedError):
        pool.submit(tq.Task("late"))


# --- AsyncWorkerPool -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_async_pool_submit_run_and_iter_results(tmp_db: str) -> None:
    """submit returns the record; run keeps input order; iter_results takes async iterables."""

    async def produce(count: int) -> Any:
        for i in range(count):
            yield tq.Task(f"a{i}", {"seconds": 0.001 * (i % 3)})

    async def main() -> tuple[Any, ...]:
        async with tq.AsyncWorkerPool(sleeping, workers=50, queue_size=10, db_path=tmp_db) as pool:
            one = await pool.submit(tq.Task("one"))
            ordered = await pool.run([tq.Task(f"r{i}") for i in range(100)])
            streamed = [record async for record in pool.iter_results(produce(200))]
            again = await pool.submit(tq.Task("one"))
        return one, ordered, streamed, again, pool

    one, ordered, streamed, again, pool = asyncio.run(main())
    assert (one.status, one.output) == (tq.TaskStatus.SUCCEEDED, "one")
    assert [r.task_id for r in ordered] == [f"r{i}" for i in range(100)]
    assert sorted(r.task_id for r in streamed) == sorted(f"a{i}" for i in range(200))
    assert again.status is tq.TaskStatus.DUPLICATE
    assert pool.closed


@pytest.mark.timeout(30)
def test_async_pool_waits_for_room_without_blocking_the_loop() -> None:
    """A full queue makes submit wait while the caller's loop keeps running other work."""
    gate = threading.Event()
    handler = Recorder(gate)

    async def main() -> tuple[int, list[tq.TaskRecord]]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while not gate.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async with tq.AsyncWorkerPool(handler, workers=1, queue_size=1) as pool:
            tick_task = asyncio.create_task(ticker())
            submits = [asyncio.create_task(pool.submit(tq.Task(f"t{i}"))) for i in range(6)]
            await asyncio.sleep(0.05)
            before = ticks
            await asyncio.sleep(0.05)
            assert ticks > before, "the caller's loop was blocked"
            gate.set()
            records = await asyncio.gather(*submits)
            await tick_task
        return ticks, records

    ticks, records = asyncio.run(main())
    assert ticks > 0
    assert {r.status for r in records} == {tq.TaskStatus.SUCCEEDED}


@pytest.mark.timeout(30)
def test_async_pool_rejects_at_once_when_asked() -> None:
    """on_full="reject" raises QueueFullError from submit at once, while the queue is full."""
    gate = threading.Event()
    handler = Recorder(gate)

    async def main() -> tuple[int, list[Any]]:
        async with tq.AsyncWorkerPool(handler, workers=1, queue_size=1, on_full="reject") as pool:
            pending = []
            rejected = 0
            for i in range(20):
                call = asyncio.create_task(pool.submit(tq.Task(f"t{i}")))
                await asyncio.sleep(0)  # let it enter the pool
                if call.done() and isinstance(call.exception(), tq.QueueFullError):
                    rejected += 1
                else:
                    pending.append(call)
            gate.set()  # the accepted ones may now finish
            results = await asyncio.gather(*pending, return_exceptions=True)
        return rejected, results

    try:
        rejected, results = asyncio.run(main())
    finally:
        gate.set()
    assert rejected >= 1
    assert all(isinstance(r, tq.TaskRecord) for r in results), results
    assert len(results) + rejected == 20


@pytest.mark.timeout(30)
def test_async_pool_runs_plain_handlers_off_the_callers_loop() -> None:
    """A plain handler runs on worker threads, never on the caller's event loop thread."""
    threads: set[int] = set()

    def handler(task: tq.Task) -> str:
        threads.add(threading.get_ident())
        return task.id

    async def main() -> tuple[int, list[tq.TaskRecord]]:
        async with tq.AsyncWorkerPool(handler, workers=4) as pool:
            records = await pool.run([tq.Task(f"t{i}") for i in range(50)])
        return threading.get_ident(), records

    caller, records = asyncio.run(main())
    assert {r.status for r in records} == {tq.TaskStatus.SUCCEEDED}
    assert threads and caller not in threads


@pytest.mark.timeout(30)
def test_leaving_async_iteration_early_cancels_its_queued_tasks() -> None:
    """Breaking out of `async for` cancels the submissions of that loop still queued."""
    gate = threading.Event()
    calls: Counter[str] = Counter()

    async def handler(task: tq.Task) -> str:
        calls[task.id] += 1
        if task.id != "t00":
            await wait_for_event(gate)
        return task.id

    async def main() -> tq.AsyncWorkerPool:
        pool = tq.AsyncWorkerPool(handler, workers=1, queue_size=20)
        stream = pool.iter_results(tq.Task(f"t{i:02d}") for i in range(20))
        async for record in stream:
            assert record.task_id == "t00"
            break
        await stream.aclose()
        gate.set()
        await pool.shutdown()
        return pool

    try:
        pool = asyncio.run(main())
    finally:
        gate.set()
    snapshot = pool.metrics.snapshot()
    # t00 finished; one more may have been started by then; every other one was cancelled.
    assert snapshot["cancelled"] >= 17
    assert snapshot["succeeded"] + snapshot["cancelled"] == 20
    assert sum(calls.values()) == snapshot["succeeded"]


def test_records_of_a_loop_that_has_ended_are_dropped_and_their_work_still_finishes(
    tmp_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Tasks still running when the consumer's loop ends finish and are recorded; their records,
    which nobody can read any more, are dropped without an error in the pool's threads."""
    release = threading.Event()
    started = threading.Barrier(4, timeout=WAIT)  # "first" returns once all four calls run

    def handler(task: tq.Task) -> str:
        started.wait()
        if task.id != "first":
            assert release.wait(WAIT)
        return task.id

    tasks = [tq.Task("first")] + [tq.Task(f"late-{i}") for i in range(3)]
    box: dict[str, tq.AsyncWorkerPool] = {}

    async def main() -> None:
        pool = box["pool"] = tq.AsyncWorkerPool(handler, workers=4, db_path=tmp_db)
        async for record in pool.iter_results(tasks):
            assert record.task_id == "first"
            break  # the generator is closed as the loop shuts down; three calls still run

    try:
        asyncio.run(main())  # its loop is closed when this returns
    finally:
        release.set()
    pool = box["pool"]._pool
    pool.shutdown(wait=True)
    assert pool.metrics.snapshot()["succeeded"] == 4
    with tq.IdempotencyManager(tmp_db) as manager:
        assert all(manager.is_processed(task.key) for task in tasks)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- Command line --------------------------------------------------------------------------------

ASYNC_HANDLER_MODULE = """
import asyncio, os

async def fetch(task):
    with open(os.environ["CALLS_FILE"], "a") as calls:
        calls.write(task.id + "\\n")
    await asyncio.sleep(task.payload.get("seconds", 0.001))
    return {"fetched": task.id}
"""


def _handler_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "async_handlers.py").write_text(ASYNC_HANDLER_MODULE, encoding="utf-8")
    return {"PYTHONPATH": str(tmp_path), "CALLS_FILE": str(tmp_path / "calls.log")}


@pytest.mark.timeout(60)
def test_cli_runs_an_async_handler_and_a_rerun_skips_its_keys(tmp_path: Path) -> None:
    """--handler takes an async function; a rerun finds every key completed."""
    env = _handler_env(tmp_path)
    write_tasks(tmp_path / "tasks.json", [{"id": f"t{i}"} for i in range(300)])
    args = ["--task-file", "tasks.json", "--db", "p.db", "--handler", "async_handlers:fetch"]
    proc, snapshot = run_json([*args, "--workers", "200"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert snapshot["succeeded"] == 300
    rerun, again = run_json(args, tmp_path, env)
    assert rerun.returncode == 0, rerun.stderr
    assert (again["succeeded"], again["duplicates"]) == (0, 300)
    calls = (tmp_path / "calls.log").read_text().split()
    assert sorted(calls) == sorted(f"t{i}" for i in range(300))


@pytest.mark.timeout(60)
def test_cli_interrupted_with_an_async_handler_resumes(tmp_path: Path) -> None:
    """SIGINT during async calls exits 130; a rerun completes the rest, each key once."""
    env = _handler_env(tmp_path)
    tasks = [{"id": f"t{i:03d}", "payload": {"seconds": 0.2}} for i in range(60)]
    write_tasks(tmp_path / "tasks.json", tasks)
    args = ["--task-file", "tasks.json", "--db", "p.db", "--handler", "async_handlers:fetch"]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--workers", "5", "--json"],
        cwd=tmp_path,
        env=child_env({**env, "PYTHONPATH": f"{tmp_path}:{REPO}"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    calls = tmp_path / "calls.log"
    try:
        wait_until(lambda: calls.exists() and len(calls.read_text().split()) >= 5, "5 calls")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    first = json.loads(out)
    assert first["cancelled"] >= 1
    done = state_counts(tmp_path / "p.db").get("completed", 0)
    assert done == first["succeeded"]
    rerun, snapshot = run_json(args, tmp_path, env)
    assert rerun.returncode == 0, rerun.stderr
    assert (snapshot["succeeded"], snapshot["duplicates"]) == (60 - done, done)
    assert Counter(calls.read_text().split()).most_common(1)[0][1] == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_an_inner_task_raising_system_exit_fails_its_call_and_the_loop_goes_on(
    exc_type: type[BaseException],
) -> None:
    """asyncio lets SystemExit out of a task the handler made; the pool's loop survives it."""

    async def inner(task: tq.Task) -> str:
        await asyncio.sleep(0)
        if task.id == "t5":
            raise exc_type("from an inner task")
        return task.id

    async def handler(task: tq.Task) -> str:
        return await asyncio.wait_for(inner(task), WAIT)

    pool = tq.WorkerPool(handler, workers=4)
    try:
        futures = [pool.submit(tq.Task(f"t{i}")) for i in range(11)]
        records = {f.result(WAIT).task_id: f.result(WAIT) for f in futures}
        after = pool.submit(tq.Task("after")).result(WAIT)
    finally:
        pool.shutdown()
    assert records["t5"].status is tq.TaskStatus.FAILED
    assert {r.status for k, r in records.items() if k != "t5"} == {tq.TaskStatus.SUCCEEDED}
    assert after.status is tq.TaskStatus.SUCCEEDED


@pytest.mark.timeout(30)
def test_an_async_handler_starts_the_waiting_tasks_highest_priority_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Among the tasks waiting in the queue, a higher priority starts first, then submission
    order; one dispatcher, so that only the one task it holds waits outside the queue."""
    monkeypatch.setattr(tq, "ASYNC_DISPATCHERS", 1)
    gate = threading.Event()
    order: list[str] = []

    async def handler(task: tq.Task) -> None:
        order.append(task.id)  # the loop thread only
        if task.id == "blocker":
            await wait_for_event(gate)

    pool = tq.WorkerPool(handler, workers=1)
    try:
        pool.submit(tq.Task("blocker"))
        wait_until(lambda: order == ["blocker"], "the blocker to start")
        pool.submit(tq.Task("held"))  # the dispatcher takes it and waits for the slot
        wait_until(lambda: pool._queue.qsize() == 0, "the dispatcher to hold a task")
        submitted = [("p0", 0), ("p5", 5), ("n3", -3), ("top", 1000), ("p5b", 5), ("p0b", 0)]
        for name, priority in submitted:
            pool.submit(tq.Task(name), priority=priority)
        gate.set()
    finally:
        gate.set()
        pool.shutdown(wait=True)
    expected = [name for name, _ in sorted(submitted, key=lambda item: -item[1])]
    assert order == ["blocker", "held", *expected]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("handler", [sleeping, lambda task: task.id], ids=["async", "plain"])
def test_async_pool_submit_takes_a_delay_and_a_priority(handler: Any) -> None:
    """A delayed submission starts no sooner than its delay; bad values raise at the await."""

    async def main() -> tuple[tq.TaskRecord, tq.TaskRecord]:
        async with tq.AsyncWorkerPool(handler, workers=2) as pool:
            delayed, ready = await asyncio.gather(
                pool.submit(tq.Task("delayed"), delay=0.2, priority=-1),
                pool.submit(tq.Task("ready"), priority=7),
            )
            with pytest.raises(ValueError, match=r"^delay must be "):
                await pool.submit(tq.Task("bad"), delay=-1.0)
            with pytest.raises(TypeError, match=r"^priority must be "):
                await pool.submit(tq.Task("bad"), priority=2.5)
        return delayed, ready

    delayed, ready = asyncio.run(main())
    assert (delayed.status, ready.status) == (tq.TaskStatus.SUCCEEDED, tq.TaskStatus.SUCCEEDED)
    assert delayed.queue_wait is not None and delayed.queue_wait >= 0.2
