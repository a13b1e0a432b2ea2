"""TaskQueue: the bounded queue served by worker loops."""

from __future__ import annotations

import threading

import pytest

import task_queue_optimized as tq
from tests.support import WAIT, GatedFactory


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
