"""WorkerPool behaviour: retries, backpressure, shutdown, result order, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests.spec import SNAPSHOT_KEYS
from tests.support import WAIT, GatedFactory, wait_until

FAST_RETRY = tq.RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.002)

SUMMARY_KEYS = {"count", "mean", "p50", "p95", "p99", "max"}


def _nearest_rank(ordered: list[float], p: float) -> float:
    """Return the nearest-rank p-th percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class TestRetryPolicy:
    """RetryPolicy: delays, classification and validation."""

    def test_delay_without_jitter(self) -> None:
        """jitter="none" gives the exponential bound itself, capped at max_delay."""
        policy = tq.RetryPolicy(base_delay=0.01, max_delay=0.05, multiplier=2.0, jitter="none")
        assert [policy.delay(a) for a in range(1, 6)] == pytest.approx(
            [0.01, 0.02, 0.04, 0.05, 0.05]
        )

    def test_delay_full_jitter_bounds(self) -> None:
        """Full jitter draws delays uniformly within [0, bound] and uses the whole range."""
        policy = tq.RetryPolicy(base_delay=0.01, max_delay=0.03, multiplier=2.0, jitter="full")
        for attempt, bound in ((1, 0.01), (2, 0.02), (3, 0.03), (6, 0.03)):
            samples = [policy.delay(attempt) for _ in range(500)]
            assert all(0.0 <= s <= bound for s in samples)
            assert min(samples) < 0.2 * bound
            assert max(samples) > 0.8 * bound
            assert sum(samples) / len(samples) == pytest.approx(bound / 2, rel=0.2)

    def test_should_retry(self) -> None:
        """Only retry_on errors are retried, and only below max_attempts."""
        policy = tq.RetryPolicy(max_attempts=3)
        assert policy.should_retry(tq.TransientError("x"), 1)
        assert policy.should_retry(TimeoutError(), 2)
        assert policy.should_retry(ConnectionError(), 1)
        assert not policy.should_retry(tq.TransientError("x"), 3)
        assert not policy.should_retry(tq.PermanentError("x"), 1)
        assert not policy.should_retry(ValueError("x"), 1)

    @pytest.mark.parametrize(
        "kwargs",
        [{"max_attempts": 0}, {"base_delay": -1.0}, {"jitter": "bogus"}, {"multiplier": 0.5}],
    )
    def test_invalid_arguments(self, kwargs: dict) -> None:
        """Nonsensical policy arguments raise ValueError."""
        with pytest.raises(ValueError):
            tq.RetryPolicy(**kwargs)


class TestRetries:
    """Retries through the pool and their counts."""

    @pytest.mark.timeout(20)
    def test_retry_counts(self, make_processor: Callable[..., tq.TaskProcessor]) -> None:
        """Five tasks failing twice each take three attempts and ten retries in all."""
        tasks = [tq.Task(f"t{i}", {"fail": "transient", "fail_times": 2}) for i in range(5)]
        with tq.WorkerPool(make_processor(), workers=2, retry=FAST_RETRY) as pool:
            records = pool.run(tasks)
        assert [(r.status, r.attempts) for r in records] == [("succeeded", 3)] * 5
        snap = pool.metrics.snapshot()
        assert snap["retries"] == 10
        assert snap["succeeded"] == 5
        assert snap["handler_calls"] == 15

    @pytest.mark.timeout(20)
    def test_permanent_fails_at_once(self, make_pool: Callable) -> None:
        """PermanentError and errors outside retry_on fail after one attempt, unretried."""
        calls: Counter[str] = Counter()
        lock = threading.Lock()

        def handler(task: tq.Task) -> dict:
            with lock:
                calls[task.id] += 1
            if task.id == "perm":
                raise tq.PermanentError("no")
            raise ValueError("bad value")

        pool = make_pool(handler, workers=2, retry=FAST_RETRY)
        records = pool.run([tq.Task("perm"), tq.Task("value")])
        for record in records:
            assert (record.status, record.error_kind, record.attempts) == ("failed", "permanent", 1)
        assert "bad value" in records[1].error
        assert calls == {"perm": 1, "value": 1}
        pool.shutdown()
        assert pool.metrics.snapshot()["retries"] == 0

    @pytest.mark.timeout(20)
    def test_unserialisable_output_fails_alone(self, make_pool: Callable) -> None:
        """A handler output that is not JSON fails that task as permanent and no other."""

        def handler(task: tq.Task) -> object:
            return {"bad": object()} if task.id == "bad" else {"ok": task.id}

        pool = make_pool(handler, workers=2)
        good1, bad, good2 = pool.run([tq.Task("a"), tq.Task("bad"), tq.Task("b")])
        assert (bad.status, bad.error_kind, bad.attempts) == ("failed", "permanent", 1)
        assert bad.error
        assert bad.output is None
        assert (good1.output, good2.output) == ({"ok": "a"}, {"ok": "b"})
        assert pool.idempotency.is_processed("bad") is False

    @pytest.mark.timeout(20)
    def test_backoff_never_deadlocks_full_queue(
        self, make_processor: Callable[..., tq.TaskProcessor], make_pool: Callable
    ) -> None:
        """With queue_size=1 and one worker, tasks retrying once all finish."""
        pool = make_pool(make_processor(), workers=1, queue_size=1, retry=FAST_RETRY)
        futures = [pool.submit(tq.Task(f"t{i}", {"fail": "transient"})) for i in range(6)]
        records = [f.result(WAIT) for f in futures]
        assert [(r.status, r.attempts) for r in records] == [("succeeded", 2)] * 6
        pool.shutdown()
        assert pool.metrics.snapshot()["retries"] == 6


class TestBackpressure:
    """on_full policies."""

    @pytest.mark.timeout(20)
    def test_reject_raises_at_once(self, gated: GatedFactory, make_pool: Callable) -> None:
        """on_full="reject" raises QueueFullError at once and counts the rejection."""
        handler = gated()
        pool = make_pool(handler, workers=1, queue_size=1, on_full="reject")
        pool.submit(tq.Task("busy"))
        assert handler.wait_started("busy")
        pool.submit(tq.Task("queued"))
        for i in range(3):
            with pytest.raises(tq.QueueFullError):
                pool.submit(tq.Task(f"over{i}"))
        snap = pool.metrics.snapshot()
        assert snap["rejected"] == 3
        assert snap["max_queue_depth"] == 1

    @pytest.mark.timeout(20)
    def test_block_times_out(self, gated: GatedFactory, make_pool: Callable) -> None:
        """on_full="block" waits submit_timeout, then raises QueueFullError."""
        handler = gated()
        pool = make_pool(handler, workers=1, queue_size=1, on_full="block", submit_timeout=0.1)
        pool.submit(tq.Task("busy"))
        assert handler.wait_started("busy")
        pool.submit(tq.Task("queued"))
        start = time.monotonic()
        with pytest.raises(tq.QueueFullError):
            pool.submit(tq.Task("over"))
        assert time.monotonic() - start >= 0.09
        assert pool.metrics.snapshot()["rejected"] == 1

    @pytest.mark.timeout(20)
    def test_block_waits_for_room(self, gated: GatedFactory, make_pool: Callable) -> None:
        """on_full="block" without timeout blocks until a slot frees, then accepts."""
        handler = gated()
        pool = make_pool(handler, workers=1, queue_size=1, on_full="block")
        pool.submit(tq.Task("busy"))
        assert handler.wait_started("busy")
        pool.submit(tq.Task("queued"))
        accepted: list = []
        submitter = threading.Thread(target=lambda: accepted.append(pool.submit(tq.Task("late"))))
        submitter.start()
        submitter.join(0.1)
        assert submitter.is_alive(), "submit returned while the queue was full"
        handler.gate.set()
        submitter.join(WAIT)
        assert accepted[0].result(WAIT).status == "succeeded"


class TestShutdown:
    """Shutdown: drain, cancel, refuse."""

    @pytest.mark.timeout(20)
    def test_shutdown_drains(self, tmp_db: str, gated: GatedFactory) -> None:
        """shutdown() refuses new work, finishes queued tasks and leaves no claim in progress."""
        handler = gated()
        pool = tq.WorkerPool(handler, workers=1, db_path=tmp_db)
        futures = [pool.submit(tq.Task(f"t{i}")) for i in range(5)]
        assert handler.wait_started("t0")
        closer = threading.Thread(target=pool.shutdown)
        closer.start()
        # No event marks shutdown's start; poll the public flag with a deadline.
        wait_until(lambda: pool.closed, "shutdown to close the pool", interval=0.005)
        with pytest.raises(tq.PoolClosedError):
            pool.submit(tq.Task("late"))
        handler.gate.set()
        closer.join(WAIT)
        assert not closer.is_alive()
        assert all(f.done() for f in futures)
        assert [f.result().status for f in futures] == ["succeeded"] * 5
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.stats() == {"in_progress": 0, "completed": 5, "failed": 0, "total": 5}

    @pytest.mark.timeout(20)
    def test_cancel_pending(self, tmp_db: str, gated: GatedFactory) -> None:
        """cancel_pending resolves queued tasks as cancelled and a new pool runs them."""
        handler = gated()
        pool = tq.WorkerPool(handler, workers=1, db_path=tmp_db)
        running = pool.submit(tq.Task("t0"))
        assert handler.wait_started("t0")
        queued = [pool.submit(tq.Task(f"t{i}")) for i in range(1, 4)]
        closer = threading.Thread(target=pool.shutdown, kwargs={"cancel_pending": True})
        closer.start()
        for future in queued:
            record = future.result(WAIT)
            assert (record.status, record.attempts) == ("cancelled", 0)
            assert record.finished_at is not None
        assert not running.done()
        handler.gate.set()
        closer.join(WAIT)
        assert running.result(WAIT).status == "succeeded"
        snap = pool.metrics.snapshot()
        assert snap["cancelled"] == 3
        assert snap["queue_depth"] == 0
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.stats() == {"in_progress": 0, "completed": 1, "failed": 0, "total": 1}
        rerun = gated(gated=False)
        with tq.WorkerPool(rerun, workers=2, db_path=tmp_db) as again:
            records = again.run([tq.Task(f"t{i}") for i in range(4)])
        assert [r.status for r in records] == ["duplicate"] + ["succeeded"] * 3
        assert rerun.calls == {"t1": 1, "t2": 1, "t3": 1}

    @pytest.mark.timeout(10)
    def test_submit_after_shutdown(self, gated: GatedFactory) -> None:
        """submit after shutdown raises PoolClosedError; the context manager shuts down."""
        with tq.WorkerPool(gated(gated=False), workers=1) as pool:
            assert not pool.closed
        assert pool.closed
        with pytest.raises(tq.PoolClosedError):
            pool.submit(tq.Task("t"))
        pool.shutdown()

    @pytest.mark.timeout(30)
    def test_open_pool_drained_at_exit(self, tmp_db: str, run_python: Callable) -> None:
        """A pool left open is drained at interpreter exit, which does not hang."""
        code = (
            "import sys, task_queue_optimized as tq\n"
            "pool = tq.WorkerPool(lambda t: {'id': t.id}, workers=2, db_path=sys.argv[1])\n"
            "futures = [pool.submit(tq.Task(f't{i}')) for i in range(10)]\n"
        )
        child = run_python(code, tmp_db, timeout=20)
        assert child.returncode == 0, child.stderr
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.stats()["completed"] == 10

    @pytest.mark.timeout(10)
    def test_shared_store_not_closed(self, gated: GatedFactory) -> None:
        """A pool given an IdempotencyManager uses it and leaves it open."""
        with tq.IdempotencyManager() as store:
            with tq.WorkerPool(gated(gated=False), workers=1, idempotency=store) as pool:
                assert pool.idempotency is store
                pool.run([tq.Task("t")])
            assert store.is_processed("t")


class TestResultOrder:
    """iter_results and run."""

    @pytest.mark.timeout(20)
    def test_iter_results_completion_order(self, gated: GatedFactory, make_pool: Callable) -> None:
        """iter_results yields each task as it completes, in completion order."""
        handlers = {name: gated() for name in "abc"}

        def handler(task: tq.Task) -> object:
            return handlers[task.id](task)

        pool = make_pool(handler, workers=3)
        seen: list[str] = []
        arrived = {name: threading.Event() for name in "abc"}

        def consume() -> None:
            for record in pool.iter_results([tq.Task(name) for name in "abc"]):
                seen.append(record.task_id)
                arrived[record.task_id].set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        for name in "abc":
            assert handlers[name].wait_started(name)
        for name in "cab":
            handlers[name].gate.set()
            assert arrived[name].wait(WAIT)
        consumer.join(WAIT)
        assert seen == ["c", "a", "b"]

    @pytest.mark.timeout(20)
    def test_iter_results_many(self, make_pool: Callable) -> None:
        """iter_results over a generator larger than the queue yields every task once."""
        pool = make_pool(lambda task: task.payload["n"], workers=4, queue_size=8)
        tasks = (tq.Task(f"t{n}", {"n": n}) for n in range(300))
        outputs = [r.output for r in pool.iter_results(tasks)]
        assert sorted(outputs) == list(range(300))

    @pytest.mark.timeout(20)
    def test_run_returns_input_order(self, make_pool: Callable) -> None:
        """run returns records in input order though the tasks finish in reverse."""
        done = [threading.Event() for _ in range(5)]

        def handler(task: tq.Task) -> int:
            n = task.payload["n"]
            if n < 4 and not done[n + 1].wait(WAIT):
                raise RuntimeError("successor never finished")
            done[n].set()
            return n

        pool = make_pool(handler, workers=5)
        records = pool.run([tq.Task(f"t{n}", {"n": n}) for n in range(5)])
        assert [r.task_id for r in records] == [f"t{n}" for n in range(5)]
        assert [r.output for r in records] == list(range(5))


class TestSameKeyStorm:
    """Many threads submitting the same keys at once."""

    @pytest.mark.timeout(30)
    def test_each_key_runs_once(self, tmp_db: str) -> None:
        """Sixteen threads submitting the same 50 keys at once run each handler once per key."""
        calls: Counter[str] = Counter()
        lock = threading.Lock()

        def handler(task: tq.Task) -> dict:
            with lock:
                calls[task.key] += 1
            time.sleep(0.001)  # simulated work, not coordination
            return {"key": task.key}

        barrier = threading.Barrier(16)
        futures: list = []
        with tq.WorkerPool(handler, workers=4, db_path=tmp_db) as pool:

            def producer(n: int) -> None:
                barrier.wait(WAIT)
                mine = [
                    pool.submit(tq.Task(f"p{n}-{i}", {"i": i}, idempotency_key=f"k{i}"))
                    for i in range(50)
                ]
                with lock:
                    futures.extend(mine)

            threads = [threading.Thread(target=producer, args=(n,)) for n in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT * 2)
            records = [f.result(WAIT) for f in futures]
        assert calls == {f"k{i}": 1 for i in range(50)}
        by_status = Counter(r.status.value for r in records)
        assert by_status == {"succeeded": 50, "duplicate": 750}
        assert all(r.output == {"key": r.key} for r in records)
        snap = pool.metrics.snapshot()
        assert (snap["succeeded"], snap["duplicates"], snap["submitted"]) == (50, 750, 800)


class TestMetricsSnapshot:
    """The metrics snapshot after a mixed run."""

    @pytest.mark.timeout(20)
    def test_snapshot_keys_and_counts(
        self, tmp_path: Path, make_processor: Callable[..., tq.TaskProcessor]
    ) -> None:
        """The snapshot has every documented key and counts that agree with the records."""
        tasks = [tq.Task(f"ok{i}") for i in range(8)]
        tasks += [tq.Task("flaky", {"fail": "transient"})]
        tasks += [tq.Task(f"bad{i}", {"fail": "permanent"}) for i in range(2)]
        tasks += [tq.Task(f"dup{i}", {}, idempotency_key=f"ok{i}") for i in range(3)]
        with tq.WorkerPool(make_processor(), workers=3, queue_size=50, retry=FAST_RETRY) as pool:
            records = pool.run(tasks)
        snap = pool.metrics.snapshot()
        assert set(snap) >= SNAPSHOT_KEYS
        for series in ("latency_ms", "queue_wait_ms", "service_ms"):
            assert set(snap[series]) >= SUMMARY_KEYS
        statuses = Counter(r.status.value for r in records)
        assert snap["succeeded"] == statuses["succeeded"] == 9
        assert snap["failed"] == statuses["failed"] == 2
        assert snap["duplicates"] == statuses["duplicate"] == 3
        assert snap["retries"] == 1
        assert snap["submitted"] == 14
        assert (snap["rejected"], snap["cancelled"]) == (0, 0)
        assert (snap["in_flight"], snap["queue_depth"]) == (0, 0)
        assert (snap["workers"], snap["queue_size"]) == (3, 50)
        assert 1 <= snap["max_queue_depth"] <= 14
        assert snap["success_rate"] == pytest.approx(12 / 14)
        assert snap["elapsed_seconds"] > 0
        assert snap["throughput_per_second"] == pytest.approx(
            14 / snap["elapsed_seconds"], rel=0.01
        )
        assert 0 < snap["utilization"] <= 1.0 + 1e-6
        latency = snap["latency_ms"]
        assert latency["count"] >= 9
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"] * 1.01
        assert json.loads(pool.metrics.to_json())["succeeded"] == 9
        out = tmp_path / "metrics.json"
        pool.metrics.export(out)
        assert json.loads(out.read_text())["submitted"] == 14

    @pytest.mark.timeout(30)
    def test_histogram_accuracy(self) -> None:
        """Percentiles of 10,000 random values are within 1% of exact nearest-rank ones."""
        rng = random.Random(20240531)
        values = [rng.lognormvariate(-4.0, 1.5) for _ in range(10_000)]
        waits = [rng.uniform(0.0001, 2.0) for _ in range(2_000)]
        metrics = tq.MetricsCollector()
        for value in values:
            metrics.record_success(value, service_time=value / 2)
        for wait in waits:
            metrics.record_start(wait)
        ordered, ordered_waits = sorted(values), sorted(waits)
        for p in (1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100):
            exact = _nearest_rank(ordered, p)
            assert metrics.percentile(p) == pytest.approx(exact, rel=0.01), p
            assert metrics.percentile(p, series="service") == pytest.approx(exact / 2, rel=0.01)
            exact_wait = _nearest_rank(ordered_waits, p)
            assert metrics.percentile(p, series="queue_wait") == pytest.approx(exact_wait, rel=0.01)
        snap = metrics.snapshot()["latency_ms"]
        assert snap["count"] == 10_000
        assert snap["p99"] == pytest.approx(_nearest_rank(ordered, 99) * 1000, rel=0.01)
        assert snap["max"] == pytest.approx(ordered[-1] * 1000, rel=0.01)
        assert snap["mean"] == pytest.approx(sum(values) / len(values) * 1000, rel=0.01)


class TestFailureIsolation:
    """A failure that is not the handler's own stays with its task and its claim is released."""

    @pytest.mark.timeout(30)
    def test_deeply_nested_output_fails_that_task_alone_in_a_batch(self, tmp_db: str) -> None:
        """Prove an output json.dumps cannot handle (RecursionError) fails only its own task."""
        deep: object = 1
        for _ in range(100_000):
            deep = [deep]

        def handler(task: tq.Task) -> object:
            return deep if task.id == "deep" else {"ok": task.id}

        with tq.WorkerPool(handler, workers=1, db_path=tmp_db) as pool:
            pool.run([tq.Task(f"warm{i}") for i in range(200)])  # no-ops grow the batches
            tasks = [tq.Task(f"a{i}") for i in range(10)] + [tq.Task("deep")]
            records = pool.run(tasks + [tq.Task(f"b{i}") for i in range(10)])
            stats = pool.idempotency.stats()
        by_id = {record.task_id: record for record in records}
        deep_record = by_id.pop("deep")
        assert deep_record.status == tq.TaskStatus.FAILED
        assert deep_record.error_kind == "permanent"
        assert "not JSON-serialisable" in (deep_record.error or "")
        assert {record.status for record in by_id.values()} == {tq.TaskStatus.SUCCEEDED}
        assert stats["in_progress"] == 0
        assert stats["failed"] == 1


class TestIterResultsWithReject:
    """iter_results throttles itself, so a full queue of its own work is no error."""

    @pytest.mark.timeout(30)
    def test_iter_results_waits_for_its_own_tasks_when_the_queue_rejects(self) -> None:
        """Prove iter_results yields every record with on_full='reject' and a tiny queue."""
        with tq.WorkerPool(lambda task: None, workers=2, queue_size=1, on_full="reject") as pool:
            ids = [record.task_id for record in pool.iter_results(
                tq.Task(f"t{i}") for i in range(500)
            )]  # fmt: skip
        assert sorted(ids) == sorted(f"t{i}" for i in range(500))


class TestIterResultsOverASequence:
    """A list's tasks go in together; each still gets the answer it gets alone."""

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("make_pool", [tq.WorkerPool, tq.AsyncWorkerPool])
    def test_duplicates_conflicts_and_bad_payloads_in_one_window(
        self, make_pool: Any, tmp_path: Path
    ) -> None:
        """Prove iter_results over a list answers duplicates, key conflicts and unserialisable
        payloads inside one window as submit does, and calls the handler once per key."""
        gate = threading.Event()
        calls: Counter[str] = Counter()
        lock = threading.Lock()

        def handler(task: tq.Task) -> str:
            with lock:
                calls[task.key] += 1
            assert gate.wait(WAIT)
            return task.key

        tasks = []
        for i in range(300):
            tasks.append(tq.Task(f"a{i}", {"n": i % 100}, f"k{i % 100}"))  # each key three times
        tasks.append(tq.Task("conflict", {"n": -1}, "k5"))  # k5 with another payload
        tasks.append(tq.Task("unserialisable", {"x": {1, 2}}))
        gate.set()
        pool = make_pool(handler, workers=4, queue_size=50, db_path=str(tmp_path / "k.db"))
        if make_pool is tq.AsyncWorkerPool:

            async def drain() -> list[tq.TaskRecord]:
                async with pool:
                    return [record async for record in pool.iter_results(tasks)]

            records = asyncio.run(drain())
        else:
            with pool:
                records = list(pool.iter_results(tasks))
        by_id = {record.task_id: record for record in records}
        assert len(records) == len(tasks) == len(by_id)
        statuses = Counter(by_id[f"a{i}"].status for i in range(300))
        assert statuses[tq.TaskStatus.SUCCEEDED] == 100
        assert statuses[tq.TaskStatus.DUPLICATE] == 200
        assert all(count == 1 for count in calls.values()) and len(calls) == 100
        # The conflict either met k5 in flight or completed: refused either way, never run.
        assert by_id["conflict"].status is tq.TaskStatus.FAILED
        assert by_id["conflict"].error_kind == "conflict"
        assert by_id["unserialisable"].status is tq.TaskStatus.FAILED
        assert by_id["unserialisable"].error_kind == "permanent"

    @pytest.mark.timeout(30)
    def test_an_item_that_is_no_task_raises_after_the_tasks_before_it(self) -> None:
        """Prove a list holding a non-Task raises TypeError where it stands."""
        tasks: list[Any] = [tq.Task(f"t{i}") for i in range(10)] + ["not a task"]
        seen: list[str] = []
        pool = tq.WorkerPool(lambda task: None, workers=2)
        with pool, pytest.raises(TypeError, match="Task"):
            for record in pool.iter_results(tasks):
                seen.append(record.task_id)
        assert pool.metrics.snapshot()["submitted"] == 10


class TestResourcesAfterShutdown:
    """Nothing is left open after a shutdown, waited for or not."""

    @pytest.mark.timeout(30)
    def test_shutdown_without_wait_closes_an_owned_store(self, tmp_db: str) -> None:
        """Prove shutdown(wait=False) still closes the store the pool opened, once idle."""
        pool = tq.WorkerPool(lambda task: 1, workers=2, db_path=tmp_db)
        futures = [pool.submit(tq.Task(f"t{i}")) for i in range(20)]
        pool.shutdown(wait=False)
        assert all(future.result().status == tq.TaskStatus.SUCCEEDED for future in futures)

        def store_closed() -> bool:
            try:
                pool.idempotency.stats()
            except tq.TaskQueueError:
                return True
            return False

        # The committer closes it once the worker loops have ended.
        wait_until(store_closed, "the pool's store to close", interval=0.01)
        with pytest.raises(tq.TaskQueueError):
            pool.idempotency.store.stats()

    @pytest.mark.timeout(30)
    def test_a_handler_shutting_its_pool_down_leaves_no_thread_and_no_store_open(
        self, tmp_db: str
    ) -> None:
        """Prove a shutdown from inside a handler (a worker loop) ends every thread of the pool
        and closes the store it opened: the pool closes it, after its worker loops."""
        box: dict[str, tq.WorkerPool] = {}
        called = threading.Event()

        def handler(task: tq.Task) -> str:
            box["pool"].shutdown(wait=True)  # from a worker: cannot wait for itself
            called.set()
            return task.id

        before = set(threading.enumerate())
        pool = box["pool"] = tq.WorkerPool(handler, workers=3, db_path=tmp_db)
        record = pool.submit(tq.Task("only")).result(timeout=WAIT)
        assert record.status is tq.TaskStatus.SUCCEEDED and called.is_set()

        def closed() -> bool:
            try:
                pool.idempotency.stats()
            except tq.TaskQueueError:
                return True
            return False

        wait_until(closed, "the pool's store to close", interval=0.01)
        wait_until(
            lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
            "the pool's threads to end",
            interval=0.01,
        )

    @pytest.mark.timeout(30)
    def test_unclosed_task_queue_is_drained_at_exit(self, run_python: Callable) -> None:
        """Prove a TaskQueue left open processes its items and does not hang the exit."""
        code = (
            "import os, task_queue_optimized as tq\n"
            "def show(item):\n"
            "    os.write(1, f'{item}\\n'.encode())  # one write: no interleaved lines\n"
            "queue = tq.TaskQueue(show, maxsize=4, workers=2)\n"
            "for n in range(3):\n"
            "    queue.submit(f'item-{n}')\n"
        )
        child = run_python(code, timeout=20)
        assert child.returncode == 0, child.stderr
        assert sorted(child.stdout.split()) == ["item-0", "item-1", "item-2"]


def _shutdown_returns(pool: tq.WorkerPool, **kwargs: bool) -> bool:
    """Run `pool.shutdown(**kwargs)` in a thread; return whether it returned within WAIT."""
    thread = threading.Thread(target=pool.shutdown, kwargs=kwargs, daemon=True)
    thread.start()
    thread.join(WAIT)
    return not thread.is_alive()


class _Raise(BaseException):
    """Stands for an interrupt of the caller's own (a BaseException, not an Exception)."""


class TestInterruptsAndEarlyExits:
    """An exception from any blocking call, or an early exit, leaves the pool consistent."""

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, _Raise])
    def test_interrupt_while_submit_waits_for_room(
        self, gated: GatedFactory, exc_type: type[BaseException]
    ) -> None:
        """An interrupt raised while submit blocks on a full queue withdraws that submission."""
        handler = gated()
        pool = tq.WorkerPool(handler, workers=1, queue_size=1)
        raised: list[BaseException] = []

        def on_signal(signum: int, frame: object) -> None:
            raise exc_type("interrupted")

        previous = signal.signal(signal.SIGUSR1, on_signal)
        try:
            pool.submit(tq.Task("running"))
            assert handler.wait_started("running")
            pool.submit(tq.Task("queued"))
            waiters = pool._queue._queue.not_full._waiters  # the blocked submit waits here

            def interrupt_when_blocked() -> None:
                wait_until(lambda: len(waiters) > 0, "the submit to block")
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

            threading.Thread(target=interrupt_when_blocked, daemon=True).start()
            try:
                pool.submit(tq.Task("blocked"))
            except exc_type as exc:
                raised.append(exc)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert raised, "the blocked submit was not interrupted"
        handler.gate.set()
        # The withdrawn key is free: a new submission runs it instead of joining a ghost.
        again = pool.submit(tq.Task("blocked"))
        assert again.result(WAIT).status is tq.TaskStatus.SUCCEEDED
        assert _shutdown_returns(pool, wait=True)
        assert handler.calls == {"running": 1, "queued": 1, "blocked": 1}

    @pytest.mark.timeout(30)
    def test_leaving_with_block_on_an_exception_cancels_queued_work(
        self, gated: GatedFactory
    ) -> None:
        """An exception inside `with WorkerPool` cancels queued tasks; running ones finish."""
        handler = gated()
        futures: list[Any] = []
        with (
            pytest.raises(RuntimeError, match="caller failed"),
            tq.WorkerPool(handler, workers=2, queue_size=100) as pool,
        ):
            futures.extend(pool.submit(tq.Task(f"t{i}")) for i in range(40))
            assert handler.wait_started("t0") and handler.wait_started("t1")

            def open_gate_once_closed() -> None:
                wait_until(lambda: pool.closed, "the pool to close")
                handler.gate.set()

            threading.Thread(target=open_gate_once_closed, daemon=True).start()
            raise RuntimeError("caller failed")
        statuses = Counter(future.result(WAIT).status for future in futures)
        assert statuses == {tq.TaskStatus.SUCCEEDED: 2, tq.TaskStatus.CANCELLED: 38}
        assert handler.total_calls == 2
        assert pool.metrics.snapshot()["cancelled"] == 38

    @pytest.mark.timeout(30)
    def test_leaving_iter_results_early_cancels_its_queued_submissions(self, tmp_db: str) -> None:
        """Breaking out of iter_results cancels its still-queued tasks, as Executor.map does."""
        hold = threading.Event()
        calls: Counter[str] = Counter()

        def handler(task: tq.Task) -> str:
            calls[task.id] += 1
            if task.id != "t0" and not hold.wait(WAIT):
                raise RuntimeError("test gate never opened")
            return task.id

        pool = tq.WorkerPool(handler, workers=1, queue_size=10, db_path=tmp_db)
        try:
            for record in pool.iter_results(tq.Task(f"t{i}") for i in range(10)):
                assert record.task_id == "t0"
                break
            hold.set()
        finally:
            hold.set()
            pool.shutdown()
        # t0 finished, t1 was running when the loop ended; the other eight never started.
        assert set(calls) <= {"t0", "t1"}
        snapshot = pool.metrics.snapshot()
        assert snapshot["cancelled"] + snapshot["succeeded"] == 10
        assert snapshot["cancelled"] >= 8
        with tq.IdempotencyManager(tmp_db) as manager:
            assert not manager.is_processed("t9")

    @pytest.mark.timeout(30)
    def test_done_callback_raising_base_exception_leaves_other_futures_resolved(
        self, tmp_db: str
    ) -> None:
        """A done-callback's SystemExit does not leave its batch mates' futures unresolved."""
        pool = tq.WorkerPool(lambda task: task.id, workers=1, queue_size=100, db_path=tmp_db)
        conn = sqlite3.connect(tmp_db, isolation_level=None)
        try:
            # Many quick calls first, so that the worker sizes its batches for quick tasks.
            warm_up = pool.run([tq.Task(f"warm-up-{i}") for i in range(100)])
            assert {record.status for record in warm_up} == {tq.TaskStatus.SUCCEEDED}
            # Hold the write lock while the tasks queue up, so that one batch takes them all.
            conn.execute("BEGIN IMMEDIATE")
            try:
                futures = [pool.submit(tq.Task(f"t{i:02d}")) for i in range(20)]

                def explode(future: Any) -> None:
                    raise SystemExit("from a callback")

                futures[10].add_done_callback(explode)
            finally:
                conn.execute("COMMIT")
            records = [future.result(WAIT) for future in futures]
        finally:
            conn.close()
            assert _shutdown_returns(pool, wait=True)
        assert all(record.status is tq.TaskStatus.SUCCEEDED for record in records)


class TestServeNeverRefusesItsOwnRows:
    """serve() feeds leased rows into the pool's queue: it waits for room, whatever on_full."""

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize(
        "options", [{"on_full": "reject"}, {"submit_timeout": 0.0}], ids=["reject", "timeout"]
    )
    def test_prefetch_larger_than_the_queue(self, tmp_db: str, options: dict[str, Any]) -> None:
        """With a queue of 1 and a prefetch of 20, serve runs every task and raises nothing."""
        calls: Counter[str] = Counter()
        all_done = threading.Event()

        def handler(task: tq.Task) -> str:
            calls[task.id] += 1
            if len(calls) == 30:
                all_done.set()
            return task.id

        pool = tq.WorkerPool(handler, workers=1, queue_size=1, db_path=tmp_db, durable=True,
                             **options)  # fmt: skip
        stop = threading.Event()
        errors: list[BaseException] = []
        pool.idempotency.store.enqueue_many([tq.Task(f"t{i:02d}") for i in range(30)])

        def serve() -> None:
            try:
                pool.serve(stop, prefetch=20, poll_interval=0.05)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            assert all_done.wait(WAIT)
        finally:
            stop.set()
            thread.join(WAIT)
            pool.shutdown()
        assert errors == []
        assert calls == {f"t{i:02d}": 1 for i in range(30)}


class TestOneBadRowFailsAlone:
    """A row the database refuses fails its own task, not the other tasks of its batch."""

    @pytest.mark.timeout(30)
    def test_refused_claim_fails_only_its_task(self, tmp_db: str) -> None:
        with tq.IdempotencyManager(tmp_db):
            pass  # create the schema
        conn = sqlite3.connect(tmp_db, isolation_level=None)
        table = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'tasks'"
            " AND sql LIKE '%fingerprint%'"
        ).fetchone()[0]
        conn.execute(
            f"CREATE TRIGGER poison BEFORE INSERT ON {table} WHEN NEW.key = 'poison'"
            " BEGIN SELECT RAISE(ABORT, 'the database refuses this row'); END"
        )
        pool = tq.WorkerPool(lambda task: task.id, workers=1, queue_size=100, db_path=tmp_db)
        try:
            # Many quick calls first, so that the worker sizes its batches for quick tasks.
            warm_up = pool.run([tq.Task(f"warm-up-{i}") for i in range(100)])
            assert {record.status for record in warm_up} == {tq.TaskStatus.SUCCEEDED}
            # Hold the write lock so that the worker is stuck behind it while the batch queues up.
            conn.execute("BEGIN IMMEDIATE")
            try:
                futures = [pool.submit(tq.Task(f"t{i:02d}")) for i in range(10)]
                futures.insert(5, pool.submit(tq.Task("poison")))
                futures += [pool.submit(tq.Task(f"u{i:02d}")) for i in range(10)]
            finally:
                conn.execute("COMMIT")
            records = {r.task_id: r for r in (f.result(WAIT) for f in futures)}
        finally:
            pool.shutdown()
            conn.close()
        assert records.pop("poison").status is tq.TaskStatus.FAILED
        assert {r.status for r in records.values()} == {tq.TaskStatus.SUCCEEDED}


class TestOtherCallersKeepTheirWork:
    """One caller's early exit or refused submit never cancels or fails another caller's work."""

    @pytest.mark.timeout(30)
    def test_leaving_iter_results_spares_submissions_others_joined(
        self, gated: GatedFactory
    ) -> None:
        handler = gated()
        pool = tq.WorkerPool(handler, workers=1, queue_size=50)
        try:
            blocker = pool.submit(tq.Task("blocker"))
            assert handler.wait_started("blocker")
            stream = pool.iter_results(tq.Task(f"k{i}") for i in range(10))
            first = threading.Thread(target=lambda: next(stream), daemon=True)
            first.start()
            # Another caller submits the same keys while the first caller's tasks are queued.
            wait_until(lambda: pool.metrics.snapshot()["submitted"] >= 11, "the first submissions")
            others = [pool.submit(tq.Task(f"b{i}", idempotency_key=f"k{i}")) for i in range(10)]
            handler.gate.set()
            first.join(WAIT)
            stream.close()  # the first caller leaves after one record
            records = [future.result(WAIT) for future in [blocker, *others]]
        finally:
            handler.gate.set()
            pool.shutdown()
        assert tq.TaskStatus.CANCELLED not in {record.status for record in records}
        assert {record.status for record in records[1:]} <= {
            tq.TaskStatus.SUCCEEDED,
            tq.TaskStatus.DUPLICATE,
        }
        assert sum(handler.calls.values()) == 11

    @pytest.mark.timeout(30)
    def test_a_submission_that_joined_an_interrupted_one_still_runs(
        self, gated: GatedFactory
    ) -> None:
        """The leader's submit is interrupted while it waits; the follower's task still runs."""
        handler = gated()
        pool = tq.WorkerPool(handler, workers=1, queue_size=1)
        joined: list[Any] = []

        def on_signal(signum: int, frame: object) -> None:
            raise _Raise("interrupted")

        previous = signal.signal(signal.SIGUSR1, on_signal)
        try:
            pool.submit(tq.Task("running"))
            assert handler.wait_started("running")
            pool.submit(tq.Task("queued"))  # the queue is full now
            waiters = pool._queue._queue.not_full._waiters  # the blocked submit waits here

            def join_then_interrupt() -> None:
                wait_until(lambda: len(waiters) > 0, "the leader's submit to block")
                joined.append(pool.submit(tq.Task("b", idempotency_key="shared")))
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

            threading.Thread(target=join_then_interrupt, daemon=True).start()
            with pytest.raises(_Raise):
                pool.submit(tq.Task("a", idempotency_key="shared"))
        finally:
            signal.signal(signal.SIGUSR1, previous)
            handler.gate.set()
        try:
            record = joined[0].result(WAIT)
        finally:
            pool.shutdown()
        assert record.status is tq.TaskStatus.SUCCEEDED, record
        assert handler.calls["shared"] == 1


class TestDurablePoolRidesOutAnOutage:
    """A durable pool whose store is unavailable keeps finished work and records it later."""

    @pytest.mark.timeout(30)
    def test_a_completion_the_store_refused_is_recorded_when_it_answers(
        self, tmp_db: str, gated: GatedFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:  # fmt: skip
        monkeypatch.setattr(tq, "BUSY_TIMEOUT_SECONDS", 0.2)  # each try gives up quickly
        handler = gated()
        pool = tq.WorkerPool(handler, workers=2, db_path=tmp_db, durable=True)
        locker = sqlite3.connect(tmp_db, isolation_level=None, timeout=WAIT)
        try:
            future = pool.submit(tq.Task("slow", {"n": 1}))
            assert handler.wait_started("slow")
            locker.execute("BEGIN EXCLUSIVE")  # the database refuses every writer now
            with caplog.at_level("WARNING", logger="task_queue_optimized"):
                handler.gate.set()  # the handler finishes; its completion cannot be written
                wait_until(lambda: "database is unavailable" in caplog.text, "the outage warning")
                assert not future.done()  # held, not failed
                locker.execute("ROLLBACK")
                record = future.result(WAIT)
        finally:
            handler.gate.set()
            locker.close()
            pool.shutdown()
        assert record.status is tq.TaskStatus.SUCCEEDED, record
        assert handler.calls == {"slow": 1}
        store = tq.open_store(tmp_db)
        try:
            assert store.queue_status()["tasks"]["done"] == 1
        finally:
            store.close()
        with tq.IdempotencyManager(tmp_db) as manager:
            assert manager.is_processed("slow")

    @pytest.mark.timeout(30)
    def test_a_durable_submit_the_store_refuses_is_a_failed_record(
        self, tmp_db: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """submit raises only QueueFullError and PoolClosedError: a store error is a record."""
        monkeypatch.setattr(tq, "BUSY_TIMEOUT_SECONDS", 0.2)
        pool = tq.WorkerPool(lambda task: task.id, workers=1, db_path=tmp_db, durable=True)
        locker = sqlite3.connect(tmp_db, isolation_level=None, timeout=WAIT)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            try:
                record = pool.submit(tq.Task("refused")).result(WAIT)
            finally:
                locker.execute("ROLLBACK")
            again = pool.submit(tq.Task("refused")).result(WAIT)
        finally:
            locker.close()
            pool.shutdown()
        assert (record.status, record.error_kind) == (tq.TaskStatus.FAILED, "transient")
        assert "could not record" in (record.error or "")
        assert again.status is tq.TaskStatus.SUCCEEDED


class TestSubmittingFromThePoolsOwnThreads:
    """A done-callback or an async handler may submit more work, even to a full queue."""

    @pytest.mark.timeout(30)
    def test_a_done_callback_chains_tasks_through_a_full_queue(self) -> None:
        done = threading.Event()
        records: list[tq.TaskRecord] = []
        pool = tq.WorkerPool(lambda task: task.id, workers=1, queue_size=1)

        def chain(future: Any) -> None:
            record = future.result()
            records.append(record)
            number = int(record.task_id[1:])
            if number < 30:
                # Three follow-ups at once: the queue of one is full after the first.
                for offset in (1, 2, 3):
                    if number + offset <= 30 and f"t{number + offset}" not in seen:
                        seen.add(f"t{number + offset}")
                        pool.submit(tq.Task(f"t{number + offset}")).add_done_callback(chain)
            if len(records) == 31:
                done.set()

        seen = {"t0"}
        try:
            pool.submit(tq.Task("t0")).add_done_callback(chain)
            assert done.wait(WAIT), f"{len(records)} of 31 finished"
        finally:
            pool.shutdown()
        assert sorted(int(r.task_id[1:]) for r in records) == list(range(31))

    @pytest.mark.timeout(30)
    def test_an_async_handler_submits_to_its_own_full_pool(self) -> None:
        holder: list[tq.WorkerPool] = []
        finished = threading.Event()
        count = 0

        async def handler(task: tq.Task) -> str:
            nonlocal count
            if task.id == "parent":
                for i in range(20):  # the queue holds 2: the rest must not block the loop
                    holder[0].submit(tq.Task(f"child{i}"))
            count += 1
            if count == 21:
                finished.set()
            return task.id

        pool = tq.WorkerPool(handler, workers=4, queue_size=2)
        holder.append(pool)
        try:
            pool.submit(tq.Task("parent"))
            assert finished.wait(WAIT), f"{count} of 21 ran"
        finally:
            pool.shutdown()
        assert pool.metrics.snapshot()["succeeded"] == 21


class TestGaugesAndEdges:
    """Gauges come back to zero; odd payloads are records, never exceptions from submit."""

    @pytest.mark.timeout(30)
    def test_in_flight_returns_to_zero_after_retries_in_batches(self) -> None:
        failed_once: set[str] = set()
        lock = threading.Lock()

        def handler(task: tq.Task) -> str:
            number = int(task.id[1:])
            with lock:
                first = number % 2 == 0 and task.id not in failed_once
                failed_once.add(task.id)
            if first:
                raise tq.TransientError("once")
            if number % 40 == 0:
                time.sleep(0.02)
            return task.id

        with tq.WorkerPool(handler, workers=4, retry=FAST_RETRY) as pool:
            records = pool.run([tq.Task(f"t{i}") for i in range(2000)])
        assert {r.status for r in records} == {tq.TaskStatus.SUCCEEDED}
        snapshot = pool.metrics.snapshot()
        assert (snapshot["in_flight"], snapshot["queue_depth"]) == (0, 0)
        assert snapshot["utilization"] <= 1.0

    @pytest.mark.timeout(30)
    def test_a_payload_too_deep_to_encode_is_a_failed_record(self) -> None:
        deep: dict[str, Any] = {}
        node = deep
        for _ in range(5000):
            node["x"] = {}
            node = node["x"]
        with tq.WorkerPool(lambda task: None, workers=1) as pool:
            record = pool.submit(tq.Task("deep", deep)).result(WAIT)
        assert (record.status, record.error_kind) == (tq.TaskStatus.FAILED, "permanent")

    @pytest.mark.timeout(30)
    def test_shutdown_that_waits_returns_after_the_pools_threads_end(
        self, gated: GatedFactory
    ) -> None:
        """The last task finishing while shutdown waits: shutdown still joins every thread."""
        handler = gated()
        pool = tq.WorkerPool(handler, workers=2)
        own = [pool._committer._thread, pool._scheduler._thread, pool._keeper._thread]
        future = pool.submit(tq.Task("last"))
        assert handler.wait_started("last")
        waiting = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
        waiting.start()
        wait_until(lambda: pool.closed, "the pool to close")
        handler.gate.set()  # the committer finishes the last task while shutdown waits
        waiting.join(WAIT)
        assert not waiting.is_alive()
        assert future.result(WAIT).status is tq.TaskStatus.SUCCEEDED
        assert [thread.name for thread in own if thread.is_alive()] == []


class _StartOrder:
    """A handler that records the order and the `time.monotonic()` of its calls; the call of
    `blocker` waits for `gate`, so that the only worker stays busy while a test submits."""

    def __init__(self, blocker: str = "blocker") -> None:
        self.blocker = blocker
        self.gate = threading.Event()
        self.blocking = threading.Event()
        self._lock = threading.Lock()  # guards order and started
        self.order: list[str] = []
        self.started: dict[str, float] = {}

    def __call__(self, task: tq.Task) -> None:
        with self._lock:
            self.order.append(task.id)
            self.started[task.id] = time.monotonic()
        if task.id == self.blocker:
            self.blocking.set()
            if not self.gate.wait(WAIT):
                raise RuntimeError("test gate never opened")


class TestPriorities:
    """A higher priority starts first among ready tasks; equal ones keep submission order."""

    def test_start_order_follows_priority_then_submission(self, make_pool: Callable) -> None:
        handler = _StartOrder()
        pool = make_pool(handler, workers=1)
        blocker = pool.submit(tq.Task("blocker"))
        assert handler.blocking.wait(WAIT)
        # Three rounds of five priorities, each round in a different order of submission.
        rounds = [(0, 5, -3, 1000, 1), (5, -1000, 0, 1, -3), (1, 0, 5, -3, 1000)]
        submitted = []
        for index, priorities in enumerate(rounds):
            for priority in priorities:
                name = f"p{priority}-{index}"
                submitted.append((name, priority))
                pool.submit(tq.Task(name), priority=priority)
        handler.gate.set()
        pool.shutdown(wait=True)
        assert blocker.result(WAIT).status is tq.TaskStatus.SUCCEEDED
        expected = [name for name, _ in sorted(submitted, key=lambda item: -item[1])]
        assert handler.order == ["blocker", *expected]

    def test_a_full_queue_refuses_whatever_the_priority(self, make_pool: Callable) -> None:
        handler = _StartOrder()
        pool = make_pool(handler, workers=1, queue_size=2, on_full="reject")
        pool.submit(tq.Task("blocker"))
        assert handler.blocking.wait(WAIT)
        pool.submit(tq.Task("low"), priority=-5)
        pool.submit(tq.Task("high"), priority=5)
        with pytest.raises(tq.QueueFullError):
            pool.submit(tq.Task("higher"), priority=1000)
        assert pool.metrics.snapshot()["rejected"] == 1
        handler.gate.set()
        pool.shutdown(wait=True)
        assert handler.order == ["blocker", "high", "low"]

    @pytest.mark.parametrize("batches", [False, True], ids=["one-at-a-time", "batches"])
    def test_task_queue_puts_a_ready_item_at_the_front_of_its_own_priority(
        self, batches: bool
    ) -> None:
        order: list[str] = []
        gate, blocking = threading.Event(), threading.Event()

        def process(item: str) -> None:
            if item == "blocker":
                blocking.set()
                assert gate.wait(WAIT)
            order.append(item)

        def process_many(items: list[str]) -> None:
            for item in items:
                process(item)

        queue = tq.TaskQueue(
            process,
            workers=1,
            maxsize=20,
            process_many=process_many if batches else None,
            batch_limit=lambda: 64,
        )
        queue.submit("blocker")
        assert blocking.wait(WAIT)
        queue.submit("a3", priority=3)
        queue.submit("b3", priority=3)
        queue.submit("z0")
        queue.submit("h7", priority=7)
        queue.submit("n-1", priority=-1)
        queue.put_ready("r3", priority=3)  # a due retry: the front of priority 3
        queue.put_ready("r0")  # the front of priority 0
        queue.put_overflow("o3", priority=3)  # past the bound, at the back of priority 3
        assert queue.qsize() == 8
        gate.set()
        queue.close(wait=True)  # the stop sentinels leave after every item, priority -1 too
        assert order == ["blocker", "h7", "r3", "a3", "b3", "o3", "r0", "z0", "n-1"]

    def test_take_back_and_drain_see_items_of_every_priority(self) -> None:
        gate, blocking = threading.Event(), threading.Event()

        def process(item: str) -> None:
            blocking.set()
            assert gate.wait(WAIT)

        queue = tq.TaskQueue(process, workers=1, maxsize=5)
        queue.submit("blocker")
        assert blocking.wait(WAIT)
        for name, priority in (("a", 1), ("b", 0), ("c", -1), ("d", 1)):
            queue.submit(name, priority=priority)
        assert queue.take_back("d") and not queue.take_back("d")
        assert queue.drain() == ["a", "b", "c"]
        assert queue.qsize() == 0
        gate.set()
        queue.close(wait=True)

    @pytest.mark.parametrize(
        ("value", "error"),
        [(1001, ValueError), (-1001, ValueError), (True, TypeError), (1.0, TypeError),
         ("1", TypeError), (None, TypeError)],
    )  # fmt: skip
    def test_a_bad_priority_is_refused_and_nothing_is_accepted(
        self, make_pool: Callable, value: Any, error: type[Exception]
    ) -> None:
        pool = make_pool(lambda task: None, workers=1)
        with pytest.raises(error, match=r"^priority must be ") as info:
            pool.submit(tq.Task("t"), priority=value)
        assert "\n" not in str(info.value)
        assert pool.metrics.snapshot()["submitted"] == 0


class TestDelays:
    """A delayed task starts no sooner than its delay, holding no worker and no queue slot."""

    def test_a_delayed_task_holds_no_worker_and_no_queue_slot(self, make_pool: Callable) -> None:
        handler = _StartOrder()
        pool = make_pool(handler, workers=1, queue_size=1, on_full="reject")
        late = pool.submit(tq.Task("late"), delay=3600.0)
        pool.submit(tq.Task("blocker"))  # the one worker takes it: the delayed task holds none
        assert handler.blocking.wait(WAIT)
        pool.submit(tq.Task("queued"))  # the one queue slot: the delayed task holds none
        with pytest.raises(tq.QueueFullError):
            pool.submit(tq.Task("refused"))
        handler.gate.set()
        wait_until(lambda: handler.order == ["blocker", "queued"], "the two ready tasks to run")
        assert pool.metrics.snapshot()["queue_depth"] == 0
        pool.shutdown(wait=True, cancel_pending=True)
        assert late.result(WAIT).status is tq.TaskStatus.CANCELLED
        assert handler.order == ["blocker", "queued"]
        snapshot = pool.metrics.snapshot()
        assert (snapshot["cancelled"], snapshot["queue_depth"], snapshot["in_flight"]) == (1, 0, 0)

    def test_shutdown_waits_for_a_delayed_task_which_starts_after_its_delay(
        self, make_pool: Callable
    ) -> None:
        handler = _StartOrder()
        pool = make_pool(handler, workers=2)
        delay = 0.3
        submitted = time.monotonic()
        future = pool.submit(tq.Task("later"), delay=delay, priority=2)
        pool.submit(tq.Task("now"))
        pool.shutdown(wait=True)  # returns once the delayed task has run
        record = future.result(0)
        assert record.status is tq.TaskStatus.SUCCEEDED
        assert sorted(handler.order) == ["later", "now"]
        assert handler.started["later"] - submitted >= delay
        assert record.queue_wait is not None and record.queue_wait >= delay

    def test_a_due_task_joins_the_back_of_its_priority(self, make_pool: Callable) -> None:
        handler = _StartOrder()
        pool = make_pool(handler, workers=1)
        pool.submit(tq.Task("blocker"))
        assert handler.blocking.wait(WAIT)
        pool.submit(tq.Task("early"), priority=1)
        pool.submit(tq.Task("delayed"), delay=0.05, priority=1)
        # Observe the scheduler hand the delayed task to the queue, behind "early".
        wait_until(lambda: pool._queue.qsize() == 2, "the delayed task to fall due")
        pool.submit(tq.Task("late"), priority=1)
        pool.submit(tq.Task("high"), priority=2)
        handler.gate.set()
        pool.shutdown(wait=True)
        assert handler.order == ["blocker", "high", "early", "delayed", "late"]

    def test_cancel_pending_cancels_a_waiting_delayed_task_at_once(
        self, make_pool: Callable
    ) -> None:
        handler = _StartOrder()
        pool = make_pool(handler, workers=1)
        waiting = pool.submit(tq.Task("waiting"), delay=3600.0)
        pool.shutdown(wait=True, cancel_pending=True)  # cancels instead of waiting an hour
        assert waiting.result(0).status is tq.TaskStatus.CANCELLED
        assert handler.order == []

    @pytest.mark.parametrize(
        ("value", "error"),
        [(-0.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
         (10**400, ValueError), (True, TypeError), ("1", TypeError), (None, TypeError)],
    )  # fmt: skip
    def test_a_bad_delay_is_refused_and_nothing_is_accepted(
        self, make_pool: Callable, value: Any, error: type[Exception]
    ) -> None:
        pool = make_pool(lambda task: None, workers=1)
        with pytest.raises(error, match=r"^delay must be ") as info:
            pool.submit(tq.Task("t"), delay=value)
        assert "\n" not in str(info.value)
        assert pool.metrics.snapshot()["submitted"] == 0
