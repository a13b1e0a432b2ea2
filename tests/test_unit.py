"""Unit tests of the components of task_queue_optimized, one class per component."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests.store_fixtures import Backend
from tests.support import WAIT, GatedFactory, one_line_error, run_cli

# A sleep of s seconds never returns earlier than s; allow for the clock's resolution only.
CLOCK_SLACK = 0.0005


def _timed(processor: tq.TaskProcessor, task: tq.Task) -> float:
    """Return the seconds one processor call took."""
    start = time.perf_counter()
    processor(task)
    return time.perf_counter() - start


class TestTask:
    """Task records: keys, immutability and validation."""

    def test_key_defaults_to_id(self) -> None:
        """Task.key is the idempotency key when given, else the id."""
        assert tq.Task("a").key == "a"
        assert tq.Task("a", {"x": 1}, idempotency_key="k").key == "k"

    def test_frozen_with_fresh_payload(self) -> None:
        """Task is frozen and each task gets its own default payload dict."""
        first, second = tq.Task("a"), tq.Task("b")
        assert first.payload == {}
        assert first.payload is not second.payload
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.id = "other"  # type: ignore[misc]

    def test_from_dict_valid(self) -> None:
        """Task.from_dict builds a task from its three fields."""
        task = tq.Task.from_dict({"id": "t", "payload": {"n": 1}, "idempotency_key": "k"})
        assert (task.id, task.payload, task.idempotency_key) == ("t", {"n": 1}, "k")

    @pytest.mark.parametrize(
        ("mapping", "field"),
        [
            ({"id": ""}, "id"),
            ({"id": 3}, "id"),
            ({"id": "t", "payload": [1]}, "payload"),
            ({"id": "t", "idempotency_key": ""}, "idempotency_key"),
            ({"id": "t", "colour": "red"}, "colour"),
        ],
    )
    def test_from_dict_rejects_bad_field(self, mapping: dict[str, Any], field: str) -> None:
        """Task.from_dict raises TaskFileError naming the bad field."""
        with pytest.raises(tq.TaskFileError) as info:
            tq.Task.from_dict(mapping)
        assert info.value.field == field
        assert field in str(info.value)

    @pytest.mark.parametrize(
        ("task_id", "key", "field", "problem"),
        [
            ("a\x00", None, "id", "NUL"),
            ("\udcff", None, "id", "U+DCFF"),
            ("", None, "id", "non-empty"),
            (3, None, "id", "non-empty"),
            ("ok", "\ud800", "idempotency_key", "U+D800"),
            ("ok", "k\x00", "idempotency_key", "NUL"),
            ("ok", "", "idempotency_key", "non-empty"),
        ],
    )
    def test_an_id_or_key_no_store_can_keep_is_refused(
        self, task_id: Any, key: Any, field: str, problem: str
    ) -> None:
        """Task() and Task.from_dict refuse such an id or key with a ValueError naming the field."""
        with pytest.raises(tq.TaskFileError) as built:
            tq.Task(task_id, {}, key)
        with pytest.raises(ValueError) as parsed:
            tq.Task.from_dict({"id": task_id, "idempotency_key": key})
        for error in (built.value, parsed.value):
            assert isinstance(error, tq.TaskFileError) and isinstance(error, ValueError)
            assert error.field == field
            assert repr(field) in str(error) and problem in str(error), str(error)

    @pytest.mark.parametrize(
        ("longest", "field"),
        [
            ("\U0001f600" * (tq.MAX_KEY_BYTES // 4), "id"),
            ("\u20ac" * (tq.MAX_KEY_BYTES // 3) + "k" * (tq.MAX_KEY_BYTES % 3), "idempotency_key"),
        ],
        ids=["id-4-byte-chars", "key-3-byte-chars"],
    )
    def test_ids_and_keys_are_bounded_in_utf8_bytes(self, longest: str, field: str) -> None:
        """MAX_KEY_BYTES of UTF-8 is accepted; one byte more is refused, naming field and limit."""
        assert len(longest.encode()) == tq.MAX_KEY_BYTES
        other = {} if field == "id" else {"id": "t"}
        assert tq.Task.from_dict({**other, field: longest}).key == longest
        mapping = {**other, field: longest + "x"}
        errors = []
        for build in (tq.Task.from_dict, lambda fields: tq.Task(**fields)):
            with pytest.raises(tq.TaskFileError) as info:
                build(mapping)
            errors.append(info.value)
        for error in errors:
            message = str(error)
            assert error.field == field and repr(field) in message, message
            assert f"at most {tq.MAX_KEY_BYTES} bytes" in message, message
            assert f"not {tq.MAX_KEY_BYTES + 1}" in message and len(message) < 200, message

    def test_namespaces_and_worker_names_are_bounded_in_utf8_bytes(self) -> None:
        """A namespace over MAX_NAMESPACE_BYTES or a worker name over MAX_KEY_BYTES is refused."""
        longest = "\u540d" * (tq.MAX_NAMESPACE_BYTES // 3) + "n" * (tq.MAX_NAMESPACE_BYTES % 3)
        assert len(longest.encode()) == tq.MAX_NAMESPACE_BYTES
        with tq.WorkerPool(lambda task: None, workers=1, namespace=longest) as pool:
            assert pool.namespace == longest
        with pytest.raises(ValueError, match=f"namespace must be at most {tq.MAX_NAMESPACE_BYTES}"):
            tq.WorkerPool(lambda task: None, workers=1, namespace=longest + "n")
        with pytest.raises(ValueError, match=f"worker_name must be at most {tq.MAX_KEY_BYTES}"):
            tq.WorkerPool(lambda task: None, workers=1, worker_name="w" * (tq.MAX_KEY_BYTES + 1))

    def test_a_null_payload_is_the_empty_payload(self) -> None:
        """A null payload means {}, like a null idempotency key means none."""
        task = tq.Task.from_dict({"id": "t", "payload": None, "idempotency_key": None})
        assert (task.payload, task.key) == ({}, "t")
        assert tq.Task("t", None).payload == {}  # type: ignore[arg-type]
        assert tq.Task("t", None) == tq.Task("t")  # type: ignore[arg-type]


def test_every_public_class_function_and_default_is_in_all() -> None:
    """Public names (ErrorKind among them) are exported; __all__ names only what exists."""
    defined = {
        name
        for name, value in vars(tq).items()
        if not name.startswith("_")
        and (
            (callable(value) and getattr(value, "__module__", None) == tq.__name__)
            or name.startswith(("DEFAULT_", "MAX_"))
        )
    }
    assert "ErrorKind" in defined
    tuning = {"MAX_BATCH", "MAX_COMPLETION_BATCH", "MAX_ECHO_CHARS", "MAX_PREFETCH"}
    assert defined - tuning <= set(tq.__all__)
    assert all(hasattr(tq, name) for name in tq.__all__)


class TestTaskProcessor:
    """TaskProcessor: streaming, hashing, latency and fault injection."""

    def test_process_success(self, make_processor: Callable[..., tq.TaskProcessor]) -> None:
        """A call streams size_bytes in chunks and returns the same digest for the same task."""
        processor = make_processor(latency_ms=1.0)
        task = tq.Task("t1", {"size_bytes": 200_000})
        out = processor(task)
        assert set(out) >= {"task_id", "bytes", "chunks", "sha256"}
        assert out["task_id"] == "t1"
        assert out["bytes"] == 200_000
        assert out["chunks"] == math.ceil(200_000 / 65536)
        assert len(out["sha256"]) == 64
        int(out["sha256"], 16)
        assert processor(task) == out
        assert make_processor(latency_ms=0.0)(task)["sha256"] == out["sha256"]
        other = processor(tq.Task("t1", {"size_bytes": 1000}))
        assert other["sha256"] != out["sha256"]
        assert other["chunks"] == 1
        small = make_processor(latency_ms=0.0, chunk_size=100)(tq.Task("t2", {"size_bytes": 1000}))
        assert small["chunks"] == 10

    def test_latency_with_jitter(self, make_processor: Callable[..., tq.TaskProcessor]) -> None:
        """Each call really sleeps at least latency minus jitter; payload latency_ms overrides."""
        processor = tq.TaskProcessor(latency_ms=10.0, jitter_ms=4.0, seed=7)
        for i in range(5):
            assert _timed(processor, tq.Task(f"t{i}")) >= 0.006 - CLOCK_SLACK
        fast = make_processor(latency_ms=0.0)
        slow_seconds = _timed(fast, tq.Task("slow", {"latency_ms": 30}))
        assert slow_seconds >= 0.030 - CLOCK_SLACK
        assert _timed(fast, tq.Task("quick")) < slow_seconds

    def test_transient_error_injection(
        self, make_processor: Callable[..., tq.TaskProcessor]
    ) -> None:
        """fail=transient fails the first fail_times attempts; a rate of 1.0 always fails."""
        processor = make_processor(latency_ms=0.0)
        task = tq.Task("t", {"fail": "transient", "fail_times": 2})
        for _ in range(2):
            with pytest.raises(tq.TransientError):
                processor(task)
        assert processor(task)["task_id"] == "t"
        once = tq.Task("once", {"fail": "transient"})
        with pytest.raises(tq.TransientError):
            processor(once)
        assert processor(once)["task_id"] == "once"
        always = make_processor(latency_ms=0.0, transient_error_rate=1.0)
        for i in range(3):
            with pytest.raises(tq.TransientError):
                always(tq.Task(f"r{i}"))
        assert issubclass(tq.TransientError, tq.TaskQueueError)

    def test_transient_rate_is_seeded(
        self, make_processor: Callable[..., tq.TaskProcessor]
    ) -> None:
        """A 50% rate fails about half the attempts, the same ones for the same seed."""

        def outcomes(seed: int) -> list[bool]:
            processor = make_processor(latency_ms=0.0, transient_error_rate=0.5, seed=seed)
            result = []
            for i in range(200):
                try:
                    processor(tq.Task(f"t{i}"))
                    result.append(True)
                except tq.TransientError:
                    result.append(False)
            return result

        first = outcomes(42)
        assert 50 <= first.count(False) <= 150
        assert outcomes(42) == first

    def test_permanent_error_injection(
        self, make_processor: Callable[..., tq.TaskProcessor]
    ) -> None:
        """fail=permanent, a permanent rate of 1.0 and bad payload values raise PermanentError."""
        processor = make_processor(latency_ms=0.0)
        task = tq.Task("p", {"fail": "permanent"})
        for _ in range(3):
            with pytest.raises(tq.PermanentError):
                processor(task)
        always = make_processor(latency_ms=0.0, permanent_error_rate=1.0)
        with pytest.raises(tq.PermanentError):
            always(tq.Task("r"))
        with pytest.raises(tq.PermanentError):
            processor(tq.Task("neg", {"size_bytes": -1}))
        with pytest.raises(tq.PermanentError):
            processor(tq.Task("nan", {"latency_ms": "slow"}))
        assert issubclass(tq.PermanentError, tq.TaskQueueError)


class TestIdempotencyManager:
    """IdempotencyManager: the simple surface and atomic claims."""

    def test_not_processed_initially(self, tmp_db: str) -> None:
        """A fresh store, in memory or on disk, knows no key."""
        for path in (None, tmp_db):
            with tq.IdempotencyManager(path) as store:
                assert store.is_processed("k") is False
                assert store.get_cached_output("k") is None
                assert store.stats() == {"in_progress": 0, "completed": 0, "failed": 0, "total": 0}

    def test_mark_and_check_processed(self, tmp_db: str) -> None:
        """mark_processed makes is_processed true for that key only, and it persists."""
        with tq.IdempotencyManager(tmp_db) as store:
            store.mark_processed("k", {"ok": True})
            assert store.is_processed("k") is True
            assert store.is_processed("other") is False
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.is_processed("k") is True

    def test_get_cached_output(self, tmp_db: str) -> None:
        """The cached output round-trips JSON values exactly, across reopening the file."""
        output = {"s": "é", "n": 3, "f": 1.5, "l": [1, None, True], "d": {"x": []}}
        with tq.IdempotencyManager(tmp_db) as store:
            store.mark_processed("k", output)
            assert store.get_cached_output("k") == output
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.get_cached_output("k") == output
            claim = store.claim("k")
            assert claim.state == "completed"
            assert claim.output == output
            assert claim.token is None

    def test_multiple_keys(self) -> None:
        """Keys are independent: each keeps its own output."""
        with tq.IdempotencyManager() as store:
            for i in range(20):
                store.mark_processed(f"k{i}", {"i": i})
            assert [store.get_cached_output(f"k{i}") for i in range(20)] == [
                {"i": i} for i in range(20)
            ]
            assert store.stats()["completed"] == 20
            assert store.stats()["total"] == 20
            assert store.is_processed("k20") is False

    @pytest.mark.timeout(20)
    def test_concurrent_duplicate_handling(self, tmp_db: str) -> None:
        """Of 16 threads claiming one key at the same moment exactly one wins."""
        states: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(16)
        with tq.IdempotencyManager(tmp_db) as store:

            def claim() -> None:
                barrier.wait(WAIT)
                result = store.claim("same")
                with lock:
                    states.append(result.state)

            threads = [threading.Thread(target=claim) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            assert sorted(states) == ["claimed"] + ["in_progress"] * 15
            assert store.stats()["in_progress"] == 1


class TestMetricsCollector:
    """MetricsCollector: counters, gauges, percentiles and thread safety."""

    def test_initial_metrics(self) -> None:
        """A new collector reports zero counts, its sizes and a success rate of 1.0."""
        metrics = tq.MetricsCollector(workers=4, queue_size=10)
        snap = metrics.snapshot()
        for key in (
            "submitted",
            "succeeded",
            "failed",
            "duplicates",
            "retries",
            "rejected",
            "cancelled",
            "in_flight",
            "queue_depth",
            "max_queue_depth",
        ):
            assert snap[key] == 0, key
        assert snap["workers"] == 4
        assert snap["queue_size"] == 10
        assert snap["success_rate"] == 1.0
        assert snap["latency_ms"]["count"] == 0
        assert metrics.percentile(50) == 0.0

    def test_record_enqueue(self) -> None:
        """Enqueues raise submitted and the queue depth; starts move tasks to in_flight."""
        metrics = tq.MetricsCollector()
        for _ in range(3):
            metrics.record_enqueue()
        metrics.record_start(0.01)
        metrics.record_enqueue(queued=False)
        snap = metrics.snapshot()
        assert snap["submitted"] == 4
        assert snap["queue_depth"] == 2
        assert snap["max_queue_depth"] == 3
        assert snap["in_flight"] == 1
        assert snap["queue_wait_ms"]["count"] == 1

    def test_record_success(self) -> None:
        """A success counts, leaves flight and records latency and service time."""
        metrics = tq.MetricsCollector()
        metrics.record_enqueue()
        metrics.record_start(0.002)
        metrics.record_success(0.050, service_time=0.040)
        snap = metrics.snapshot()
        assert snap["succeeded"] == 1
        assert snap["in_flight"] == 0
        assert snap["queue_depth"] == 0
        assert snap["latency_ms"]["count"] == 1
        assert snap["latency_ms"]["p50"] == pytest.approx(50.0, rel=0.01)
        assert snap["service_ms"]["p50"] == pytest.approx(40.0, rel=0.01)
        assert snap["success_rate"] == 1.0

    def test_record_failure(self) -> None:
        """Failures count by kind and lower the success rate."""
        metrics = tq.MetricsCollector()
        for _ in range(4):
            metrics.record_enqueue()
            metrics.record_start(0.0)
        metrics.record_success(0.01)
        metrics.record_failure("permanent")
        metrics.record_failure("transient")
        metrics.record_failure("permanent")
        snap = metrics.snapshot()
        assert snap["failed"] == 3
        assert snap["failures_by_kind"] == {"permanent": 2, "transient": 1}
        assert snap["success_rate"] == pytest.approx(0.25)
        assert snap["in_flight"] == 0

    def test_record_retry(self) -> None:
        """Every retry is counted and nothing else moves."""
        metrics = tq.MetricsCollector()
        for _ in range(3):
            metrics.record_retry()
        snap = metrics.snapshot()
        assert snap["retries"] == 3
        assert snap["succeeded"] == snap["failed"] == snap["submitted"] == 0

    def test_record_duplicate_rejection_cancel(self) -> None:
        """Duplicates, rejections and cancellations have their own counters."""
        metrics = tq.MetricsCollector()
        metrics.record_enqueue()
        metrics.record_duplicate()
        metrics.record_rejection()
        metrics.record_cancel()
        snap = metrics.snapshot()
        assert (snap["duplicates"], snap["rejected"], snap["cancelled"]) == (1, 1, 1)
        assert snap["queue_depth"] == 0
        assert snap["success_rate"] == 1.0

    def test_counters_never_negative(self) -> None:
        """Unbalanced calls never drive a gauge below zero."""
        metrics = tq.MetricsCollector()
        metrics.record_success(0.01)
        metrics.record_cancel()
        snap = metrics.snapshot()
        assert snap["in_flight"] == 0
        assert snap["queue_depth"] == 0

    def test_percentile_calculation(self) -> None:
        """Percentiles of 1..100 ms match nearest rank within 1%, in seconds and in the snapshot."""
        metrics = tq.MetricsCollector()
        for ms in range(100, 0, -1):
            metrics.record_enqueue()
            metrics.record_start(0.0)
            metrics.record_success(ms / 1000)
        assert metrics.percentile(50) == pytest.approx(0.050, rel=0.01)
        assert metrics.percentile(95) == pytest.approx(0.095, rel=0.01)
        assert metrics.percentile(99) == pytest.approx(0.099, rel=0.01)
        assert metrics.percentile(100) == pytest.approx(0.100, rel=0.01)
        latency = metrics.snapshot()["latency_ms"]
        assert latency["count"] == 100
        assert latency["mean"] == pytest.approx(50.5, rel=0.01)
        assert latency["p50"] == pytest.approx(50.0, rel=0.01)
        assert latency["p95"] == pytest.approx(95.0, rel=0.01)
        assert latency["p99"] == pytest.approx(99.0, rel=0.01)
        assert latency["max"] == pytest.approx(100.0, rel=0.01)
        assert metrics.percentile(50, series="queue_wait") == 0.0

    @pytest.mark.timeout(30)
    def test_thread_safety(self) -> None:
        """Eight threads recording at once lose no update."""
        metrics = tq.MetricsCollector()
        barrier = threading.Barrier(8)

        def work() -> None:
            barrier.wait(WAIT)
            for _ in range(500):
                metrics.record_enqueue()
                metrics.record_start(0.001)
                metrics.record_retry()
                metrics.record_success(0.002, service_time=0.001)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 2)
        snap = metrics.snapshot()
        assert snap["submitted"] == 4000
        assert snap["succeeded"] == 4000
        assert snap["retries"] == 4000
        assert snap["in_flight"] == 0
        assert snap["queue_depth"] == 0
        assert snap["latency_ms"]["count"] == 4000


class TestTaskRecord:
    """TaskRecord: fields, defaults and derived durations."""

    def test_task_record_creation(self) -> None:
        """A record keeps its fields and defaults the optional ones to None or 0."""
        record = tq.TaskRecord("t1", "k1", tq.TaskStatus("succeeded"), output={"x": 1})
        assert (record.task_id, record.key, record.output) == ("t1", "k1", {"x": 1})
        assert record.status == "succeeded"
        assert record.status is tq.TaskStatus("succeeded")
        assert record.error is None
        assert record.error_kind is None
        assert record.attempts == 0
        assert record.enqueued_at is None
        assert record.started_at is None
        assert record.finished_at is None
        assert {s.value for s in tq.TaskStatus} == {"succeeded", "failed", "duplicate", "cancelled"}

    def test_duration_calculation(self) -> None:
        """queue_wait, duration and latency come from the timestamps; None where one is missing."""
        record = tq.TaskRecord(
            "t",
            "t",
            tq.TaskStatus("succeeded"),
            attempts=1,
            enqueued_at=10.0,
            started_at=10.5,
            finished_at=12.0,
        )
        assert record.queue_wait == pytest.approx(0.5)
        assert record.duration == pytest.approx(1.5)
        assert record.latency == pytest.approx(2.0)
        unstarted = tq.TaskRecord(
            "t", "t", tq.TaskStatus("cancelled"), enqueued_at=10.0, finished_at=11.0
        )
        assert unstarted.queue_wait is None
        assert unstarted.duration is None
        assert unstarted.latency == pytest.approx(1.0)
        assert tq.TaskRecord("t", "t", tq.TaskStatus("failed")).latency is None


class TestTaskQueue:
    """TaskQueue: bounded queue served by worker loops."""

    def test_queue_creation(self) -> None:
        """A queue reports its bounds and starts empty."""
        queue = tq.TaskQueue(lambda item: None, maxsize=5, workers=2)
        try:
            assert queue.maxsize == 5
            assert queue.workers == 2
            assert queue.qsize() == 0
        finally:
            queue.close()

    @pytest.mark.timeout(20)
    def test_submit_task(self) -> None:
        """Every submitted item is processed once, even after an item raised."""
        seen: list[int] = []
        lock = threading.Lock()
        all_done = threading.Event()

        def process(item: int) -> None:
            with lock:
                seen.append(item)
                if len(seen) == 10:
                    all_done.set()
            if item == 3:
                raise ValueError("boom")

        queue = tq.TaskQueue(process, maxsize=20, workers=1)
        for i in range(10):
            queue.submit(i)
        assert all_done.wait(WAIT)
        assert queue.close(wait=True) == []
        assert sorted(seen) == list(range(10))
        with pytest.raises(tq.PoolClosedError):
            queue.submit(99)

    @pytest.mark.timeout(20)
    def test_queue_overflow_rejection(self, gated: GatedFactory) -> None:
        """A full queue raises QueueFullError at once or after the timeout; close drains it."""
        handler = gated()
        processed: list[str] = []

        def process(item: str) -> None:
            handler(tq.Task(item))
            processed.append(item)

        queue = tq.TaskQueue(process, maxsize=2, workers=1)
        try:
            queue.submit("busy")
            assert handler.wait_started("busy")
            queue.submit("a")
            queue.submit("b")
            assert queue.qsize() == 2
            with pytest.raises(tq.QueueFullError) as info:
                queue.submit("c", block=False)
            assert info.value.maxsize == 2
            with pytest.raises(tq.QueueFullError):
                queue.submit("c", timeout=0.05)
        finally:
            handler.gate.set()
            queue.close(wait=True)
        assert processed == ["busy", "a", "b"]

    @pytest.mark.timeout(20)
    def test_close_cancel_pending_returns_items(self, gated: GatedFactory) -> None:
        """close(cancel_pending=True) returns the queued items it removed, unprocessed."""
        handler = gated()
        queue = tq.TaskQueue(lambda item: handler(tq.Task(item)), maxsize=5, workers=1)
        queue.submit("busy")
        assert handler.wait_started("busy")
        queue.submit("a")
        queue.submit("b")
        removed = queue.close(wait=False, cancel_pending=True)
        assert sorted(removed) == ["a", "b"]
        with pytest.raises(tq.PoolClosedError):
            queue.submit("late")
        handler.gate.set()
        assert queue.close(wait=True) == []
        assert handler.calls == {"busy": 1}

    @pytest.mark.timeout(20)
    def test_qsize_counts_only_items(self, gated: GatedFactory) -> None:
        """qsize() counts waiting items only, not the machinery that stops the workers."""
        handler = gated()
        queue = tq.TaskQueue(lambda item: handler(tq.Task(item)), maxsize=5, workers=2)
        queue.submit("busy-1")
        queue.submit("busy-2")
        assert handler.wait_started("busy-1")
        assert handler.wait_started("busy-2")
        queue.submit("a")
        assert queue.qsize() == 1
        assert queue.close(wait=False, cancel_pending=True) == ["a"]
        assert queue.qsize() == 0
        handler.gate.set()
        queue.close(wait=True)


class TestLoadHandler:
    """``worker --handler MODULE:FUNCTION``: every bad spec is one line and exit code 2."""

    BROKEN_MODULES = {
        "tq_syntax_error": ("def run(task)\n    return 1\n", "SyntaxError"),
        "tq_raises_at_import": ("raise RuntimeError('no config here')\n", "no config here"),
        "tq_exits_at_import": ("import sys\nsys.exit(3)\n", "SystemExit"),
        "tq_missing_dependency": ("import tq_no_such_dependency\n", "tq_no_such_dependency"),
        "tq_multiline_error": ("raise ValueError('first\\nsecond')\n", "first"),
    }

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("module", sorted(BROKEN_MODULES))
    def test_a_module_that_fails_to_import_exits_2(self, tmp_path: Path, module: str) -> None:
        """A module with a syntax error or one that raises or exits at import: one line, exit 2."""
        source, detail = self.BROKEN_MODULES[module]
        (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
        proc = run_cli(["worker", "--db", "untouched.db", "--handler", f"{module}:run"], tmp_path)
        line = one_line_error(proc)
        assert f"{module}:run" in line and "cannot import module" in line, line
        assert detail in line, line
        assert not (tmp_path / "untouched.db").exists()

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("tq_handlers_ok:missing", "has no attribute 'missing'"),
            ("tq_handlers_ok:VALUE", "not callable"),
            ("tq_handlers_ok", "expected MODULE:FUNCTION"),
            (":run", "expected MODULE:FUNCTION"),
            ("tq_handlers_ok:", "expected MODULE:FUNCTION"),
            ("tq_handlers_ok:run:extra", "expected MODULE:FUNCTION"),
            ("", "expected MODULE:FUNCTION"),
            (".relative:run", "cannot import module"),
        ],
    )
    def test_a_bad_spec_exits_2(self, tmp_path: Path, spec: str, message: str) -> None:
        """A missing or non-callable attribute and a malformed spec: one line, exit 2."""
        (tmp_path / "tq_handlers_ok.py").write_text(
            "VALUE = 42\n\n\ndef run(task):\n    return {}\n", encoding="utf-8"
        )
        proc = run_cli(["worker", "--db", "untouched.db", "--handler", spec], tmp_path)
        line = one_line_error(proc)
        assert message in line, line
        assert not (tmp_path / "untouched.db").exists()


class TestStoredErrors:
    """Error texts are stored by every backend, whatever characters they hold."""

    UNSTORABLE = "refused \x00 at \ud800 here"
    STORED = "refused \\x00 at \\ud800 here"

    def test_release_and_settle_store_any_error_text(self, backend: Backend) -> None:
        """A NUL or a lone surrogate in an error is stored escaped, not refused by the database."""
        store = backend.open()
        (claim,) = store.claim_many([("k", None)])
        assert store.release_many([("k", claim.token, self.UNSTORABLE)]) == 1
        assert store.lookup("k")["error"] == self.STORED
        store.enqueue_many([tq.Task("t")])
        (entry,) = store.take_many("w", 1)
        assert store.settle_many([("t", entry.token, tq.EntryState.FAILED, self.UNSTORABLE)]) == 1
        assert store.queue_status()["tasks"]["failed"] == 1

    @pytest.mark.timeout(30)
    def test_a_failure_with_unstorable_text_fails_only_its_own_task(self, backend: Backend) -> None:
        """A handler error holding NUL and a lone surrogate fails its task alone, durably."""

        def handler(task: tq.Task) -> str:
            if task.id == "bad":
                raise tq.PermanentError(self.UNSTORABLE)
            return task.id

        manager = tq.IdempotencyManager(store=backend.open())
        batch = [tq.Task(f"t{i}") for i in range(6)] + [tq.Task("bad")]
        with tq.WorkerPool(handler, workers=2, idempotency=manager, durable=True) as pool:
            records = {record.task_id: record for record in pool.run(batch)}
        assert records["bad"].status is tq.TaskStatus.FAILED
        assert records["bad"].error is not None and "refused" in records["bad"].error
        assert all(records[f"t{i}"].status is tq.TaskStatus.SUCCEEDED for i in range(6))
        assert manager.lookup("bad")["error"] is not None
        assert "\x00" not in manager.lookup("bad")["error"]

    @pytest.mark.timeout(30)
    def test_the_longest_id_and_key_with_the_longest_namespace_run_on_every_store(
        self, backend: Backend
    ) -> None:
        """Ids and keys of MAX_KEY_BYTES with a namespace of MAX_NAMESPACE_BYTES are enqueued,
        claimed and completed, also where PostgreSQL indexes them (its btree row limit)."""
        # Random text: PostgreSQL compresses a long index value only when it shrinks.
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789\u00e9\u20ac\U0001f600"

        def longest(limit: int) -> str:
            text = ""
            while len((text + "\U0001f600").encode()) <= limit:
                text += secrets.choice(alphabet)
            return text + "z" * (limit - len(text.encode()))

        namespace = longest(tq.MAX_NAMESPACE_BYTES)
        tasks = [tq.Task(longest(tq.MAX_KEY_BYTES), {"n": n}, longest(tq.MAX_KEY_BYTES))
                 for n in range(2)]  # fmt: skip
        assert all(len(t.id.encode()) == len(t.key.encode()) == tq.MAX_KEY_BYTES for t in tasks)
        assert len(namespace.encode()) == tq.MAX_NAMESPACE_BYTES
        store = backend.open()
        # The durable queue: enqueued, taken and settled by id.
        assert store.enqueue_many([tasks[0]]) == 1
        (entry,) = store.take_many("w" * tq.MAX_KEY_BYTES, 1)
        assert entry.task == tasks[0]
        assert store.settle_many([(tasks[0].id, entry.token, tq.EntryState.DONE, None)]) == 1
        # A pool: each key claimed in the namespace, run and completed, durably.
        manager = tq.IdempotencyManager(store=store)
        with tq.WorkerPool(
            lambda task: task.payload, workers=2, idempotency=manager, durable=True,
            namespace=namespace,
        ) as pool:  # fmt: skip
            records = pool.run(tasks)
        assert [r.status for r in records] == [tq.TaskStatus.SUCCEEDED] * 2, records
        for task in tasks:
            assert manager.lookup(task.key, namespace=namespace)["state"] == "completed"

    def test_a_worker_name_no_store_can_keep_is_refused(self) -> None:
        """WorkerPool refuses a worker name with a NUL or a lone surrogate, opening nothing."""
        for name in ("w\x00", "w\udcff", ""):
            with pytest.raises(ValueError, match="worker_name"):
                tq.WorkerPool(lambda task: None, workers=1, durable=True, worker_name=name)


class TestRandomSources:
    """Retry jitter and a worker's outage backoff never draw from the global `random`."""

    def test_retry_jitter_ignores_a_seeded_global_random(self) -> None:
        """Processes that call random.seed(42) alike still spread their retries apart."""
        policy = tq.RetryPolicy(base_delay=1.0, max_delay=1.0)
        draws = []
        for _ in range(2):
            random.seed(42)
            draws.append([policy.delay(1) for _ in range(8)])
        assert draws[0] != draws[1]
        assert all(0.0 <= delay <= 1.0 for delay in draws[0] + draws[1])

    @pytest.mark.timeout(30)
    def test_the_outage_backoff_ignores_the_global_random(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A worker whose database fails backs off without touching the global `random`."""
        db = tmp_path / "queue.db"
        manager = tq.IdempotencyManager(str(db))
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("DROP TABLE idempotency_tasks")  # every take now fails
        warned = threading.Event()

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "unavailable" in record.getMessage():
                    warned.set()

        def refuse(*args: object) -> float:
            raise AssertionError("the global random generator was used")

        watch = Watch()
        tq.logger.addHandler(watch)
        monkeypatch.setattr(random, "uniform", refuse)
        monkeypatch.setattr(random, "random", refuse)
        errors: list[BaseException] = []
        stop = threading.Event()
        pool = tq.WorkerPool(lambda task: None, workers=1, idempotency=manager, durable=True)

        def serve() -> None:
            try:
                pool.serve(stop, poll_interval=0.05)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            assert warned.wait(WAIT)
        finally:
            # The backoff is drawn before the wait that `stop` ends, so it was drawn already.
            stop.set()
            thread.join(WAIT)
            tq.logger.removeHandler(watch)
            pool.shutdown()
            manager.close()
        assert not thread.is_alive() and errors == []
