"""Retry jitter and a worker's outage backoff: their own random source."""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import threading
from pathlib import Path

import pytest

import task_queue_optimized as tq
from tests.support import WAIT


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
