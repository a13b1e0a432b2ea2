"""MetricsCollector: counters, gauges, percentiles and thread safety."""

from __future__ import annotations

import threading

import pytest

import task_queue_optimized as tq
from tests.support import WAIT


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
