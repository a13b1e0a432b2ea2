"""Shared fixtures for the task_queue_optimized test suite."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq

REPO_ROOT = Path(__file__).resolve().parents[1]

# Longest time a gated handler waits for its gate before failing the task: a safety net so that a
# broken test never hangs a worker thread for the full pytest timeout.
GATE_TIMEOUT = 15.0

# Longest time a test waits for a future or an event that the code under test should deliver.
WAIT = 10.0


class GatedHandler:
    """A handler that counts its calls per key and can hold workers busy until a gate opens."""

    def __init__(
        self,
        *,
        gated: bool = True,
        error: BaseException | None = None,
        output: Callable[[tq.Task], Any] | None = None,
    ) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self._error = error
        self._output = output
        self._lock = threading.Lock()  # guards calls and _started_by_id
        self.calls: Counter[str] = Counter()
        self._started_by_id: dict[str, threading.Event] = {}

    def started_event(self, task_id: str) -> threading.Event:
        """Return the event set when the handler starts on task_id."""
        with self._lock:
            return self._started_by_id.setdefault(task_id, threading.Event())

    def wait_started(self, task_id: str, timeout: float = WAIT) -> bool:
        """Wait until the handler has started on task_id."""
        return self.started_event(task_id).wait(timeout)

    @property
    def total_calls(self) -> int:
        """Return the number of handler calls over all keys."""
        with self._lock:
            return sum(self.calls.values())

    def __call__(self, task: tq.Task) -> Any:
        with self._lock:
            self.calls[task.key] += 1
            event = self._started_by_id.setdefault(task.id, threading.Event())
        event.set()
        self.started.set()
        if not self.gate.wait(GATE_TIMEOUT):
            raise RuntimeError("test gate never opened")
        if self._error is not None:
            raise self._error
        if self._output is not None:
            return self._output(task)
        return {"task_id": task.id, "payload": task.payload}


@pytest.fixture
def tmp_db(tmp_path: Path) -> str:
    """Return the path of a not yet existing SQLite file in tmp_path."""
    return str(tmp_path / "idempotency.db")


@pytest.fixture
def make_processor() -> Callable[..., tq.TaskProcessor]:
    """Return a factory of fast, jitter-free TaskProcessor instances."""

    def factory(latency_ms: float = 1.0, **kwargs: Any) -> tq.TaskProcessor:
        kwargs.setdefault("jitter_ms", 0.0)
        return tq.TaskProcessor(latency_ms=latency_ms, **kwargs)

    return factory


@pytest.fixture
def make_tasks() -> Callable[..., list[tq.Task]]:
    """Return a factory of N tasks with ids prefix-000, prefix-001, ..."""

    def factory(
        n: int, prefix: str = "task", payload: dict[str, Any] | None = None
    ) -> list[tq.Task]:
        return [tq.Task(f"{prefix}-{i:03d}", dict(payload or {})) for i in range(n)]

    return factory


class GatedFactory:
    """Build GatedHandler instances and remember them so that teardown can open every gate."""

    def __init__(self) -> None:
        self.handlers: list[GatedHandler] = []

    def __call__(self, **kwargs: Any) -> GatedHandler:
        handler = GatedHandler(**kwargs)
        self.handlers.append(handler)
        return handler

    def release_all(self) -> None:
        """Open every gate handed out so far."""
        for handler in self.handlers:
            handler.gate.set()


@pytest.fixture
def gated() -> Iterator[GatedFactory]:
    """Return a GatedHandler factory; every gate is opened at teardown so no worker stays stuck."""
    factory = GatedFactory()
    yield factory
    factory.release_all()


@pytest.fixture
def make_pool(gated: GatedFactory) -> Iterator[Callable[..., tq.WorkerPool]]:
    """Return a WorkerPool factory whose pools are shut down at teardown (after gates open)."""
    pools: list[tq.WorkerPool] = []

    def factory(handler: Any = None, **kwargs: Any) -> tq.WorkerPool:
        pool = tq.WorkerPool(handler, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    gated.release_all()
    for pool in pools:
        pool.shutdown(wait=True, cancel_pending=True)


def python_env() -> dict[str, str]:
    """Return an environment in which a child interpreter imports the module under test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Return a function that runs `python -c code args...` to completion in the repository."""

    def run(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def spawn_python() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Return a function that starts `python -c code args...` with pipes; kills leftovers."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=python_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT)
