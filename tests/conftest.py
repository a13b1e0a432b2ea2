"""The fixtures of the task_queue_optimized test suite, shared by every test module.

Helpers that are not fixtures live in tests/support.py (and, for one area, beside its tests).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.support import REPO, WAIT, GatedFactory, child_env

# --- Pools, handlers and tasks -------------------------------------------------------------------


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


# --- Python children -----------------------------------------------------------------------------


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Return a function that runs `python -c code args...` to completion in the repository."""

    def run(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            env=child_env(),
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
            cwd=REPO,
            env=child_env(),
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


# --- Stores and worker processes (see tests/store_fixtures.py) -----------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """Return the URL of a fresh schema on the test server; drop the schema at teardown."""
    store_fixtures.require_postgres()
    url = store_fixtures.new_schema_url()
    yield url
    store_fixtures.drop_schema(url)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the --db of a durable queue: a SQLite file, then a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "queue.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[store_fixtures.Backend]:
    """Yield each backend in turn: memory://, a SQLite file, a fresh PostgreSQL schema."""
    name = request.param
    if name == "postgres":
        url = request.getfixturevalue("pg_url")
    elif name == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = "memory://"
    chosen = store_fixtures.Backend(name, url)
    yield chosen
    chosen.close_all()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[store_fixtures.Launcher]:
    """Return a `Launcher` working in tmp_path, with the test handler module written there."""
    started = store_fixtures.Launcher(tmp_path)
    yield started
    started.teardown()
