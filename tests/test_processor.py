"""TaskProcessor, the simulated handler: streaming, hashing, latency and fault injection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest

import task_queue_optimized as tq

# A sleep of s seconds never returns earlier than s; allow for the clock's resolution only.
CLOCK_SLACK = 0.0005


def _timed(processor: tq.TaskProcessor, task: tq.Task) -> float:
    """Return the seconds one processor call took."""
    start = time.perf_counter()
    processor(task)
    return time.perf_counter() - start


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
