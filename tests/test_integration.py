"""Integration tests: WorkerPool end to end with real threads and real SQLite files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import task_queue_optimized as tq
from tests.support import WAIT, GatedFactory, child_env, wait_until

FAST_RETRY = tq.RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.005)


class TestWorkerPoolIntegration:
    """The whole life of tasks through a WorkerPool."""

    @pytest.mark.timeout(30)
    def test_complete_workflow(
        self,
        tmp_db: str,
        make_processor: Callable[..., tq.TaskProcessor],
        make_tasks: Callable[..., list[tq.Task]],
    ) -> None:
        """Twenty tasks succeed once each, in input order, persisted and counted."""
        tasks = make_tasks(20, payload={"size_bytes": 1000})
        with tq.WorkerPool(make_processor(latency_ms=2.0), workers=4, db_path=tmp_db) as pool:
            records = pool.run(tasks)
            metrics = pool.metrics
        assert pool.closed
        assert [r.task_id for r in records] == [t.id for t in tasks]
        for record in records:
            assert record.status == "succeeded"
            assert record.key == record.task_id
            assert record.attempts == 1
            assert record.error is None
            assert record.output["task_id"] == record.task_id
            assert record.output["bytes"] == 1000
            assert record.enqueued_at <= record.started_at <= record.finished_at
        snap = metrics.snapshot()
        assert snap["submitted"] == 20
        assert snap["succeeded"] == 20
        assert snap["failed"] == snap["duplicates"] == 0
        assert snap["in_flight"] == 0
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.stats()["completed"] == 20
            assert store.get_cached_output("task-007") == records[7].output

    @pytest.mark.timeout(30)
    def test_idempotency_deduplication(
        self, gated: GatedFactory, make_tasks: Callable[..., list[tq.Task]]
    ) -> None:
        """A resubmitted or shared key is a duplicate with the cached output and no handler call."""
        handler = gated(gated=False)
        tasks = make_tasks(10, payload={"v": 1})
        shared = [tq.Task(f"alias-{i}", {"v": 1}, idempotency_key="task-003") for i in range(3)]
        with tq.WorkerPool(handler, workers=4) as pool:
            first = pool.run(tasks)
            second = pool.run([*tasks, *shared])
        assert all(r.status == "succeeded" for r in first)
        assert all(r.status == "duplicate" for r in second)
        assert all(r.attempts == 0 for r in second)
        assert [r.output for r in second[:10]] == [r.output for r in first]
        assert [r.output for r in second[10:]] == [first[3].output] * 3
        assert [r.key for r in second[10:]] == ["task-003"] * 3
        assert handler.calls == {t.key: 1 for t in tasks}
        snap = pool.metrics.snapshot()
        assert snap["duplicates"] == 13
        assert snap["succeeded"] == 10

    @pytest.mark.timeout(30)
    def test_transient_error_retry(self, make_processor: Callable[..., tq.TaskProcessor]) -> None:
        """Transient failures are retried up to max_attempts, then fail as transient."""
        tasks = [
            tq.Task("heals", {"fail": "transient", "fail_times": 2}),
            tq.Task("stays", {"fail": "transient", "fail_times": 5}),
            tq.Task("clean"),
        ]
        with tq.WorkerPool(make_processor(), workers=2, retry=FAST_RETRY) as pool:
            heals, stays, clean = pool.run(tasks)
        assert (heals.status, heals.attempts) == ("succeeded", 3)
        assert (stays.status, stays.attempts, stays.error_kind) == ("failed", 3, "transient")
        assert stays.error
        assert (clean.status, clean.attempts) == ("succeeded", 1)
        snap = pool.metrics.snapshot()
        assert snap["retries"] == 4
        assert snap["succeeded"] == 2
        assert snap["failed"] == 1

    @pytest.mark.timeout(30)
    def test_permanent_error_handling(
        self, tmp_db: str, make_processor: Callable[..., tq.TaskProcessor]
    ) -> None:
        """A permanent failure fails at once, spares its neighbours and releases its key."""
        tasks = [tq.Task("ok-1"), tq.Task("bad", {"fail": "permanent"}), tq.Task("ok-2")]
        with tq.WorkerPool(make_processor(), workers=2, db_path=tmp_db, retry=FAST_RETRY) as pool:
            ok1, bad, ok2 = pool.run(tasks)
        assert ok1.status == ok2.status == "succeeded"
        assert (bad.status, bad.error_kind, bad.attempts) == ("failed", "permanent", 1)
        assert bad.error
        assert bad.output is None
        snap = pool.metrics.snapshot()
        assert snap["retries"] == 0
        assert snap["failed"] == 1
        assert snap["success_rate"] == pytest.approx(2 / 3)
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.stats() == {"in_progress": 0, "completed": 2, "failed": 1, "total": 3}
            assert store.is_processed("bad") is False

    @pytest.mark.timeout(30)
    def test_queue_capacity_limit(self, gated: GatedFactory, make_pool: Callable) -> None:
        """With the worker busy, queue_size tasks wait and the next is rejected."""
        handler = gated()
        pool = make_pool(handler, workers=1, queue_size=2, on_full="reject")
        busy = pool.submit(tq.Task("busy"))
        assert handler.wait_started("busy")
        waiting = [pool.submit(tq.Task(f"w{i}")) for i in range(2)]
        with pytest.raises(tq.QueueFullError):
            pool.submit(tq.Task("overflow"))
        snap = pool.metrics.snapshot()
        assert snap["queue_depth"] == 2
        assert snap["max_queue_depth"] == 2
        assert snap["rejected"] == 1
        handler.gate.set()
        records = [f.result(WAIT) for f in (busy, *waiting)]
        assert [r.status for r in records] == ["succeeded"] * 3
        assert "overflow" not in handler.calls

    @pytest.mark.timeout(30)
    def test_performance_improvement(
        self,
        make_processor: Callable[..., tq.TaskProcessor],
        make_tasks: Callable[..., list[tq.Task]],
    ) -> None:
        """Eight workers finish 40 tasks of 20 ms at least twice as fast as one worker."""

        def wall_time(workers: int) -> float:
            tasks = make_tasks(40, prefix=f"w{workers}")
            with tq.WorkerPool(make_processor(latency_ms=20.0), workers=workers) as pool:
                start = time.perf_counter()
                records = pool.run(tasks)
                elapsed = time.perf_counter() - start
            assert all(r.status == "succeeded" for r in records)
            return elapsed

        serial = wall_time(1)
        parallel = wall_time(8)
        assert serial / parallel >= 2.0


class TestConcurrencyAndStress:
    """Many tasks and many submitting threads, and the empty edge."""

    @pytest.mark.timeout(30)
    def test_high_concurrency(self, tmp_db: str, gated: GatedFactory) -> None:
        """Eight threads submitting 200 distinct tasks at once run each exactly once."""
        handler = gated(gated=False)
        barrier = threading.Barrier(8)
        futures: list = []
        lock = threading.Lock()
        with tq.WorkerPool(handler, workers=8, queue_size=16, db_path=tmp_db) as pool:

            def producer(n: int) -> None:
                barrier.wait(WAIT)
                for i in range(25):
                    future = pool.submit(tq.Task(f"p{n}-{i}", {"n": n, "i": i}))
                    with lock:
                        futures.append(future)

            threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT * 2)
            records = [f.result(WAIT) for f in futures]
        assert len(records) == 200
        assert all(r.status == "succeeded" for r in records)
        assert len({r.task_id for r in records}) == 200
        assert handler.total_calls == 200
        assert set(handler.calls.values()) == {1}
        snap = pool.metrics.snapshot()
        assert snap["succeeded"] == snap["submitted"] == 200
        assert snap["max_queue_depth"] <= 16
        assert snap["in_flight"] == snap["queue_depth"] == 0

    @pytest.mark.timeout(10)
    def test_empty_task_set(self, gated: GatedFactory) -> None:
        """Running no tasks returns nothing, calls nothing and keeps neutral metrics."""
        handler = gated(gated=False)
        with tq.WorkerPool(handler, workers=2) as pool:
            assert pool.run([]) == []
            assert list(pool.iter_results([])) == []
            assert list(pool.iter_results(iter(()))) == []
        snap = pool.metrics.snapshot()
        assert snap["submitted"] == 0
        assert snap["success_rate"] == 1.0
        assert snap["latency_ms"]["count"] == 0
        assert handler.total_calls == 0


# A worker whose store gives up quickly, so that an outage outlasts it within a short test.
WORKER_WITH_SHORT_TIMEOUTS = """
import sys
import task_queue_optimized as tq
tq.BUSY_TIMEOUT_SECONDS = 0.2
raise SystemExit(tq.main(sys.argv[1:]))
"""


@pytest.mark.timeout(60)
def test_worker_outlives_a_database_outage(tmp_path) -> None:
    """A worker whose SQLite file stays locked past its timeouts warns once, then serves on."""
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    env = child_env()
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_WITH_SHORT_TIMEOUTS, "worker", "--db", str(db),
         "--workers", "2", "--latency-ms", "0", "--jitter-ms", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        assert worker.stderr is not None
        assert "serving" in worker.stderr.readline()
        locker.execute("BEGIN EXCLUSIVE")  # no writer gets in: every take fails
        seen = []
        while not seen or "database is unavailable" not in seen[-1]:
            seen.append(worker.stderr.readline())
            assert seen[-1], seen  # the worker must not end
        locker.execute("ROLLBACK")
        store = tq.open_store(str(db))
        try:
            store.enqueue_many([tq.Task("after")])
            wait_until(lambda: store.queue_status()["tasks"]["done"] == 1, "the task after")
        finally:
            store.close()
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=WAIT)
        assert worker.returncode == 143, err
    finally:
        locker.close()
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    stderr = "".join(seen) + err
    assert "Traceback" not in stderr, stderr
    assert stderr.count("database is unavailable") == 1, stderr
    assert "available again" in stderr
